"""Shared machinery: the one ``impl`` switch (:func:`resolve_impl`), poisoned outputs, seeds.

``impl="xla"`` runs the pure-JAX reference. ``impl="pallas"`` runs the Pallas kernel, compiled for the
default backend on GPU and in interpret mode elsewhere (CPU testing). ``impl="auto"`` runs the compiled
Pallas kernel only on a backend listed for that kernel in :data:`AUTO_BACKENDS` (where it was measured
faster) *and* only if lowering + compiling it for those exact shapes succeeded (checked once per
signature, abstractly, so it also works inside an outer ``jit``); in every other case it runs the XLA
reference. So ``"auto"`` never fails because a kernel cannot lower.

:func:`resolve_impl` is the only place that validates an ``impl`` value and decides Pallas vs XLA
from it; :func:`dispatch` (every kernel entry point) and the library's callers that choose between a
kernel and their own code (PowerSGD's shape limits, the matrix roots) go through it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

IMPLS = ("auto", "pallas", "xla")

# Backends where *these* Pallas kernels were measured faster than their XLA references (kernel name ->
# platforms). None has been measured yet (no GPU in the session that wrote them; DESIGN.md's 2.41 vs
# 1.62 TB/s H100 figure was another implementation of the fused EF + int8 quantize). Add a kernel here
# after ``python -m experiments.benchmarks.kernels`` on that backend shows it ahead and matching XLA.
AUTO_BACKENDS: dict[str, tuple[str, ...]] = {
    "ef_quantize": (),
    "decode_accumulate": (),
    "ef_threshold_topk": (),
    "batched_inverse_pth_root": (),
    "powersgd_ef_project": (),
    "powersgd_decode_residual": (),
    "powersgd_gram_schmidt": (),
}


KERNELS = tuple(AUTO_BACKENDS)  # the kernel names ``resolve_impl`` accepts


def resolve_impl(
    impl: Any,
    kernel: str | None = None,
    *,
    backend: str | None = None,
    unsupported: str | None = None,
    param: str = "impl",
) -> str:
    """Which implementation ``impl`` selects: ``"pallas"`` or ``"xla"`` (the one decision, module doc).

    * ``"xla"`` is ``"xla"``; ``"pallas"`` is ``"pallas"``.
    * ``"auto"`` is ``"pallas"`` only where ``backend`` (default: JAX's default backend) is listed for
      ``kernel`` in :data:`AUTO_BACKENDS`, else ``"xla"`` (also for ``kernel=None``: nothing listed).
      :func:`dispatch` additionally falls back to XLA when the kernel does not compile for the shapes.
    * ``unsupported``: why the kernel cannot take these inputs (None: it can). Then ``"auto"`` and
      ``"xla"`` give ``"xla"`` and ``"pallas"`` raises a ``ValueError`` quoting the reason.

    Args:
      impl: ``"auto"``, ``"pallas"`` or ``"xla"`` (:data:`IMPLS`).
      kernel: a kernel name of :data:`KERNELS`, or None.
      backend: the platform to decide for (``"cpu"``, ``"gpu"``, ``"tpu"``), default the default backend.
      unsupported: a reason the kernel cannot run these inputs, or None.
      param: the caller's parameter name, for error messages (e.g. ``"root_impl"``).

    Returns:
      ``"pallas"`` or ``"xla"``.

    Example::

      if resolve_impl(impl, "ef_quantize") == "pallas": ...
    """
    if not isinstance(impl, str) or impl not in IMPLS:
        raise ValueError(f"{param} must be one of {IMPLS}; got {impl!r}.")
    if kernel is not None and kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS} or None; got {kernel!r}.")
    if unsupported is not None:
        if impl == "pallas":
            raise ValueError(
                f"{param}='pallas': {unsupported}. Use {param}='auto' (falls back to XLA where the "
                f"kernel cannot run) or {param}='xla'."
            )
        return "xla"
    if impl != "auto":
        return impl
    backend = jax.default_backend() if backend is None else backend
    return "pallas" if backend in AUTO_BACKENDS.get(kernel, ()) else "xla"


def interpret_mode() -> bool:
    """Pallas runs compiled (Triton) on GPU and in interpret mode on any other backend."""
    return jax.default_backend() != "gpu"


def _spec(x: Any) -> Any:
    return jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)) if x is not None else None


@functools.lru_cache(maxsize=256)
def _compiles(func: Callable, keywords: tuple, specs: tuple, backend: str) -> bool:
    del backend  # part of the cache key only
    try:
        jax.jit(functools.partial(func, **dict(keywords), interpret=False)).lower(*specs).compile()
        return True
    except Exception:  # noqa: BLE001 - any lowering/compile failure means "use XLA"
        return False


def dispatch(name: str, impl: str, pallas_fn: functools.partial, xla_fn: Callable, *args: Any) -> Any:
    """Runs ``pallas_fn(*args, interpret=...)`` or ``xla_fn(*args)`` according to ``impl`` (module doc).

    ``pallas_fn`` is a module-level function, or a ``functools.partial`` of one with hashable keyword
    arguments, so the compile check of ``"auto"`` is cached per (function, keywords, shapes, backend).
    """
    backend = jax.default_backend()
    if resolve_impl(impl, name, backend=backend) == "xla":
        return xla_fn(*args)
    if impl == "pallas":
        return pallas_fn(*args, interpret=interpret_mode())
    specs = tuple(jax.tree_util.tree_map(_spec, a) for a in args)
    func, keywords = pallas_fn, {}
    if isinstance(pallas_fn, functools.partial):
        func, keywords = pallas_fn.func, pallas_fn.keywords
    if _compiles(func, tuple(sorted(keywords.items())), specs, backend):
        return pallas_fn(*args, interpret=False)
    return xla_fn(*args)


def seeds_from_key(key: jax.Array) -> jax.Array:
    """Two uint32 words derived from ``key`` (typed or raw): the seed of the in-kernel hash RNG."""
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    return jax.random.bits(key, (2,), jnp.uint32)


def _mix(h: jax.Array) -> jax.Array:
    # "lowbias32" integer finalizer (C. Wellons): a bijection on uint32 with good avalanche.
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x7FEB352D)
    h = h ^ (h >> 15)
    h = h * jnp.uint32(0x846CA68B)
    return h ^ (h >> 16)


def hash_uniform(index: jax.Array, seed0: jax.Array, seed1: jax.Array) -> jax.Array:
    """A uniform float32 in [0, 1) per uint32 ``index``: counter-based, so reproducible for fixed seeds.

    Pure integer arithmetic (wrapping uint32 multiply, xor, logical shifts), so the Pallas kernels and
    the XLA references draw bit-identical numbers. 24 random bits per draw.
    """
    h = _mix(_mix(index ^ seed0) + seed1)
    return (h >> 8).astype(jnp.float32) * jnp.float32(1.0 / (1 << 24))


def poison_value(dtype: Any) -> Any:
    """The sentinel pre-filled into output buffers when ``poison=True`` (tests: no sentinel survives)."""
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.floating):
        return jnp.nan
    return jnp.iinfo(dtype).max if jnp.issubdtype(dtype, jnp.unsignedinteger) else jnp.iinfo(dtype).min


def call_kernel(
    kernel: Callable,
    inputs: list,
    in_specs: list,
    out_shapes: list,
    out_specs: list,
    grid: tuple[int, ...],
    *,
    interpret: bool,
    poison: bool = False,
    initial: dict[int, jax.Array] | None = None,
) -> list:
    """``pallas_call`` of ``kernel(*in_refs, *out_refs)``.

    ``initial`` maps an output index to the buffer it starts from (aliased input; for outputs the
    kernel writes only partly, e.g. scattered stores into a zero-filled buffer). With ``poison`` every
    other output first holds a sentinel (an aliased sentinel-filled buffer), so an element the kernel
    forgets to write keeps the sentinel and tests can detect it.
    """
    from jax.experimental import pallas as pl

    n_in = len(inputs)
    initial = dict(initial or {})
    if poison:
        for i, s in enumerate(out_shapes):
            initial.setdefault(i, jnp.full(s.shape, poison_value(s.dtype), s.dtype))
    aliases: dict[int, int] = {}
    if initial:
        order = sorted(initial)
        inputs = list(inputs) + [initial[i] for i in order]
        in_specs = list(in_specs) + [out_specs[i] for i in order]
        aliases = {n_in + j: i for j, i in enumerate(order)}
        n_extra = len(order)

        def body(*refs):
            kernel(*refs[:n_in], *refs[n_in + n_extra :])

    else:
        body = kernel
    out = pl.pallas_call(
        body,
        out_shape=list(out_shapes),
        grid=grid,
        in_specs=list(in_specs),
        out_specs=list(out_specs),
        input_output_aliases=aliases,
        interpret=interpret,
        compiler_params=triton_params(),
    )(*inputs)
    return list(out)


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def triton_params() -> Any:
    """Pins the Triton lowering on GPU (jax >= 0.10 defaults ``pallas_call`` to Mosaic GPU)."""
    from jax.experimental.pallas import triton as plt

    return plt.CompilerParams()
