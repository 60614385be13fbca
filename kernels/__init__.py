"""Pallas kernels for optdist's hot paths, installed as ``optdist_kernels``.

Every kernel here has a pure-JAX reference with identical semantics; optdist
imports and runs without any kernel (XLA fallback). Kernels land with the
kernels issue; this package is empty until then.
"""
