r"""Shampoo's update as small pure functions, each testable alone (composed by :mod:`.shampoo`).

For one bank of ``c`` blocks ``G`` of one shape (order ``k``):

* :func:`update_statistics`: :math:`L_i \leftarrow \beta_2 L_i + (1-\beta_2) G_{(i)} G_{(i)}^\top`;
* :func:`inverse_roots` / :func:`accept_roots` / :func:`refresh_preconditioners`: candidate roots
  :math:`\hat L_i^{-1/p}` (one batched call per side length and exponent), kept only when finite with
  a residual estimate at most the threshold, else the previous preconditioner stays and is counted;
* :func:`precondition_blocks`: :math:`P = G \times_1 \hat L_1^{-1/p} \cdots \times_k \hat L_k^{-1/p}`;
* :func:`graft_blocks`: :math:`P \leftarrow (\|D\|_F / \|P\|_F) P` per block;
* :func:`diagonal_step`: the diagonal fallback :math:`d \leftarrow \beta_2 d + (1-\beta_2) g^2`,
  :math:`(d + \epsilon)^{-1/p} g`;
* :func:`worker_blocks` / :func:`gather_directions`: the work split over workers (LPT assignment of
  :func:`optdist.preconditioning.blocking.assign_blocks`) and the all-gather of the directions;
* :func:`init_banks`, :func:`take_rows`, :func:`put_rows`: the state banks and a worker's rows of them.

Statistics and preconditioners are *stored* (float or quantized, :mod:`.storage`); the math runs in
the dtype of the blocks (or the ``dtype`` argument).
"""

from __future__ import annotations

import dataclasses
import string
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from optdist.comm.channel import Channel
from optdist.preconditioning import blocking, storage
from optdist.preconditioning import grafting as graft_lib
from optdist.preconditioning.matrix_roots import matrix_inverse_pth_root

Stored = jax.Array | storage.QuantizedMatrices


class Banks(NamedTuple):
    """The per-block-shape banks of a :class:`~optdist.preconditioning.ShampooState` (or a worker's rows)."""

    stats: dict[str, tuple[Stored, ...]]
    preconditioners: dict[str, tuple[Stored, ...]]
    root_errors: dict[str, jax.Array]
    root_failures: dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class RootConfig:
    """How the inverse roots are computed and when a refreshed root is rejected."""

    method: str = "eigh"
    exponent_override: int | None = None
    ridge_epsilon: float = 1e-6
    relative_epsilon: bool = True
    max_iters: int = 100
    impl: str = "auto"
    error_threshold: float = 0.25
    precision: Any = lax.Precision.HIGHEST

    def exponent(self, order: int) -> int:
        """``p`` of :math:`\\hat L^{-1/p}` for a block of ``order`` dims (``2`` for the diagonal)."""
        return self.exponent_override or 2 * order


_LETTERS = string.ascii_lowercase[:20]


def _gram(blocks: jax.Array, dim: int, precision) -> jax.Array:
    """``G_(dim) G_(dim)^T`` for a batch of blocks ``[c, *shape]`` -> ``[c, s, s]``."""
    k = blocks.ndim - 1
    a = _LETTERS[:k]
    b = a[:dim] + "y" + a[dim + 1 :]
    return jnp.einsum(f"z{a},z{b}->z{a[dim]}y", blocks, blocks, precision=precision)


def _apply(pre: jax.Array, blocks: jax.Array, dim: int, precision) -> jax.Array:
    """Multiplies mode ``dim`` of every block by its (symmetric) preconditioner."""
    k = blocks.ndim - 1
    a = _LETTERS[:k]
    b = a[:dim] + "y" + a[dim + 1 :]
    return jnp.einsum(f"z{a[dim]}y,z{b}->z{a}", pre, blocks, precision=precision)


def accumulate(old: jax.Array, new: jax.Array, beta2: float) -> jax.Array:
    r""":math:`\beta_2\,\mathrm{old} + (1 - \beta_2)\,\mathrm{new}` (a sum for :math:`\beta_2 = 1`)."""
    if beta2 == 1.0:
        return old + new
    return beta2 * old + (1.0 - beta2) * new


def update_statistics(
    stats: tuple[Stored, ...], blocks: jax.Array, beta2: float, precision: Any = lax.Precision.HIGHEST
) -> tuple[Stored, ...]:
    r"""One bank's statistics: :math:`L_i \leftarrow \beta_2 L_i + (1-\beta_2) G_{(i)} G_{(i)}^\top`.

    Args:
      stats: one stored ``[c, s_i, s_i]`` statistic per block dim (float or quantized storage).
      blocks: the bank's gradient blocks ``[c, *block_shape]``; the math runs in their dtype.
      beta2: decay in ``(0, 1]``.
      precision: matmul precision.

    Returns:
      The statistics in their storage dtypes.
    """
    cdt = blocks.dtype
    return tuple(
        storage.encode(
            accumulate(storage.decode(s, cdt), _gram(blocks, i, precision), beta2), storage.dtype_of(s)
        )
        for i, s in enumerate(stats)
    )


