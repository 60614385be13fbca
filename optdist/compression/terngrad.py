"""TernGrad: unbiased ternary gradients {-s, 0, s}, two bits per entry."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from optdist import _checks
from optdist.compression.base import Compressor, gathered, pack_bits, unpack_bits


def terngrad(clip_sigma: float | None = 2.5) -> Compressor:
    r"""TernGrad: ``s * sign(x) * b`` with ``b ~ Bernoulli(|x| / s)``, per leaf.

    .. math:: \tilde x = \mathrm{clip}(x, -c\sigma, c\sigma), \quad s = \max_j |\tilde x_j|,
              \quad T(x)_j = s \, \mathrm{sign}(\tilde x_j) \, b_j,
              \quad b_j \sim \mathrm{Bernoulli}(|\tilde x_j| / s)

    with :math:`\sigma` the standard deviation of the leaf's entries and
    ``c = clip_sigma``. Unbiased for :math:`\tilde x` (so for :math:`x` when
    nothing is clipped, e.g. ``clip_sigma=None``). The Bernoulli draws use a key
    that differs per worker.

    Payload per leaf (gathered): one float32 scale, and two bit-planes packed
    8 entries per uint8 byte (non-zero, negative): ``2 ceil(d/8) + 4`` bytes.
    Stateless.

    Args:
      clip_sigma: clip at ``clip_sigma`` standard deviations (``> 0``), or None
        for no clipping.

    Returns:
      A :class:`~optdist.compression.Compressor`.

    Example::

      tx = optax.chain(optdist.compressed_mean(optdist.compressors.terngrad(), "data"), optax.sgd(0.1))

    References:
      Wen, Xu, Yan, Wu, Wang, Chen, Li, "TernGrad: Ternary Gradients to Reduce
      Communication in Distributed Deep Learning", NeurIPS 2017.
    """
    if clip_sigma is not None:
        clip_sigma = _checks.in_range(clip_sigma, "clip_sigma", 0.0, float("inf"), low_open=True)

    def encode(x, key):
        if clip_sigma is not None:
            bound = clip_sigma * jnp.std(x)
            x = jnp.clip(x, -bound, bound)
        scale = jnp.max(jnp.abs(x))
        prob = jnp.abs(x) / jnp.where(scale > 0, scale, 1.0)
        nonzero = jax.random.uniform(key, x.shape, x.dtype) < prob
        return {
            "scale": scale.astype(jnp.float32),
            "nonzero": pack_bits(nonzero),
            "negative": pack_bits(x < 0),
        }

    def decode(payload, size):
        nonzero = unpack_bits(payload["nonzero"], size)
        sign = jnp.where(unpack_bits(payload["negative"], size), -1.0, 1.0)
        return jnp.where(nonzero, sign * payload["scale"], 0.0)

    return gathered(f"terngrad({clip_sigma})", encode, decode)
