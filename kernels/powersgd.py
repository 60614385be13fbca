r"""PowerSGD's bandwidth-bound steps, fused: EF add + projection, decode + residual, and small-rank
Gram–Schmidt.

PowerSGD (``optdist.compressors.powersgd``) runs, per batch of same-shaped matrices ``[B, R, C]``
with rank ``r`` (``Q`` ``[B, C, r]`` warm-started and identical on every worker):

.. math:: M = G + E,\quad P = M Q \;(\text{all-reduce}),\quad \hat P = \mathrm{orth}(P),\quad
          Q' = M^\top \hat P \;(\text{all-reduce}),\quad D = \hat P Q'^\top,\quad E' = M - D.

The residual uses the *all-reduced* :math:`Q'` (the globally decoded value, as in the paper), so
:math:`M^\top \hat P` and the residual write are separated by a collective and cannot share a pass
over ``M``. The passes that can be fused are:

* :func:`ef_project`: ``M = G + E`` and ``P = M Q`` in one read of ``G`` and ``E`` (writes ``M``,
  which the two later passes read, and the small ``P``). Unfused: read ``G, E``, write ``M``, read
  ``M`` again for the product.
* :func:`decode_residual`: ``D = P Qᵀ`` and ``E' = M - D`` in one read of ``M`` (writes ``D``, the
  compressor's output, and ``E'``). Unfused: write ``D``, then read ``M`` and ``D``, write ``E'``.
* :func:`gram_schmidt`: modified Gram–Schmidt of ``[B, m, r]`` (``r <= 8``), one program per matrix
  with the whole factor on chip (``next_pow2(m) * next_pow2(r) <= 2**16``).

:math:`M^\top \hat P` itself stays an XLA dot (a plain matrix product, nothing to fuse with).

The rank is small (PowerSGD uses ``r <= 8`` in practice), so the kernels compute the products as
``r`` broadcast-multiply + row-reductions (``P``) and ``r`` outer-product updates (``D``) in float32,
not as tensor-core dots: they are bandwidth bound, need no dims ``>= 16`` and run in IEEE float32
(the XLA references are ``jnp.matmul`` at ``HIGHEST`` precision, so results agree to float32
rounding, not bit for bit). Each program owns ``bm`` rows and walks the columns in chunks of ``bc``;
rows/columns that are not a multiple of the block are zero-padded first (a copy, only for ragged
shapes); ``r`` is padded to a power of two inside the small factors.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from optdist_kernels import _dispatch

MAX_RANK = 8
MAX_ORTHO_ELEMENTS = 1 << 16
_MAX_ROWS = 16
_MAX_COLS = 256


def _block(n: int, cap: int, floor: int) -> tuple[int, int]:
    """``(block, padded n)``: the largest power of two ``<= cap`` dividing ``n`` if it is ``>= floor``
    (no padding), else ``min(cap, next_pow2(n))`` with ``n`` padded to a multiple of it."""
    b = min(cap, n & -n)
    if b >= floor or b == n:
        return b, n
    b = min(cap, _dispatch.next_pow2(n))
    return b, -(-n // b) * b


def _pad_to(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    pads = [(0, t - s) for s, t in zip(x.shape, shape)]
    return jnp.pad(x, pads) if any(p for _, p in pads) else x


def _f32(x: jax.Array) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


def _check_batch(m_like: jax.Array, q: jax.Array, name: str) -> tuple[int, int, int, int]:
    if m_like.ndim != 3 or q.ndim != 3 or q.shape[:2] != (m_like.shape[0], m_like.shape[2]):
        raise ValueError(
            f"{name}: expected matrices [B, R, C] and a factor [B, C, r]; got {m_like.shape} and {q.shape}."
        )
    b, rows, cols = m_like.shape
    rank = q.shape[2]
    if not 1 <= rank <= MAX_RANK:
        raise ValueError(f"{name}: the rank must be in [1, {MAX_RANK}]; got {rank}.")
    return b, rows, cols, rank


# ---------------------------------------------------------------------------------------------------
# References (the XLA path).

_HIGHEST = lax.Precision.HIGHEST


def _ef_project_xla(g, e, q):
    m = _f32(g) + _f32(e)
    return m, jnp.matmul(m, _f32(q), precision=_HIGHEST)


def _decode_residual_xla(m, p, q):
    d = jnp.matmul(_f32(p), jnp.swapaxes(_f32(q), 1, 2), precision=_HIGHEST)
    return d, _f32(m) - d


def _gram_schmidt_columns(col, rank: int, store) -> None:
    """Modified Gram–Schmidt over ``col(j)`` (``[.., m]``); ``store(j, q_j)``; zero columns stay zero."""
    qs = []
    for j in range(rank):
        c = col(j)
        for qi in qs:
            c = c - jnp.sum(qi * c, axis=-1, keepdims=True) * qi
        norm = jnp.sqrt(jnp.sum(c * c, axis=-1, keepdims=True))
        c = c / jnp.where(norm > 0.0, norm, 1.0)
        qs.append(c)
        store(j, c)


def gram_schmidt_reference(p: jax.Array) -> jax.Array:
    """Orthonormal columns of ``p`` (``[..., m, r]``, any rank and float dtype, dtype kept) in plain
    JAX: the math of :func:`gram_schmidt`, also the fallback for factors the kernel cannot take."""
    out = [None] * p.shape[-1]

    def store(j, c):
        out[j] = c

    _gram_schmidt_columns(lambda j: p[..., j], p.shape[-1], store)
    return jnp.stack(out, axis=-1)


def _gram_schmidt_xla(p):
    return gram_schmidt_reference(_f32(p))


# ---------------------------------------------------------------------------------------------------
# Pallas kernels.


def _layout(rows: int, cols: int, rank: int) -> tuple[int, int, int, int, int]:
    bm, rows_p = _block(rows, _MAX_ROWS, 8)
    bc, cols_p = _block(cols, _MAX_COLS, 32)
    return bm, rows_p, bc, cols_p, _dispatch.next_pow2(rank)


def _ef_project_pallas(g, e, q, *, interpret: bool, poison: bool = False):
    from jax.experimental import pallas as pl

    b, rows, cols, rank = _check_batch(g, q, "ef_project")
    bm, rows_p, bc, cols_p, r_p = _layout(rows, cols, rank)
    g2 = _pad_to(_f32(g), (b, rows_p, cols_p))
    e2 = _pad_to(_f32(e), (b, rows_p, cols_p))
    qt = _pad_to(jnp.swapaxes(_f32(q), 1, 2), (b, r_p, cols_p))  # [B, r_p, C_p]: rows of Qᵀ contiguous

    def kernel(g_ref, e_ref, q_ref, m_ref, p_ref):
        lane = lax.broadcasted_iota(jnp.int32, (bm, r_p), 1)

        def chunk(j, acc):
            sl = pl.ds(pl.multiple_of(j * bc, bc), bc)
            x = g_ref[:, sl] + e_ref[:, sl]
            m_ref[:, sl] = x
            for k in range(rank):  # P[:, k] += X · Qᵀ[k] (row reductions; r is small)
                s = jnp.sum(x * q_ref[k, sl][None, :], axis=1)
                acc = acc + jnp.where(lane == k, s[:, None], 0.0)
            return acc

        p_ref[...] = lax.fori_loop(0, cols_p // bc, chunk, jnp.zeros((bm, r_p), jnp.float32))

    strip = pl.BlockSpec((None, bm, cols_p), lambda i, j: (i, j, 0))
    m, p = _dispatch.call_kernel(
        kernel,
        [g2, e2, qt],
        [strip, strip, pl.BlockSpec((None, r_p, cols_p), lambda i, j: (i, 0, 0))],
        [
            jax.ShapeDtypeStruct((b, rows_p, cols_p), jnp.float32),
            jax.ShapeDtypeStruct((b, rows_p, r_p), jnp.float32),
        ],
        [strip, pl.BlockSpec((None, bm, r_p), lambda i, j: (i, j, 0))],
        (b, rows_p // bm),
        interpret=interpret,
        poison=poison,
    )
    return m[:, :rows, :cols], p[:, :rows, :rank]


def _decode_residual_pallas(m, p, q, *, interpret: bool, poison: bool = False):
    from jax.experimental import pallas as pl

    b, rows, cols, rank = _check_batch(m, q, "decode_residual")
    bm, rows_p, bc, cols_p, r_p = _layout(rows, cols, rank)
    m2 = _pad_to(_f32(m), (b, rows_p, cols_p))
    p2 = _pad_to(_f32(p), (b, rows_p, r_p))
    qt = _pad_to(jnp.swapaxes(_f32(q), 1, 2), (b, r_p, cols_p))

    def kernel(m_ref, p_ref, q_ref, d_ref, e_ref):
        pcols = [p_ref[:, k][:, None] for k in range(rank)]

        def chunk(j, carry):
            sl = pl.ds(pl.multiple_of(j * bc, bc), bc)
            d = pcols[0] * q_ref[0, sl][None, :]
            for k in range(1, rank):
                d = d + pcols[k] * q_ref[k, sl][None, :]
            d_ref[:, sl] = d
            e_ref[:, sl] = m_ref[:, sl] - d
            return carry

        lax.fori_loop(0, cols_p // bc, chunk, 0)

    strip = pl.BlockSpec((None, bm, cols_p), lambda i, j: (i, j, 0))
    d, e_new = _dispatch.call_kernel(
        kernel,
        [m2, p2, qt],
        [
            strip,
            pl.BlockSpec((None, bm, r_p), lambda i, j: (i, j, 0)),
            pl.BlockSpec((None, r_p, cols_p), lambda i, j: (i, 0, 0)),
        ],
        [jax.ShapeDtypeStruct((b, rows_p, cols_p), jnp.float32)] * 2,
        [strip, strip],
        (b, rows_p // bm),
        interpret=interpret,
        poison=poison,
    )
    return d[:, :rows, :cols], e_new[:, :rows, :cols]


def _gram_schmidt_pallas(p, *, interpret: bool, poison: bool = False):
    from jax.experimental import pallas as pl

    b, m, rank = p.shape
    m_p, r_p = _dispatch.next_pow2(m), _dispatch.next_pow2(rank)
    if m_p * r_p > MAX_ORTHO_ELEMENTS:
        raise ValueError(
            f"the Pallas Gram-Schmidt kernel keeps a factor on chip: next_pow2(m) * next_pow2(r) <= "
            f"{MAX_ORTHO_ELEMENTS}; got m={m}, r={rank}."
        )
    p2 = _pad_to(_f32(p), (b, m_p, r_p))  # zero rows/columns change no inner product

    def kernel(p_ref, o_ref):
        def store(j, c):
            o_ref[:, j] = c

        _gram_schmidt_columns(lambda j: p_ref[:, j], rank, store)
        for j in range(rank, r_p):
            o_ref[:, j] = jnp.zeros((m_p,), jnp.float32)

    block = pl.BlockSpec((None, m_p, r_p), lambda i: (i, 0, 0))
    (out,) = _dispatch.call_kernel(
        kernel,
        [p2],
        [block],
        [jax.ShapeDtypeStruct((b, m_p, r_p), jnp.float32)],
        [block],
        (b,),
        interpret=interpret,
        poison=poison,
    )
    return out[:, :m, :rank]


# ---------------------------------------------------------------------------------------------------
# Public API.


def ef_project(
    g: jax.Array, e: jax.Array, q: jax.Array, *, impl: str = "auto"
) -> tuple[jax.Array, jax.Array]:
    """Fused error-feedback add + projection: ``M = G + E`` and ``P = M Q`` (float32).

    Args:
      g: gradients ``[B, R, C]``.
      e: residuals ``[B, R, C]``.
      q: right factors ``[B, C, r]``, ``1 <= r <= 8``.
      impl: ``"auto"``, ``"pallas"`` or ``"xla"``.

    Returns:
      ``(m, p)``: ``[B, R, C]`` and ``[B, R, r]``.

    Example::

      m, p = ef_project(grads, residuals, q)
    """
    _check_batch(g, q, "ef_project")
    if e.shape != g.shape:
        raise ValueError(f"ef_project: e must have the shape of g {g.shape}; got {e.shape}.")
    return _dispatch.dispatch(
        "powersgd_ef_project",
        impl,
        _ef_project_pallas,
        _ef_project_xla,
        g,
        e,
        q,
    )


def decode_residual(
    m: jax.Array, p: jax.Array, q: jax.Array, *, impl: str = "auto"
) -> tuple[jax.Array, jax.Array]:
    """Fused decode + residual: ``D = P Qᵀ`` and ``E' = M - D`` in one read of ``M`` (float32).

    Args:
      m: the error-corrected matrices ``[B, R, C]`` (from :func:`ef_project`).
      p: orthonormalized left factors ``[B, R, r]``.
      q: all-reduced right factors ``[B, C, r]``.
      impl: ``"auto"``, ``"pallas"`` or ``"xla"``.

    Returns:
      ``(decoded, e_new)``, both ``[B, R, C]``.
    """
    _check_batch(m, q, "decode_residual")
    if p.shape != (*m.shape[:2], q.shape[2]):
        raise ValueError(f"decode_residual: p must be {(*m.shape[:2], q.shape[2])}; got {p.shape}.")
    return _dispatch.dispatch(
        "powersgd_decode_residual",
        impl,
        _decode_residual_pallas,
        _decode_residual_xla,
        m,
        p,
        q,
    )


def gram_schmidt(p: jax.Array, *, impl: str = "auto") -> jax.Array:
    """Orthonormal columns of each ``[m, r]`` factor of a batch ``[B, m, r]`` (modified Gram–Schmidt).

    Columns are processed left to right; a column that becomes zero stays zero (no NaN). The Pallas
    path keeps one factor per program on chip (``next_pow2(m) * next_pow2(r) <= 2**16``); larger
    factors use XLA under ``"auto"`` and raise under ``"pallas"``.

    Args:
      p: ``[B, m, r]`` with ``1 <= r <= 8``.
      impl: ``"auto"``, ``"pallas"`` or ``"xla"``.

    Returns:
      ``[B, m, r]`` float32 with orthonormal (or zero) columns.
    """
    if p.ndim != 3 or not 1 <= p.shape[2] <= MAX_RANK:
        raise ValueError(f"gram_schmidt: expected [B, m, r] with 1 <= r <= {MAX_RANK}; got {p.shape}.")
    return _dispatch.dispatch(
        "powersgd_gram_schmidt",
        impl,
        _gram_schmidt_pallas,
        _gram_schmidt_xla,
        p,
    )
