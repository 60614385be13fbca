"""Pallas kernels for optdist's hot paths, installed as ``optdist_kernels``.

Every kernel has a pure-JAX reference with identical semantics, which is also its XLA fallback, and a
dispatcher argument ``impl="auto"|"pallas"|"xla"`` (:data:`IMPLS`), decided in one place,
:func:`resolve_impl` (``"auto"``: the kernel only on the backends :data:`AUTO_BACKENDS` lists for it,
where it was measured faster, and only if it compiles for the shapes; else the XLA reference):

* :func:`ef_quantize` / :func:`decode_accumulate`: fused error feedback + bucketed int8 / ternary /
  scaled-sign quantization with bit packing, and the fused decode + accumulate.
* :func:`ef_threshold_topk`: fused error feedback + sampled-threshold top-k into a fixed-capacity buffer.
* :func:`ef_project` / :func:`decode_residual` / :func:`gram_schmidt`: PowerSGD's fused EF add +
  projection, fused decode + residual write, and small-rank Gram–Schmidt.
* :func:`batched_inverse_pth_root`: coupled Newton / Newton–Schulz inverse p-th roots of SPD blocks.

Benchmark on a GPU with ``python -m experiments.benchmarks.kernels``. Library code imports only the names
below (never ``optdist_kernels._dispatch``).
"""

from optdist_kernels._dispatch import (
    AUTO_BACKENDS,
    IMPLS,
    KERNELS,
    hash_uniform,
    next_pow2,
    resolve_impl,
    seeds_from_key,
)
from optdist_kernels.powersgd import decode_residual, ef_project, gram_schmidt
from optdist_kernels.quantize import decode_accumulate, ef_quantize
from optdist_kernels.roots import batched_inverse_pth_root
from optdist_kernels.topk import ef_threshold_topk

__all__ = [
    "hash_uniform",
    "seeds_from_key",
    "AUTO_BACKENDS",
    "IMPLS",
    "KERNELS",
    "batched_inverse_pth_root",
    "decode_accumulate",
    "decode_residual",
    "ef_project",
    "ef_quantize",
    "ef_threshold_topk",
    "gram_schmidt",
    "next_pow2",
    "resolve_impl",
]
