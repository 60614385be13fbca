"""QSGD: stochastic (or nearest) uniform quantization with a per-bucket scale, one factory for every
encoding (``jax.random`` draws, or the fused error-feedback kernel with its hash RNG)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from optdist import _checks
from optdist.compression.base import Compressor, gathered, smallest_int
from optdist.compression.bucketed import check_bucket_size, check_rounding, fused_quantizer

_SCALES = ("norm", "max")
_MAX_LEVELS = 2**24  # every level count up to 2**24 is exact in float32 (and fits int32 codes)
_MAX_FUSED_LEVELS = 127  # the kernel's int8 codes


def uniform(key: jax.Array, shape: tuple[int, ...], dtype) -> jax.Array:
    """``U[0, 1)`` draws of ``shape`` from the counter-based hash of (``key``, element index).

    One elementwise pass (:func:`optdist_kernels.hash_uniform`, the fused kernels' RNG,
    24 random bits per draw), where ``jax.random.uniform`` runs a multi-round loop over the whole
    array on CPU (it moved 2.4-3.3x the bytes of the rest of a QSGD / TernGrad step). Element
    indices wrap modulo ``2**32``.
    """
    from optdist_kernels import hash_uniform, seeds_from_key

    seeds = seeds_from_key(key)
    size = 1
    for s in shape:
        size *= s
    index = jax.lax.iota(jnp.uint32, size).reshape(shape)
    return hash_uniform(index, seeds[0], seeds[1]).astype(dtype)


_RNGS = ("hash", "jax")


def check_rng(rng: str, fused: bool) -> str:
    """``"hash"`` or ``"jax"``; the fused kernel encodings draw from the hash only."""
    if rng not in _RNGS:
        raise ValueError(f"rng must be one of {_RNGS}; got {rng!r}.")
    if fused and rng != "hash":
        raise ValueError(
            f"rng={rng!r} applies to the unfused encoding only (the fused kernel draws from its hash); "
            "use rng='hash'."
        )
    return rng


def _buckets(x: jax.Array, bucket_size: int) -> jax.Array:
    pad = -x.shape[0] % bucket_size
    return jnp.pad(x, (0, pad)).reshape(-1, bucket_size)


def _check_levels(levels: int, fused: bool) -> int:
    levels = _checks.positive_int(levels, "levels")
    limit = _MAX_FUSED_LEVELS if fused else _MAX_LEVELS
    if levels > limit:
        why = "fused=True stores int8 codes" if fused else "levels above 2**24 are not exact in float32"
        raise ValueError(f"levels must be <= {limit} ({why}); got {levels}.")
    return levels


def _name(levels, bucket_size, scale, rounding, fused) -> str:
    options = [f"scale={scale}"] if scale != "norm" else []
    options += [f"rounding={rounding}"] if rounding != "stochastic" else []
    options += ["fused"] if fused else []
    return f"qsgd({', '.join([str(levels), str(bucket_size), *options])})"


def qsgd(
    levels: int = 127,
    bucket_size: int = 512,
    *,
    scale: str = "norm",
    rounding: str = "stochastic",
    fused: bool = False,
    impl: str = "auto",
    rng: str = "hash",
) -> Compressor:
    r"""QSGD / bucketed uniform quantization: each bucket ``v`` is sent as a scale and integer levels.

    .. math:: Q(v_j) = \frac{\sigma(v)}{s} \, \mathrm{sign}(v_j) \, \xi_j, \qquad
              \xi_j = \min\big(\lfloor s |v_j| / \sigma(v) + u_j \rfloor, s\big)

    with ``s = levels`` and :math:`\sigma(v) = \|v\|_2` (``scale="norm"``, QSGD) or
    :math:`\max_j |v_j|` (``scale="max"``). ``rounding="stochastic"``: :math:`u_j \sim U[0, 1)`, so
    :math:`\xi_j` is :math:`\lfloor r \rfloor + 1` with probability :math:`r - \lfloor r \rfloor`
    (:math:`r = s|v_j|/\sigma`) and the quantizer is unbiased, :math:`E[Q(v)] = v` (the clip at ``s``
    never binds since :math:`r \le s`). ``rounding="nearest"``: :math:`u_j = 1/2`, error
    :math:`\le \sigma / (2s)` per entry, deterministic (use with error feedback).

    Two encodings of that math:

    * ``fused=False`` (default): draws :math:`u` from a counter-based hash of (key, element index)
      (:func:`uniform`: 24 random bits, one elementwise pass; ``jax.random.uniform`` ran as a
      multi-round loop over the whole array on CPU), computed in the leaf's compute dtype (float32,
      or float64 for float64 leaves); any ``bucket_size``, any ``levels`` up to ``2**24``. Payload
      per leaf: the signed levels in the smallest integer dtype holding ``[-s, s]`` (int8 for
      ``s <= 127``) for ``ceil(d / b) b`` entries (the last bucket zero-padded), plus one float32
      :math:`\sigma` per bucket. No kernel (``impl`` must be ``"auto"`` or ``"xla"``).
    * ``fused=True``: the fused error-feedback kernel :func:`optdist_kernels.ef_quantize` (float32,
      :math:`u` from a counter-based hash; ``bucket_size`` a power of two ``>= 16``, ``levels <= 127``):
      int8 codes (2-bit codes packed 4 per byte for ``levels=1``) + one float32 :math:`\sigma/s` per
      bucket, and a fused ``aggregate_ef`` that :func:`optdist.compressed_mean` uses for
      ``feedback="ef"`` (:math:`p = g + e`, the payload and :math:`e \leftarrow p - Q(p)` in one
      pass). ``impl`` picks Pallas or its XLA reference (identical codes). This is the encoding the
      deprecated ``int8(b, rounding)`` returns: ``qsgd(127, b, scale="max", rounding=rounding,
      fused=True)``. Module :mod:`optdist.compression.bucketed` documents the protocol.

    Both are gathered: each worker sends ``(n - 1)`` times its payload; the rounding noise uses a key
    that differs per worker (step key + worker index). Scalars and leaves where the payload would
    not be smaller (or empty) go uncompressed through the plain mean. Stateless.

    Args:
      levels: number of positive levels ``s``, ``1 <= s <= 2**24`` (``<= 127`` with ``fused``).
      bucket_size: entries per bucket ``b >= 1`` (each has its own scale); a power of two ``>= 16``
        with ``fused``.
      scale: ``"norm"`` (L2 norm of the bucket, QSGD) or ``"max"`` (max-abs of the bucket).
      rounding: ``"stochastic"`` (unbiased) or ``"nearest"``.
      fused: use the fused error-feedback kernel's encoding (see above).
      impl: ``"auto"``, ``"pallas"`` or ``"xla"`` (``"pallas"`` only with ``fused=True``).
      rng: where stochastic rounding draws :math:`u` for ``fused=False``: ``"hash"`` (default, the
        counter-based hash, one pass) or ``"jax"`` (``jax.random.uniform``: the draws before the
        hash, kept to reproduce them; a multi-round loop over the array on CPU). ``fused=True``
        always hashes.

    Returns:
      A :class:`~optdist.compression.Compressor` (with a fused ``aggregate_ef`` when ``fused``).

    Example::

      tx = optax.chain(optdist.compressed_mean(optdist.compressors.qsgd(15, 256), "data"), optax.adam(1e-3))
      int8 = optdist.compressors.qsgd(127, 256, scale="max", rounding="nearest", fused=True)
      tx = optax.chain(optdist.compressed_mean(int8, "data", feedback="ef"), optax.sgd(0.1))

    References:
      Alistarh, Grubic, Li, Tomioka, Vojnovic, "QSGD: Communication-Efficient SGD via
      Gradient Quantization and Encoding", NeurIPS 2017.
      Dettmers, "8-Bit Approximations for Parallelism in Deep Learning", ICLR 2016 (max-abs scale).
    """
    from optdist_kernels import resolve_impl

    if not isinstance(fused, bool):
        raise TypeError(f"fused must be a bool; got {fused!r}.")
    levels = _check_levels(levels, fused)
    if scale not in _SCALES:
        raise ValueError(f"scale must be one of {_SCALES}; got {scale!r}.")
    rounding = check_rounding(rounding)
    rng = check_rng(rng, fused)
    name = _name(levels, bucket_size, scale, rounding, fused)
    if fused:
        bucket_size = check_bucket_size(bucket_size, 16, "fused=True: the kernel's bucket rows")
        scheme = "ternary" if levels == 1 else "int8"
        norm = "l2" if scale == "norm" else "max"
        return fused_quantizer(name, scheme, bucket_size, rounding, impl, norm=norm, levels=levels)
    bucket_size = _checks.positive_int(bucket_size, "bucket_size")
    resolve_impl(impl, unsupported="qsgd(fused=False) has no kernel; fused=True runs the fused EF kernel")
    code_dtype = smallest_int(levels)
    draw = uniform if rng == "hash" else jax.random.uniform

    def encode(x, key):
        v = _buckets(x, bucket_size)
        if scale == "norm":
            sigma = jnp.sqrt(jnp.sum(v * v, axis=1))
        else:
            sigma = jnp.max(jnp.abs(v), axis=1, initial=0.0)
        safe = jnp.where(sigma > 0, sigma, 1.0)
        r = jnp.abs(v) / safe[:, None] * levels
        u = draw(key, v.shape, v.dtype) if rounding == "stochastic" else 0.5
        xi = jnp.minimum(jnp.floor(r + u), levels)  # guards r = s exactly plus rounding
        return {"levels": (jnp.sign(v) * xi).astype(code_dtype), "norms": sigma.astype(jnp.float32)}

    def decode(payload, size):
        v = payload["levels"].astype(jnp.float32) * (payload["norms"][:, None] / levels)
        return v.reshape(-1)[:size]

    return gathered(name, encode, decode)
