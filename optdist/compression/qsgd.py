"""QSGD: unbiased stochastic quantization with per-bucket norms."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from optdist import _checks
from optdist.compression.base import Compressor, gathered, smallest_int


def _buckets(x: jax.Array, bucket_size: int) -> jax.Array:
    pad = -x.shape[0] % bucket_size
    return jnp.pad(x, (0, pad)).reshape(-1, bucket_size)


def qsgd(levels: int = 127, bucket_size: int = 512) -> Compressor:
    r"""QSGD: each bucket ``v`` is sent as its norm and stochastic integer levels.

    .. math:: Q(v_j) = \|v\|_2 \, \mathrm{sign}(v_j) \, \xi_j / s, \qquad
              \xi_j = \lfloor s |v_j| / \|v\|_2 + u_j \rfloor, \; u_j \sim U[0, 1)

    so :math:`\xi_j` is :math:`\lfloor r \rfloor + 1` with probability
    :math:`r - \lfloor r \rfloor` (:math:`r = s|v_j|/\|v\|`) and the quantizer
    is unbiased, :math:`E[Q(v)] = v`. ``s`` = ``levels``.

    Payload per leaf (gathered): the signed levels in the smallest integer dtype
    holding ``[-s, s]`` (int8 for ``s <= 127``) for ``ceil(d / b) b`` entries (the
    last bucket zero-padded), plus one float32 norm per bucket. The rounding
    noise uses a key that differs per worker (step key + worker index).
    Stateless.

    Args:
      levels: number of positive levels ``s >= 1``.
      bucket_size: entries per bucket ``b >= 1`` (each has its own norm).

    Returns:
      A :class:`~optdist.compression.Compressor`.

    Example::

      tx = optax.chain(optdist.compressed_mean(optdist.compressors.qsgd(15, 256), "data"), optax.adam(1e-3))

    References:
      Alistarh, Grubic, Li, Tomioka, Vojnovic, "QSGD: Communication-Efficient SGD via
      Gradient Quantization and Encoding", NeurIPS 2017.
    """
    levels = _checks.positive_int(levels, "levels")
    bucket_size = _checks.positive_int(bucket_size, "bucket_size")
    code_dtype = smallest_int(levels)

    def encode(x, key):
        v = _buckets(x, bucket_size)
        norm = jnp.sqrt(jnp.sum(v * v, axis=1))
        safe = jnp.where(norm > 0, norm, 1.0)
        r = jnp.abs(v) / safe[:, None] * levels
        xi = jnp.floor(r + jax.random.uniform(key, v.shape, v.dtype))
        xi = jnp.minimum(xi, levels)  # guards r = s exactly plus rounding
        return {"levels": (jnp.sign(v) * xi).astype(code_dtype), "norms": norm.astype(jnp.float32)}

    def decode(payload, size):
        v = payload["levels"].astype(jnp.float32) * (payload["norms"][:, None] / levels)
        return v.reshape(-1)[:size]

    return gathered(f"qsgd({levels}, {bucket_size})", encode, decode)
