r"""Storage of Shampoo's symmetric matrices: float dtypes, or integer codes with scales.

A float storage dtype (``float32``, ``bfloat16``, ...) stores the matrix cast to it. An integer
dtype (``int8`` or ``int16``) stores a :class:`QuantizedMatrices`, the memory-reduction layout of
Anil et al.: the diagonal in float32 and the off-diagonal part as integer codes with one float32
scale per column,

.. math:: A_{ij} \approx q_{ij}\, s_j \ (i \ne j), \qquad s_j = \max_{i \ne j} |A_{ij}| / q_{\max},
          \qquad q_{ij} = \mathrm{round}(A_{ij} / s_j),

so the per-entry error is at most :math:`s_j / 2` (relative to the column's largest off-diagonal
entry: :math:`1/254` for int8, :math:`1/65534` for int16) and the diagonal, which dominates a
PSD matrix, is exact. Memory per ``s x s`` matrix: ``s² + 8 s`` bytes (int8) vs ``4 s²`` (float32).

Rounding is to nearest, so re-encoding a decoded matrix gives the same codes. For *statistics*
updated as an exponential average, an update smaller than half a code step is lost: with
``beta2 = 0.999`` the per-step change is about :math:`10^{-3}` of the matrix, below int8's
resolution, so int8 suits preconditioners (recomputed, not accumulated) and int16 suits statistics.

References:
  Anil, R., Gupta, V., Koren, T., Regan, K., Singer, Y. "Scalable Second Order Optimization for Deep
  Learning", 2020 (memory-reduction mode: quantized statistics and preconditioners, float diagonal).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

INTEGER_DTYPES = (np.dtype(np.int8), np.dtype(np.int16))


class QuantizedMatrices(NamedTuple):
    """Symmetric matrices ``[..., s, s]`` as integer off-diagonal codes, column scales, float diagonal."""

    codes: jax.Array  # int8 / int16 [..., s, s], zero on the diagonal
    scales: jax.Array  # float32 [..., s], one per column
    diagonal: jax.Array  # float32 [..., s]


def check_dtype(dtype: Any, name: str) -> np.dtype | None:
    """Validates a storage dtype argument (None: the compute dtype)."""
    if dtype is None:
        return None
    try:
        dt = np.dtype(dtype)
    except TypeError:
        dt = None
    if dt is None or not (jnp.issubdtype(dt, jnp.floating) or dt in INTEGER_DTYPES):
        raise ValueError(
            f"{name} must be None, a floating dtype (e.g. jnp.bfloat16) or jnp.int8 / jnp.int16 for "
            f"quantized storage; got {dtype!r}."
        )
    return dt


def encode(x: jax.Array, dtype: np.dtype) -> jax.Array | QuantizedMatrices:
    """Stores ``x`` (``[..., s, s]``, symmetric) in ``dtype``."""
    if np.dtype(dtype) not in INTEGER_DTYPES:
        return x.astype(dtype)
    qmax = float(np.iinfo(dtype).max)
    x = x.astype(jnp.float32)
    eye = jnp.eye(x.shape[-1], dtype=bool)
    off = jnp.where(eye, 0.0, x)
    scales = jnp.max(jnp.abs(off), axis=-2) / qmax
    safe = jnp.where(scales > 0, scales, 1.0)
    codes = jnp.clip(jnp.round(off / safe[..., None, :]), -qmax, qmax).astype(dtype)
    return QuantizedMatrices(codes, scales, jnp.diagonal(x, axis1=-2, axis2=-1))


def decode(stored: jax.Array | QuantizedMatrices, dtype: Any) -> jax.Array:
    """The matrices in the compute ``dtype``."""
    if not isinstance(stored, QuantizedMatrices):
        return stored.astype(dtype)
    off = stored.codes.astype(dtype) * stored.scales.astype(dtype)[..., None, :]
    s = stored.codes.shape[-1]
    return off + jnp.eye(s, dtype=dtype) * stored.diagonal.astype(dtype)[..., None, :]


def dtype_of(stored: jax.Array | QuantizedMatrices) -> np.dtype:
    """The storage dtype ``stored`` was encoded with."""
    return np.dtype((stored.codes if isinstance(stored, QuantizedMatrices) else stored).dtype)


def select(ok: jax.Array, new: Any, old: Any) -> Any:
    """Per matrix ``ok[...]``: ``new`` where true else ``old`` (same storage layout)."""

    def pick(n, o):
        mask = jnp.reshape(ok, ok.shape + (1,) * (o.ndim - ok.ndim))
        return jnp.where(mask, n, o)

    return jax.tree_util.tree_map(pick, new, old)


def take(stored: Any, rows: jax.Array | None) -> Any:
    """Rows ``[rows]`` of the leading (block) axis of every array of ``stored``."""
    return stored if rows is None else jax.tree_util.tree_map(lambda x: x[rows], stored)


def put(stored: Any, rows: jax.Array | None, value: Any) -> Any:
    """``stored`` with rows ``[rows]`` replaced by ``value`` (same layout)."""
    if rows is None:
        return jax.tree_util.tree_map(lambda s, v: v.astype(s.dtype), stored, value)
    return jax.tree_util.tree_map(lambda s, v: s.at[rows].set(v.astype(s.dtype)), stored, value)
