"""DeMo: decoupled momentum; send the top-k DCT coefficients of momentum tiles."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

from optdist import _checks
from optdist.compression.base import Compressor, gathered, smallest_int


def dct_matrix(n: int) -> np.ndarray:
    """The orthonormal DCT-II matrix ``D`` (``D @ x`` transforms, ``D.T @ c`` inverts)."""
    k = np.arange(n)[:, None]
    j = np.arange(n)[None, :]
    d = np.sqrt(2.0 / n) * np.cos(np.pi * (2 * j + 1) * k / (2 * n))
    d[0] /= np.sqrt(2.0)
    return d


def demo(chunk: int = 64, topk: int = 32, beta: float = 0.999) -> Compressor:
    r"""DeMo's compressor: momentum, DCT over tiles, top-k per tile, remove what was sent.

    Per leaf, with a per-worker momentum ``m`` (the compressor's state):

    .. math::
        m \leftarrow \beta m + x, \quad c = \mathrm{DCT}(m) \text{ per tile of } \texttt{chunk},
        \quad \hat c = \mathrm{top}_k(c) \text{ per tile}, \quad
        m \leftarrow m - \mathrm{IDCT}(\hat c), \quad \mathrm{mean} = \tfrac1n \sum_j \mathrm{IDCT}(\hat c_j).

    The leaf is flattened and cut into 1-D tiles of ``chunk`` entries (the last
    zero-padded) — a simplification of the reference's 2-D tiles for matrices.
    DeMo's update is the *sign* of this mean: chain ``optax.scale_by_sign()``
    (and the learning rate) after it, with no error feedback in
    ``compressed_mean`` (the momentum already keeps what was not sent)::

      tx = optax.chain(optdist.compressed_mean(optdist.compressors.demo(), "data"),
                       optax.scale_by_sign(), optax.scale(-1e-3))

    State: ``m`` per compressed leaf, **per worker** (it differs across workers
    by design: "decoupled" momentum). Payload per leaf (gathered): ``topk``
    float32 coefficients and ``topk`` indices per tile, the indices in the
    smallest unsigned dtype holding ``chunk - 1`` (uint8 for ``chunk <= 256``).

    Args:
      chunk: tile length (``>= 1``).
      topk: coefficients kept per tile, in ``[1, chunk]``.
      beta: momentum decay in ``[0, 1)``.

    Returns:
      A :class:`~optdist.compression.Compressor`.

    References:
      Peng, Quesnelle, Kingma, "DeMo: Decoupled Momentum Optimization", 2024.
    """
    chunk = _checks.positive_int(chunk, "chunk")
    topk = _checks.positive_int(topk, "topk")
    if topk > chunk:
        raise ValueError(f"topk must be <= chunk ({chunk}); got {topk}.")
    beta = _checks.in_range(beta, "beta", 0.0, 1.0, high_open=True)
    basis = dct_matrix(chunk).astype(np.float32)
    index_dtype = smallest_int(chunk - 1, signed=False)

    def tiles(v):
        return jnp.pad(v, (0, -v.shape[0] % chunk)).reshape(-1, chunk)

    def inverse(coef, size):
        return (coef @ jnp.asarray(basis, coef.dtype)).reshape(-1)[:size]

    def scatter(payload):
        values, idx = payload["values"], payload["indices"].astype(jnp.int32)
        rows = jnp.arange(values.shape[0])[:, None]
        return jnp.zeros((values.shape[0], chunk), values.dtype).at[rows, idx].set(values)

    def encode(x, key, m):
        del key
        m = beta * m + x
        coef = tiles(m) @ jnp.asarray(basis, m.dtype).T
        _, idx = lax.top_k(jnp.abs(coef), topk)
        payload = {"values": jnp.take_along_axis(coef, idx, axis=1), "indices": idx.astype(index_dtype)}
        m = m - inverse(scatter(payload), m.shape[0])
        return payload, m

    def decode(payload, size):
        return inverse(scatter(payload), size)

    return gathered(f"demo({chunk}, {topk})", encode, decode, init_leaf=jnp.zeros_like)
