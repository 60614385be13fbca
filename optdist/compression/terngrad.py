"""TernGrad: unbiased ternary gradients {-s, 0, s}, two bits per entry (per leaf or per bucket)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from optdist import _checks
from optdist.compression.base import Compressor, gathered, pack_bits, unpack_bits
from optdist.compression.bucketed import check_bucket_size, check_rounding, fused_quantizer
from optdist.compression.qsgd import check_rng, uniform


def terngrad(
    clip_sigma: float | None = 2.5,
    bucket_size: int | None = None,
    rounding: str = "stochastic",
    impl: str = "auto",
    rng: str = "hash",
) -> Compressor:
    r"""TernGrad: ``s * sign(x) * b`` with ``b ~ Bernoulli(|x| / s)``, per leaf or per bucket.

    .. math:: \tilde x = \mathrm{clip}(x, -c\sigma, c\sigma), \quad s = \max_j |\tilde x_j|,
              \quad T(x)_j = s \, \mathrm{sign}(\tilde x_j) \, b_j,
              \quad b_j \sim \mathrm{Bernoulli}(|\tilde x_j| / s)

    with :math:`\sigma` the standard deviation of the leaf's entries and
    ``c = clip_sigma``. Unbiased for :math:`\tilde x` (so for :math:`x` when
    nothing is clipped, e.g. ``clip_sigma=None``). ``rounding="nearest"`` sends
    :math:`b_j = [|\tilde x_j| \ge s/2]` instead (deterministic; use with error feedback).

    ``bucket_size=None``: one scale per leaf; the Bernoulli draws come from a counter-based hash of
    (a key that differs per worker, element index) (:func:`optdist.compression.qsgd.uniform`, one
    elementwise pass). Payload per leaf (gathered): one float32 scale, and two bit-planes
    packed 8 entries per uint8 byte (non-zero, negative): ``2 ceil(d/8) + 4`` bytes.

    ``bucket_size=b`` (needs ``clip_sigma=None``: the kernel does not clip): one scale
    :math:`s_B = \max_{j \in B}|x_j|` per bucket of ``b`` entries, on the fused error-feedback
    kernel :func:`optdist_kernels.ef_quantize` (``scheme="ternary"``, i.e. QSGD with one level and
    a max-abs scale; draws from a counter-based hash). Payload: ``ceil(d/b)·b/4`` bytes of 2-bit
    codes (4 per uint8) + 4 per bucket; a fused ``aggregate_ef`` for ``feedback="ef"``; ``impl``
    picks Pallas or its XLA reference (protocol: :mod:`optdist.compression.bucketed`). The
    deprecated ``ternary(b, rounding)`` returns this compressor; it equals
    ``qsgd(1, b, scale="max", rounding=rounding, fused=True)``.

    Leaves where the payload would not be smaller (and empty leaves) go uncompressed through the
    plain mean. Stateless.

    Args:
      clip_sigma: clip at ``clip_sigma`` standard deviations (``> 0``), or None
        for no clipping (required with ``bucket_size``).
      bucket_size: None (one scale per leaf) or entries per bucket, a power of two ``>= 16``.
      rounding: ``"stochastic"`` (unbiased) or ``"nearest"``.
      impl: ``"auto"``, ``"pallas"`` or ``"xla"`` for the bucketed kernel (``"pallas"`` needs
        ``bucket_size``).
      rng: the Bernoulli draws of ``bucket_size=None``: ``"hash"`` (default, one pass) or ``"jax"``
        (``jax.random.uniform``, the draws before the hash, kept to reproduce them). The bucketed
        kernel always hashes.

    Returns:
      A :class:`~optdist.compression.Compressor` (with a fused ``aggregate_ef`` when bucketed).

    Example::

      tx = optax.chain(optdist.compressed_mean(optdist.compressors.terngrad(), "data"), optax.sgd(0.1))
      tx = optax.chain(optdist.compressed_mean(optdist.compressors.terngrad(None, bucket_size=256),
                                               "data", feedback="ef"), optax.sgd(0.1))

    References:
      Wen, Xu, Yan, Wu, Wang, Chen, Li, "TernGrad: Ternary Gradients to Reduce
      Communication in Distributed Deep Learning", NeurIPS 2017.
    """
    from optdist_kernels import resolve_impl

    if clip_sigma is not None:
        clip_sigma = _checks.in_range(clip_sigma, "clip_sigma", 0.0, float("inf"), low_open=True)
    rounding = check_rounding(rounding)
    rng = check_rng(rng, bucket_size is not None)
    if bucket_size is not None:
        if clip_sigma is not None:
            raise ValueError(
                "clip_sigma must be None with bucket_size (the fused kernel does not clip); got "
                f"clip_sigma={clip_sigma!r}. Use terngrad(None, bucket_size={bucket_size!r})."
            )
        bucket_size = check_bucket_size(bucket_size, 16, "the kernel's bucket rows")
        name = f"terngrad(bucket_size={bucket_size}, {rounding})"
        return fused_quantizer(name, "ternary", bucket_size, rounding, impl)
    resolve_impl(
        impl, unsupported="terngrad(bucket_size=None) has no kernel; bucket_size=b runs the fused one"
    )
    draw = uniform if rng == "hash" else jax.random.uniform

    def encode(x, key):
        if x.shape[0] == 0:  # an empty leaf (only sized, never sent): no max to take
            scale = jnp.zeros((), x.dtype)
        else:
            if clip_sigma is not None:
                bound = clip_sigma * jnp.std(x)
                x = jnp.clip(x, -bound, bound)
            scale = jnp.max(jnp.abs(x))
        prob = jnp.abs(x) / jnp.where(scale > 0, scale, 1.0)
        if rounding == "stochastic":
            nonzero = draw(key, x.shape, x.dtype) < prob
        else:
            nonzero = prob >= 0.5
        return {
            "scale": scale.astype(jnp.float32),
            "nonzero": pack_bits(nonzero),
            "negative": pack_bits(x < 0),
        }

    def decode(payload, size):
        nonzero = unpack_bits(payload["nonzero"], size)
        sign = jnp.where(unpack_bits(payload["negative"], size), -1.0, 1.0)
        return jnp.where(nonzero, sign * payload["scale"], 0.0)

    name = f"terngrad({clip_sigma})" if rounding == "stochastic" else f"terngrad({clip_sigma}, nearest)"
    return gathered(name, encode, decode)