def inverse_roots(
    stats: dict[str, tuple[Stored, ...]], config: RootConfig, dtype: Any
) -> dict[str, tuple[tuple[jax.Array, jax.Array], ...]]:
    r"""Candidate roots :math:`\hat L_i^{-1/p}` and residual estimates of every statistic.

    One batched :func:`matrix_inverse_pth_root` call per (side length, exponent) across all block
    shapes. ``stats`` maps a block-shape key (``"4x3"``) to one stored ``[c, s_i, s_i]`` per dim.

    Returns:
      ``{key: ((root [c, s_i, s_i], error [c]), ...)}``, one pair per dim, in ``dtype``.
    """
    batches: dict[tuple[int, int], list[tuple[str, int]]] = {}
    for key, per_dim in stats.items():
        for i, s in enumerate(per_dim):
            side = (s.codes if isinstance(s, storage.QuantizedMatrices) else s).shape[-1]
            batches.setdefault((side, config.exponent(len(per_dim))), []).append((key, i))
    out: dict[str, list] = {key: [None] * len(per_dim) for key, per_dim in stats.items()}
    for (_, p), members in batches.items():
        mats = [storage.decode(stats[key][i], dtype) for key, i in members]
        root, err = matrix_inverse_pth_root(
            mats[0] if len(mats) == 1 else jnp.concatenate(mats),
            p,
            config.method,
            ridge_epsilon=config.ridge_epsilon,
            relative_epsilon=config.relative_epsilon,
            max_iters=config.max_iters,
            precision=config.precision,
            impl=config.impl,
        )
        start = 0
        for (key, i), mat in zip(members, mats):
            rows = slice(start, start + mat.shape[0])
            out[key][i] = (root[rows], err[rows])
            start += mat.shape[0]
    return {key: tuple(parts) for key, parts in out.items()}


def accept_roots(
    roots: tuple[tuple[jax.Array, jax.Array], ...],
    preconditioners: tuple[Stored, ...],
    errors: jax.Array,
    failures: jax.Array,
    threshold: float,
) -> tuple[tuple[Stored, ...], jax.Array, jax.Array]:
    """One bank's refresh with the failure fallback.

    A candidate root is accepted when it and its residual estimate are finite and the estimate is at
    most ``threshold``; otherwise the previous preconditioner is kept and its failure count grows.

    Args:
      roots: per dim, ``(root [c, s, s], error [c])`` from :func:`inverse_roots`.
      preconditioners: per dim, the stored previous ``[c, s, s]`` preconditioners.
      errors: ``[c, k]`` last residual estimates (replaced by the new ones, accepted or not).
      failures: ``[c, k]`` int32 rejection counts.
      threshold: the largest residual estimate accepted.

    Returns:
      ``(preconditioners, errors, failures)`` in the storage layout of the inputs.
    """
    ok = [
        jnp.isfinite(err) & (err <= threshold) & jnp.all(jnp.isfinite(root), (-2, -1)) for root, err in roots
    ]
    pres = tuple(
        storage.select(good, storage.encode(root, storage.dtype_of(old)), old)
        for (root, _), good, old in zip(roots, ok, preconditioners)
    )
    new_errors = jnp.stack([err for _, err in roots], axis=1).astype(errors.dtype)
    new_failures = failures + jnp.stack([~good for good in ok], axis=1).astype(failures.dtype)
    return pres, new_errors, new_failures


def refresh_preconditioners(banks: Banks, config: RootConfig, dtype: Any) -> Banks:
    """``banks`` with every preconditioner recomputed from its statistic (failures fall back)."""
    roots = inverse_roots(banks.stats, config, dtype)
    pres, errs, fails = {}, {}, {}
    for key in banks.stats:
        pres[key], errs[key], fails[key] = accept_roots(
            roots[key],
            banks.preconditioners[key],
            banks.root_errors[key],
            banks.root_failures[key],
            config.error_threshold,
        )
    return Banks(banks.stats, pres, errs, fails)


def precondition_blocks(
    blocks: jax.Array, preconditioners: tuple[Stored, ...], precision: Any = lax.Precision.HIGHEST
) -> jax.Array:
    r""":math:`P = G \times_1 \hat L_1^{-1/p} \times_2 \cdots \times_k \hat L_k^{-1/p}` for a bank of blocks.

    For a matrix block: :math:`P = \hat L^{-1/p} G \hat R^{-1/p}`. ``blocks`` is ``[c, *shape]``;
    ``preconditioners`` one stored ``[c, s_i, s_i]`` per dim (symmetric), decoded in the blocks' dtype.
    """
    direction = blocks
    for i, pre in enumerate(preconditioners):
        direction = _apply(storage.decode(pre, blocks.dtype), direction, i, precision)
    return direction


