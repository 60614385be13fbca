r"""Fused error feedback + threshold top-k (no full sort).

With :math:`p = g + e` (flattened, length ``d``) and a target of ``k`` kept entries:

1. **Threshold estimate.** ``sample_size`` coordinates drawn from ``key`` give order statistics of
   :math:`|p|`; ``T = 8`` candidate thresholds are read at kept fractions :math:`(k/d)\,2^{f}`,
   :math:`f \in [-1, 1]`.
2. **Count pass** (one read of ``g`` and ``e``): per block of entries, how many :math:`|p_j| \ge t_m`
   for all ``T`` candidates at once. The accepted threshold is the lowest one with
   :math:`k(1 - \mathrm{tol}) \le \mathrm{count} \le \mathrm{capacity}`
   (``capacity = floor(k (1 + tol))`` by default). If none is, the bracket between the candidates just
   above and below the capacity is split into ``T`` new candidates and counted again (at most
   ``max_refine`` times). Then the lowest threshold with ``count <= capacity`` wins if its count is
   within tolerance or no threshold overflowed; otherwise the overflowing threshold with the fewest
   entries wins and is truncated to the capacity (ties, e.g. many equal magnitudes, need this).
3. **Write pass** (one read of ``g``, ``e``; writes ``e_new`` and the kept entries): entry ``j`` is kept
   iff :math:`|p_j| \ge t` and fewer than ``capacity`` kept entries precede it (index order). Kept
   entries go to slot ``#{kept entries before j}`` of the fixed-capacity ``values``/``indices``
   buffers (slots from ``count`` on hold zeros); :math:`e_{\mathrm{new}} = p` off the kept set and 0 on it,
   so :math:`e_{\mathrm{new}} + \mathrm{scatter}(values) = p` exactly (error feedback loses nothing).

Slots come from a per-block count (pass 2's counts for the chosen threshold), an exclusive prefix sum
over blocks (tiny), and an in-block ``cumsum``; the kernel then scatters with masked stores.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from optdist_kernels import _dispatch
from optdist_kernels.quantize import layout

_LANES = 256
_BLOCK_ROWS = 16
_NUM_CANDIDATES = 8
_BIG = np.iinfo(np.int32).max


def _flat_rows(x: jax.Array, rows: int) -> jax.Array:
    flat = x.reshape(-1).astype(jnp.float32)
    pad = rows * _LANES - flat.shape[0]
    return (jnp.pad(flat, (0, pad)) if pad else flat).reshape(rows, _LANES)


def _block_index(row0, nrows: int) -> jax.Array:
    r = jax.lax.broadcasted_iota(jnp.int32, (nrows, _LANES), 0) + row0
    return r * _LANES + jax.lax.broadcasted_iota(jnp.int32, (nrows, _LANES), 1)


def _candidate_vector(counts: list) -> jax.Array:
    """Stacks ``T`` scalar counts into a vector with iota/select only (Triton has no scalar stack)."""
    lane = jax.lax.broadcasted_iota(jnp.int32, (len(counts),), 0)
    return functools.reduce(jnp.add, [jnp.where(lane == m, c, 0) for m, c in enumerate(counts)])


def _slots(mask: jax.Array, offset) -> jax.Array:
    """Global slot of each entry of a ``[R, C]`` block: ``offset`` + #kept entries before it (row-major)."""
    m = mask.astype(jnp.int32)
    in_row = jnp.cumsum(m, axis=1)
    row_total = jnp.sum(m, axis=1)
    row_offset = jnp.cumsum(row_total, axis=0) - row_total
    return offset + row_offset[:, None] + in_row - 1


# --- passes: XLA references ---------------------------------------------------------------------


def _count_xla(g2, e2, thresholds, *, d: int, block: int):
    a = jnp.abs(g2 + e2)
    valid = _block_index(0, g2.shape[0]) < d
    a = jnp.where(valid, a, -1.0).reshape(-1, block * _LANES)
    return jnp.sum(a[:, :, None] >= thresholds, axis=1, dtype=jnp.int32)


