"""DeMo: decoupled momentum; send the top-k DCT coefficients of momentum tiles."""

from __future__ import annotations

import math

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


def _tile_side(dim: int, target: int) -> int:
    """The largest divisor of ``dim`` that is at most ``target`` (tiles never need padding); 1 for an
    empty dimension (a zero-element leaf is never compressed, it only gets sized)."""
    return max((c for c in range(1, min(dim, target) + 1) if dim % c == 0), default=1)


def _as_matrix(shape: tuple[int, ...]) -> tuple[int, int]:
    """Vectors are one row; tensors of rank > 2 are (prod(leading dims), last dim)."""
    if len(shape) <= 1:
        return 1, math.prod(shape)
    return math.prod(shape[:-1]), shape[-1]


def demo(chunk: int = 64, topk: int = 32, beta: float = 0.999) -> Compressor:
    r"""DeMo's compressor: momentum, 2-D DCT over tiles, top-k per tile, remove what was sent.

    Per leaf, with a per-worker momentum ``m`` (the compressor's state):

    .. math::
        m \leftarrow \beta m + x, \quad C_t = D_h M_t D_w^\top \text{ per tile } M_t, \quad
        \hat C_t = \mathrm{top}_k(C_t), \quad m \leftarrow m - \mathrm{IDCT}(\hat C), \quad
        \mathrm{mean} = \tfrac1n \sum_j \mathrm{IDCT}(\hat C^{(j)}),

    with :math:`D_s` the orthonormal DCT-II matrix of size :math:`s`. As in the reference
    implementation, a matrix ``R x C`` is cut into tiles of ``h x w`` where ``h`` (``w``) is the
    largest divisor of ``R`` (``C``) that is at most ``chunk`` (no padding), the DCT is 2-D per tile
    and the ``k = min(topk, h w)`` largest-magnitude coefficients of each tile are kept. A vector is
    one row (1-D DCT over tiles of ``w``); a tensor of rank > 2 is viewed as
    ``(prod(leading dims), last dim)``.
    Deviation: the reference implementation (``CompressDCT.batch_decompress``) averages each
    coefficient over the workers that sent it (``scatter_reduce(..., "mean", include_self=False)``)
    before one inverse DCT; here every coefficient's sum is divided by ``n``, the mean of the
    decoded messages (linear in each worker's message, like every other gathered compressor's
    mean). Under the sign that follows, the two differ where a coefficient is sent by some workers
    only.
    DeMo's update is the *sign* of this mean: chain ``optax.scale_by_sign()``
    (and the learning rate) after it, with no error feedback in
    ``compressed_mean`` (the momentum already keeps what was not sent)::

      tx = optax.chain(optdist.compressed_mean(optdist.compressors.demo(), "data"),
                       optax.scale_by_sign(), optax.scale(-1e-3))

    State: ``m`` per compressed leaf, in the leaf's shape, **per worker** (it differs across
    workers by design: "decoupled" momentum). Payload per leaf (gathered): ``k`` float32
    coefficients and ``k`` indices per tile, the indices in the smallest unsigned dtype holding
    ``h w - 1`` (uint8 up to 16 x 16 tiles).

    Args:
      chunk: target tile side (``>= 1``).
      topk: coefficients kept per tile (``>= 1``; capped at the tile's size).
      beta: momentum decay in ``[0, 1)``.

    Returns:
      A :class:`~optdist.compression.Compressor`.

    References:
      Peng, Quesnelle, Kingma, "DeMo: Decoupled Momentum Optimization", 2024.
    """
    chunk = _checks.positive_int(chunk, "chunk")
    topk = _checks.positive_int(topk, "topk")
    beta = _checks.in_range(beta, "beta", 0.0, 1.0, high_open=True)

    def layout(shape):
        rows, cols = _as_matrix(tuple(shape))
        h, w = _tile_side(rows, chunk), _tile_side(cols, chunk)
        return rows, cols, h, w, min(topk, h * w)

    def to_tiles(m, rows, cols, h, w):  # [rows, cols] -> [tiles, h, w]
        t = m.reshape(rows // h, h, cols // w, w).transpose(0, 2, 1, 3)
        return t.reshape(-1, h, w)

    def from_tiles(t, rows, cols, h, w):
        return t.reshape(rows // h, cols // w, h, w).transpose(0, 2, 1, 3).reshape(rows, cols)

    def spectra(m):
        rows, cols, h, w, _ = layout(m.shape)
        dh, dw = (jnp.asarray(dct_matrix(s), m.dtype) for s in (h, w))
        coef = dh @ to_tiles(m.reshape(rows, cols), rows, cols, h, w) @ dw.T
        return coef.reshape(coef.shape[0], h * w)

    def inverse(payload, shape, dtype):
        rows, cols, h, w, _ = layout(shape)
        values, idx = payload["values"], payload["indices"].astype(jnp.int32)
        tiles = jnp.arange(values.shape[0])[:, None]
        coef = jnp.zeros((values.shape[0], h * w), dtype).at[tiles, idx].set(values.astype(dtype))
        dh, dw = (jnp.asarray(dct_matrix(s), dtype) for s in (h, w))
        return from_tiles(dh.T @ coef.reshape(-1, h, w) @ dw, rows, cols, h, w).reshape(shape)

    def encode(x, key, m):
        del key
        m = beta * m + x
        coef = spectra(m)
        *_, h, w, k = layout(m.shape)
        _, idx = lax.top_k(jnp.abs(coef), k)
        index_dtype = smallest_int(h * w - 1, signed=False)
        payload = {"values": jnp.take_along_axis(coef, idx, axis=1), "indices": idx.astype(index_dtype)}
        return payload, m - inverse(payload, m.shape, m.dtype)

    def decode(payload, shape):
        return inverse(payload, shape, payload["values"].dtype)

    return gathered(f"demo({chunk}, {topk})", encode, decode, init_leaf=jnp.zeros_like, shaped=True)