def init_banks(
    layout: blocking.Layout,
    slots: dict[str, int],
    dtype: Any,
    statistics_dtype: Any,
    preconditioner_dtype: Any,
) -> Banks:
    """Zero statistics, identity preconditioners, zero errors and failures for ``slots[key]`` blocks
    of each block shape (``N_g`` for full banks, ``ceil(N_g / n)`` for sharded ones)."""
    stats, pres, errs, fails = {}, {}, {}, {}
    for key, shape in zip(layout.keys, layout.groups):
        size = slots[key]
        stats[key] = tuple(storage.encode(jnp.zeros((size, s, s), dtype), statistics_dtype) for s in shape)
        pres[key] = tuple(
            storage.encode(jnp.broadcast_to(jnp.eye(s, dtype=dtype), (size, s, s)), preconditioner_dtype)
            for s in shape
        )
        errs[key] = jnp.zeros((size, len(shape)), jnp.float32)
        fails[key] = jnp.zeros((size, len(shape)), jnp.int32)
    return Banks(stats, pres, errs, fails)


def take_rows(banks: Banks, rows: dict[str, jax.Array | None]) -> Banks:
    """Rows ``rows[key]`` of every bank (``None``: all of them)."""
    return Banks(*({key: storage.take(bank[key], rows[key]) for key in bank} for bank in banks))


def put_rows(banks: Banks, rows: dict[str, jax.Array | None], own: Banks) -> Banks:
    """``banks`` with rows ``rows[key]`` replaced by ``own`` (``None``: all of them)."""
    return Banks(
        *({key: storage.put(bank[key], rows[key], new[key]) for key in bank} for bank, new in zip(banks, own))
    )


def worker_blocks(
    layout: blocking.Layout, num_workers: int, index: jax.Array
) -> tuple[blocking.Assignment | None, dict[str, jax.Array | None]]:
    """The block assignment over ``num_workers`` and this worker's bank rows per block shape
    (``None`` for one worker: every row)."""
    if num_workers == 1:
        return None, {key: None for key in layout.keys}
    assignment = blocking.assign_blocks(layout, num_workers)
    return assignment, {key: jnp.asarray(assignment.tables[key])[index] for key in layout.keys}


def gather_directions(
    channel: Channel, own: dict[str, jax.Array], assignment: blocking.Assignment | None
) -> dict[str, jax.Array]:
    r"""Every worker's preconditioned blocks, all-gathered and put back in bank order.

    ``own[key]`` is this worker's ``[c_g, *shape]`` (``c_g = ceil(N_g / n)`` slots, padding
    included); the result is ``[N_g, *shape]``. Bytes per worker (counted on ``channel``):
    :math:`(n - 1) \sum_g c_g |block_g| s`.
    """
    gathered = channel.all_gather(own)
    out = {}
    for key, x in gathered.items():
        flat = x.reshape((-1, *x.shape[2:]))
        out[key] = flat if assignment is None else flat[assignment.positions[key]]
    return out


def graft_blocks(directions: dict[str, jax.Array], graft_banks: dict[str, jax.Array]) -> dict[str, jax.Array]:
    r"""Per block: :math:`P \leftarrow (\|D\|_F / \|P\|_F)\, P`, :math:`D` the grafting direction's block."""
    return {
        key: graft_lib.graft(d, graft_banks[key], tuple(range(1, d.ndim))) for key, d in directions.items()
    }


def diagonal_step(
    stat: jax.Array, grad: jax.Array, do_stats: jax.Array, beta2: float, config: RootConfig
) -> tuple[jax.Array, jax.Array]:
    r"""One diagonal-fallback leaf: :math:`d \leftarrow \beta_2 d + (1-\beta_2) g^2` (where ``do_stats``),
    then :math:`(d + \epsilon)^{-1/p} g` (``0`` where :math:`d + \epsilon = 0`; :math:`\epsilon` is
    ``config.ridge_epsilon``, times :math:`\max d` when relative). Returns ``(d as stored, direction)``."""
    old = stat.astype(grad.dtype)
    d = jnp.where(do_stats, accumulate(old, grad * grad, beta2), old)
    reg = d + (config.ridge_epsilon * jnp.max(d) if config.relative_epsilon else config.ridge_epsilon)
    direction = jnp.where(
        reg > 0, grad * jnp.power(jnp.where(reg > 0, reg, 1.0), -1.0 / config.exponent(1)), 0.0
    )
    return d.astype(stat.dtype), direction