def _select_xla(g2, e2, threshold, offsets, *, d: int, block: int, cap: int, cap_buf: int):
    del offsets, block
    p = g2 + e2
    idx = _block_index(0, g2.shape[0])
    mask = (jnp.abs(p) >= threshold[0]) & (idx < d)
    slot = jnp.cumsum(mask.reshape(-1), dtype=jnp.int32).reshape(mask.shape) - 1
    kept = mask & (slot < cap)
    where = jnp.where(kept, slot, cap_buf).reshape(-1)
    values = jnp.zeros((cap_buf,), jnp.float32).at[where].set(p.reshape(-1), mode="drop")
    indices = jnp.zeros((cap_buf,), jnp.int32).at[where].set(idx.reshape(-1), mode="drop")
    return values, indices, jnp.where(kept, 0.0, p)


# --- passes: Pallas kernels ---------------------------------------------------------------------


def _count_pallas(g2, e2, thresholds, *, d: int, block: int, interpret: bool, poison: bool = False):
    from jax.experimental import pallas as pl

    rows, T = g2.shape[0], thresholds.shape[0]

    def kernel(g_ref, e_ref, t_ref, o_ref):
        a = jnp.abs(g_ref[...] + e_ref[...])
        valid = _block_index(pl.program_id(0) * block, block) < d
        # Row sums then a column sum: one-axis reductions only (the Triton-friendly form).
        counts = [jnp.sum(jnp.sum(jnp.where(valid & (a >= t_ref[m]), 1, 0), axis=1)) for m in range(T)]
        o_ref[...] = _candidate_vector(counts)

    rowspec = pl.BlockSpec((block, _LANES), lambda i: (i, 0))
    (out,) = _dispatch.call_kernel(
        kernel,
        [g2, e2, thresholds],
        [rowspec, rowspec, pl.BlockSpec((T,), lambda i: (0,))],
        [jax.ShapeDtypeStruct((rows // block * T,), jnp.int32)],
        [pl.BlockSpec((T,), lambda i: (i,))],
        (rows // block,),
        interpret=interpret,
        poison=poison,
    )
    return out.reshape(-1, T)


def _masked_store(ref, idx, value, mask):
    from jax.experimental.pallas import triton as plt

    plt.store(ref.at[idx], value, mask=mask)


def _select_pallas(
    g2, e2, threshold, offsets, *, d: int, block: int, cap: int, cap_buf: int, interpret: bool,
    poison: bool = False,
):  # fmt: skip
    from jax.experimental import pallas as pl

    rows = g2.shape[0]

    def kernel(g_ref, e_ref, t_ref, off_ref, v_ref, i_ref, enew_ref):
        p = g_ref[...] + e_ref[...]
        idx = _block_index(pl.program_id(0) * block, block)
        mask = (jnp.abs(p) >= t_ref[0]) & (idx < d)
        slot = _slots(mask, off_ref[0])
        kept = mask & (slot < cap)
        safe = jnp.where(kept, slot, cap_buf)  # masked lanes: out of range, never written
        _masked_store(v_ref, safe, p, kept)
        _masked_store(i_ref, safe, idx, kept)
        enew_ref[...] = jnp.where(kept, 0.0, p)

    rowspec = pl.BlockSpec((block, _LANES), lambda i: (i, 0))
    whole = pl.BlockSpec((cap_buf,), lambda i: (0,))
    values, indices, e_new = _dispatch.call_kernel(
        kernel,
        [g2, e2, threshold, offsets],
        [rowspec, rowspec, pl.BlockSpec((1,), lambda i: (0,)), pl.BlockSpec((1,), lambda i: (i,))],
        [
            jax.ShapeDtypeStruct((cap_buf,), jnp.float32),
            jax.ShapeDtypeStruct((cap_buf,), jnp.int32),
            jax.ShapeDtypeStruct((rows, _LANES), jnp.float32),
        ],
        [whole, whole, rowspec],
        (rows // block,),
        interpret=interpret,
        poison=poison,
        initial={0: jnp.zeros((cap_buf,), jnp.float32), 1: jnp.zeros((cap_buf,), jnp.int32)},
    )
    return values, indices, e_new


# --- driver (shared by both paths) ----------------------------------------------------------------


def _topk(
    g, e, key, *, k: int, cap: int, tol: float, sample_size: int, max_refine: int, pallas: bool,
    interpret: bool = False, poison: bool = False,
):  # fmt: skip
    d = g.size
    rows, block = layout(d, _LANES, _BLOCK_ROWS)
    cap_buf = _dispatch.next_pow2(cap)
    g2, e2 = _flat_rows(g, rows), _flat_rows(e, rows)
    if pallas:
        count = functools.partial(_count_pallas, d=d, block=block, interpret=interpret, poison=poison)
        select = functools.partial(
            _select_pallas, d=d, block=block, cap=cap, cap_buf=cap_buf, interpret=interpret, poison=poison
        )
    else:
        count = functools.partial(_count_xla, d=d, block=block)
        select = functools.partial(_select_xla, d=d, block=block, cap=cap, cap_buf=cap_buf)

    # 1. Candidates from the order statistics of a sample of |p|.
    s = min(sample_size, d)
    pick = jax.random.randint(key, (s,), 0, d)
    sample = jnp.sort(jnp.abs(g.reshape(-1)[pick].astype(jnp.float32) + e.reshape(-1)[pick]))[::-1]
    frac = (k / d) * np.exp2(np.linspace(-1.0, 1.0, _NUM_CANDIDATES))
    ranks = np.clip(np.floor(frac * s).astype(np.int32), 0, s - 1)
    thresholds = sample[ranks][::-1]  # ascending
    low = math.ceil(k * (1.0 - tol))

    # 2. Count passes. Track the best fitting candidate (most entries with count <= cap) and the best
    # overflowing one (fewest entries with count > cap).
    def evaluate(thresholds, fit, over):
        per_block = count(g2, e2, thresholds)  # [blocks, T]
        totals = jnp.sum(per_block, axis=0)
        fits = totals <= cap
        # Candidates ascend, so counts descend: the first that fits has the most entries, the last
        # that overflows the fewest.
        f = jnp.argmax(fits)
        o = jnp.maximum(jnp.sum(~fits) - 1, 0)
        f_new = (thresholds[f], per_block[:, f], jnp.where(fits[f], totals[f], -1))
        o_new = (thresholds[o], per_block[:, o], jnp.where(fits[o], _BIG, totals[o]))
        pick = lambda take, new, old: jax.tree_util.tree_map(lambda n, x: jnp.where(take, n, x), new, old)
        fit = pick(f_new[2] > fit[2], f_new, fit)
        over = pick(o_new[2] < over[2], o_new, over)
        # Bracket for refinement: highest threshold that overflows, lowest that fits.
        t_lo = jnp.max(jnp.where(fits, -jnp.inf, thresholds))
        t_hi = jnp.min(jnp.where(fits, thresholds, jnp.inf))
        t_lo = jnp.where(jnp.isfinite(t_lo), t_lo, 0.0)
        t_hi = jnp.where(jnp.isfinite(t_hi), t_hi, 4.0 * t_lo + jnp.finfo(jnp.float32).tiny)
        return fit, over, (t_lo, t_hi)

    nblocks = rows // block
    blocks0 = jnp.zeros((nblocks,), jnp.int32)
    fit, over, bracket = evaluate(
        thresholds, (jnp.float32(0.0), blocks0, jnp.int32(-1)), (jnp.float32(0.0), blocks0, jnp.int32(_BIG))
    )

    def cond(carry):
        i, fit, _, _ = carry
        return (i < max_refine) & (fit[2] < low)

    def body(carry):
        i, fit, over, (t_lo, t_hi) = carry
        steps = jnp.arange(1, _NUM_CANDIDATES + 1, dtype=jnp.float32) / (_NUM_CANDIDATES + 1)
        fit, over, bracket = evaluate(t_lo + (t_hi - t_lo) * steps, fit, over)
        return i + 1, fit, over, bracket

    _, fit, over, _ = jax.lax.while_loop(cond, body, (jnp.int32(0), fit, over, bracket))
    # Within tolerance, or nothing overflowed: the fitting candidate; else the overflowing one
    # (truncated to the capacity; ties make this the only way to send anything).
    use_fit = (fit[2] >= low) | (over[2] == _BIG)
    threshold, per_block, total = jax.tree_util.tree_map(lambda a, b: jnp.where(use_fit, a, b), fit, over)

    # 3. Write pass.
    offsets = (jnp.cumsum(per_block) - per_block).astype(jnp.int32)
    values, indices, e_new = select(g2, e2, threshold[None], offsets)
    n = jnp.minimum(total, cap).astype(jnp.int32)
    e_flat = e_new.reshape(-1)
    payload = {"values": values[:cap], "indices": indices[:cap], "count": n}
    return payload, (e_flat if e_flat.shape[0] == d else e_flat[:d]), threshold


def ef_threshold_topk(
    g: jax.Array,
    e: jax.Array,
    key: jax.Array,
    k: int,
    *,
    capacity: int | None = None,
    tol: float = 0.1,
    sample_size: int = 4096,
    max_refine: int = 4,
    impl: str = "auto",
) -> tuple[dict, jax.Array]:
    """Fused error feedback + threshold top-k of ``p = g + e`` (see the module docstring).

    Args:
      g: gradient (any shape; flattened, float32).
      e: residual, same size.
      key: PRNG key for the threshold sample (share it across workers or not, as the protocol needs).
      k: target number of kept entries, ``1 <= k <= d``.
      capacity: fixed payload capacity, ``>= k`` (default ``floor(k (1 + tol))``, at most ``d``).
      tol: accepted relative shortfall/excess of the kept count, in ``[0, 1)``.
      sample_size: coordinates sampled for the threshold estimate.
      max_refine: extra count passes allowed when no candidate is within tolerance.
      impl: ``"auto"``, ``"pallas"`` or ``"xla"``.

    Returns:
      ``(payload, e_new)`` with ``payload = {"values": float32[capacity], "indices": int32[capacity],
      "count": int32}`` (slots ``>= count`` are zero) and the flat float32 residual.

    Example::

      payload, e = ef_threshold_topk(g, e, key, k=g.size // 100)
    """
    d = g.size
    if e.size != d:
        raise ValueError(f"e must have the size of g ({d}); got {e.size}.")
    if not isinstance(k, int) or not 1 <= k <= d:
        raise ValueError(f"k must be an int in [1, {d}]; got {k!r}.")
    if not 0.0 <= tol < 1.0:
        raise ValueError(f"tol must be in [0, 1); got {tol!r}.")
    cap = min(d, int(math.floor(k * (1.0 + tol)))) if capacity is None else capacity
    if not isinstance(cap, int) or not k <= cap <= d:
        raise ValueError(f"capacity must be an int in [{k}, {d}]; got {capacity!r}.")
    if not isinstance(sample_size, int) or sample_size < 1:
        raise ValueError(f"sample_size must be a positive int; got {sample_size!r}.")
    if not isinstance(max_refine, int) or max_refine < 0:
        raise ValueError(f"max_refine must be a non-negative int; got {max_refine!r}.")
    kw = dict(k=k, cap=cap, tol=float(tol), sample_size=sample_size, max_refine=max_refine)
    payload, e_new, _ = _dispatch.dispatch(
        "ef_threshold_topk",
        impl,
        functools.partial(_topk, pallas=True, **kw),
        lambda *a: _topk(*a, pallas=False, **kw),
        g,
        e,
        key,
    )
    return payload, e_new
