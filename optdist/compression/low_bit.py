r"""Low-bit codecs for pseudo-gradients and gradients: chunk-scaled 8 / 4 / 2-bit grids, and
SparseLoCo's chunk-wise top-k with low-bit values and compact indices.

Both are gathered compressors (every worker's packed payload is all-gathered, decoded in float32
and averaged), usable wherever a compressor is: ``optdist.compressed_mean``, or in an outer loop's
sync through ``optdist.aggregation.compressed(...)``.

Grids (values in units of the chunk's scale ``s``):

* ``"symmetric"``: the ``2^b - 1`` integers ``-L..L``, ``L = 2^{b-1} - 1``, times ``s / L`` (int8 with
  a zero: 255 levels; 4 bits: 15 levels; 2 bits: ``{-s, 0, s}``);
* ``"uniform"``: ``2^b`` evenly spaced levels from ``-s`` to ``s`` (2 bits: ``{-s, -s/3, s/3, s}``;
  no zero, every code used);
* ``"e2m1"``: the 4-bit float FP4 E2M1, magnitudes ``{0, 0.5, 1, 1.5, 2, 3, 4, 6}`` with a sign,
  times ``s / 6``.

Rounding ``"stochastic"`` picks one of the two neighbouring levels with the probability that makes
the code unbiased, :math:`\mathbb{E}[Q(x)] = x` for ``x`` within ``[-s, s]`` (with ``scale="max"``
every entry is); ``"nearest"`` rounds to the closest level (deterministic, biased). Codes are
bit-packed, ``8 / b`` per byte; each chunk adds one float32 scale.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from optdist import _checks
from optdist.compression.base import Compressor, gathered, pack_bits, unpack_bits

GRIDS = ("symmetric", "uniform", "e2m1")
_E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def grid_levels(bits: int, grid: str) -> np.ndarray:
    """The sorted levels of ``grid`` with ``bits`` bits, in units of the scale (max level 1)."""
    if grid == "symmetric":
        top = 2 ** (bits - 1) - 1
        return np.arange(-top, top + 1) / top
    if grid == "uniform":
        return np.linspace(-1.0, 1.0, 2**bits)
    if bits != 4:
        raise ValueError(f"grid='e2m1' is a 4-bit format; got bits={bits}.")
    return np.concatenate([-_E2M1[:0:-1], _E2M1]) / 6.0


def _round_to_grid(y: jax.Array, levels: np.ndarray, key: jax.Array | None) -> jax.Array:
    """Codes (indices into ``levels``) of ``y`` clipped to the grid; stochastic if ``key`` is given."""
    y = jnp.clip(y, levels[0], levels[-1])
    evenly = np.allclose(np.diff(levels), levels[1] - levels[0])
    if evenly:
        t = (y - levels[0]) / (levels[1] - levels[0])
        low = jnp.clip(jnp.floor(t), 0, len(levels) - 2)
        frac = t - low
    else:
        low = jnp.clip(sum((y >= v).astype(jnp.int32) for v in levels[1:-1]), 0, len(levels) - 2)
        lo, hi = jnp.asarray(levels, y.dtype)[low], jnp.asarray(levels, y.dtype)[low + 1]
        frac = (y - lo) / (hi - lo)
    up = frac >= 0.5 if key is None else jax.random.uniform(key, y.shape, y.dtype) < frac
    return (low + up).astype(jnp.int32)


def pack_codes(codes: jax.Array, bits: int) -> jax.Array:
    """Packs ``codes`` (each below ``2**bits``) into a flat uint8 vector, ``bits`` bits each."""
    planes = (codes.reshape(-1)[:, None] >> jnp.arange(bits, dtype=jnp.int32)) & 1
    return pack_bits(planes.reshape(-1).astype(bool))


def unpack_codes(packed: jax.Array, count: int, bits: int) -> jax.Array:
    """Inverse of :func:`pack_codes`: ``count`` codes as int32."""
    planes = unpack_bits(packed, count * bits).reshape(count, bits).astype(jnp.int32)
    return (planes << jnp.arange(bits, dtype=jnp.int32)).sum(axis=1)


def _validate_codec(bits: int, grid: str | None, chunk_size: int, rounding: str) -> str:
    if isinstance(bits, bool) or bits not in (2, 4, 8):
        raise ValueError(f"bits must be 2, 4 or 8; got {bits!r}.")
    grid = ("uniform" if bits == 2 else "symmetric") if grid is None else grid
    if grid not in GRIDS:
        raise ValueError(f"grid must be one of {GRIDS}; got {grid!r}.")
    grid_levels(bits, grid)  # raises for e2m1 with bits != 4
    _checks.positive_int(chunk_size, "chunk_size")
    if rounding not in ("stochastic", "nearest"):
        raise ValueError(f"rounding must be 'stochastic' or 'nearest'; got {rounding!r}.")
    return grid


def _chunk_shape(size: int, chunk_size: int) -> tuple[int, int]:
    """``(rows, width)`` of a flat leaf of ``size`` entries cut into chunks (a short leaf is one chunk)."""
    width = max(1, min(chunk_size, size))
    return -(-size // width), width


def _chunks(x: jax.Array, chunk_size: int) -> jax.Array:
    """``x`` (flat) zero-padded into ``[rows, width]`` chunks."""
    rows, width = _chunk_shape(x.size, chunk_size)
    return jnp.pad(x, (0, rows * width - x.size)).reshape(rows, width)


def quantize(
    bits: int,
    grid: str | None = None,
    *,
    chunk_size: int = 4096,
    scale: str = "max",
    sigmas: float = 6.0,
    rounding: str = "stochastic",
) -> Compressor:
    r"""Chunk-scaled low-bit quantization (INTELLECT-1's int8, Streaming DiLoCo's FP4, 2-bit).

    Each leaf is cut into chunks of ``chunk_size`` entries; chunk ``c`` gets the scale
    :math:`s_c = \max_j |x_j|` (``scale="max"``) or one range per leaf,
    :math:`s = \mathrm{sigmas} \cdot \mathrm{std}(x)` (``scale="sigma"``, entries beyond
    :math:`\pm s` are clipped: INTELLECT-1's ±6σ range), and every entry is rounded to the
    ``bits``-bit ``grid`` (see the module docstring) times the scale.

    .. math:: C(x)_j = s_c\, \ell_{q_j}, \qquad \mathbb{E}[C(x)] = x \ \text{(stochastic, no clipping)}

    Payload per leaf of ``d`` entries: ``ceil(d b / 8)`` bytes of packed codes plus one float32 scale
    per chunk; all-gathered, so a worker sends ``(n - 1)`` times that.

    Args:
      bits: 2, 4 or 8.
      grid: ``"symmetric"``, ``"uniform"`` or ``"e2m1"`` (4 bits); default ``"uniform"`` for 2 bits,
        ``"symmetric"`` otherwise.
      chunk_size: entries per scale.
      scale: ``"max"`` (per chunk, unbiased with stochastic rounding) or ``"sigma"`` (per leaf).
      sigmas: the range in standard deviations for ``scale="sigma"``.
      rounding: ``"stochastic"`` (per-worker keys) or ``"nearest"``.

    Returns:
      A :class:`~optdist.compression.Compressor`.

    References:
      Jaghouar et al., "INTELLECT-1 Technical Report", 2024 (int8 pseudo-gradients).
      Douillard et al., "Streaming DiLoCo with overlapping communication", 2025 (4-bit E2M1).
    """
    grid = _validate_codec(bits, grid, chunk_size, rounding)
    if scale not in ("max", "sigma"):
        raise ValueError(f"scale must be 'max' or 'sigma'; got {scale!r}.")
    sigmas = _checks.in_range(sigmas, "sigmas", 0.0, float("inf"), low_open=True, high_open=True)
    levels = grid_levels(bits, grid)

    def encode(x, key):
        rows = _chunks(x, chunk_size)
        if scale == "max":
            s = jnp.max(jnp.abs(rows), axis=1)
        else:
            s = jnp.full((rows.shape[0],), sigmas * jnp.std(x), x.dtype)
        y = rows / jnp.where(s > 0, s, 1.0)[:, None]
        codes = _round_to_grid(y, levels, key if rounding == "stochastic" else None)
        codes = codes.reshape(-1)[: x.size]  # the last chunk's padding is not sent
        return {"codes": pack_codes(codes, bits), "scale": s.astype(jnp.float32)}

    def decode(payload, size):
        rows, width = _chunk_shape(size, chunk_size)
        codes = unpack_codes(payload["codes"], size, bits)
        codes = jnp.pad(codes, (0, rows * width - size)).reshape(rows, width)
        values = jnp.asarray(levels, jnp.float32)[codes] * payload["scale"][:, None]
        return values.reshape(-1)[:size]

    name = f"quantize({bits}, {grid}, chunk={chunk_size}, {scale}, {rounding})"
    return gathered(name, encode, decode)


def chunked_top_k(
    density: float,
    chunk_size: int = 4096,
    value_bits: int = 2,
    grid: str | None = None,
    *,
    rounding: str = "nearest",
) -> Compressor:
    r"""SparseLoCo's codec: per chunk of ``chunk_size`` entries, the ``k = ceil(density · chunk)``
    largest magnitudes, their values on a ``value_bits``-bit grid scaled by the chunk's largest kept
    magnitude, and their positions as chunk-local indices of ``ceil(log2 chunk_size)`` bits.

    .. math:: C(x) = \sum_c \sum_{j \in \mathrm{top}_k(|x_c|)} s_c\, \ell_{q_j}\, e_j

    Payload per leaf with ``R`` chunks: ``ceil(R k b / 8)`` bytes of packed values,
    ``ceil(R k ⌈log2 chunk⌉ / 8)`` bytes of packed indices (12 bits each for 4096-entry chunks)
    and ``R`` float32 scales; all-gathered. Biased (top-k), so use it with error feedback: SparseLoCo
    is ``compressed(chunked_top_k(...), feedback="ef", error_decay=β)`` in an outer loop whose
    outer step is plain SGD (the decayed residual replaces DiLoCo's outer momentum).

    Args:
      density: fraction of each chunk kept, in (0, 1].
      chunk_size: entries per chunk (a leaf shorter than that is one chunk).
      value_bits: 2, 4 or 8 bits per kept value.
      grid: the value grid (see :func:`quantize`); default ``"uniform"`` at 2 bits.
      rounding: ``"nearest"`` (default) or ``"stochastic"``.

    Returns:
      A :class:`~optdist.compression.Compressor`.

    References:
      Sarfi, Thérien, Lidin, Belilovsky, "Communication Efficient LLM Pre-training with SparseLoCo",
      2025 (arXiv:2508.15706).
    """
    density = _checks.in_range(density, "density", 0.0, 1.0, low_open=True)
    grid = _validate_codec(value_bits, grid, chunk_size, rounding)
    levels = grid_levels(value_bits, grid)

    def geometry(size):
        """rows, width, kept per chunk, bits per chunk-local index."""
        rows, width = _chunk_shape(size, chunk_size)
        return rows, width, max(1, math.ceil(density * width - 1e-9)), max(1, (width - 1).bit_length())

    def encode(x, key):
        rows, width, k, index_bits = geometry(x.size)
        chunks = _chunks(x, chunk_size)
        _, idx = lax.top_k(jnp.abs(chunks), k)
        kept = jnp.take_along_axis(chunks, idx, axis=1)
        s = jnp.max(jnp.abs(kept), axis=1)
        y = kept / jnp.where(s > 0, s, 1.0)[:, None]
        codes = _round_to_grid(y, levels, key if rounding == "stochastic" else None)
        return {
            "values": pack_codes(codes, value_bits),
            "indices": pack_codes(idx, index_bits),
            "scale": s.astype(jnp.float32),
        }

    def decode(payload, size):
        rows, width, k, index_bits = geometry(size)
        codes = unpack_codes(payload["values"], rows * k, value_bits).reshape(rows, k)
        idx = unpack_codes(payload["indices"], rows * k, index_bits).reshape(rows, k)
        values = jnp.asarray(levels, jnp.float32)[codes] * payload["scale"][:, None]
        dense = jnp.zeros((rows, width), jnp.float32)
        dense = dense.at[jnp.arange(rows)[:, None], idx].set(values)
        return dense.reshape(-1)[:size]

    name = f"chunked_top_k({density}, chunk={chunk_size}, {value_bits} bits, {grid})"
    return gathered(name, encode, decode)
