r"""Distributed Shampoo as composable optax transforms.

Per block :math:`G` of order :math:`k` (a 2-D block has :math:`k = 2`) with one statistic per dim,

.. math::
   L_i \leftarrow \beta_2 L_i + (1 - \beta_2)\, G_{(i)} G_{(i)}^\top
   \quad (\beta_2 = 1:\ L_i \leftarrow L_i + G_{(i)} G_{(i)}^\top),

   P = G \times_1 \hat L_1^{-1/p} \times_2 \cdots \times_k \hat L_k^{-1/p}, \qquad
   \hat L_i = L_i + \epsilon_i I,\ \epsilon_i = \text{matrix\_epsilon}\cdot\lambda_{\max}(L_i),\ p = 2k,

where :math:`G_{(i)}` is the mode-:math:`i` unfolding (for a matrix: :math:`L = \hat L^{-1/4}`
from :math:`G G^\top`, :math:`R` from :math:`G^\top G`, :math:`P = \hat L^{-1/4} G \hat R^{-1/4}`).
The roots are recomputed every ``precondition_every`` steps (in between the last ones are reused);
statistics are updated every ``statistics_every`` steps. With grafting, :math:`P` is rescaled per
block (or per parameter) to the norm of a simpler optimizer's step :math:`D`:
:math:`P \leftarrow (\|D\|_F / \|P\|_F) P`. Before ``start_preconditioning_step`` the output is
:math:`D` itself (the gradient for ``grafting="none"``).

Layout (see :mod:`optdist.preconditioning.blocking`): adjacent small dims are merged, dims longer
than ``block_size`` are split; blocks sharing a shape are stacked and processed as one batch (no
padding to a global size). Parameters that are 1-D after merging, or have a dim longer than
``max_preconditioner_dim``, use a diagonal (AdaGrad-style) fallback
:math:`d \leftarrow \beta_2 d + (1-\beta_2) g^2`, :math:`P = (d + \epsilon)^{-1/p} g` (:math:`p = 2`
unless overridden, :math:`\epsilon` relative to :math:`\max d`), grafted per parameter.

Root failures: a refreshed root is rejected, and the previous preconditioner kept, when it is
non-finite or its residual estimate (:func:`matrix_inverse_pth_root`) exceeds
``root_error_threshold``; ``root_failures`` counts rejections per matrix and ``root_errors`` holds
the last residuals.

Distribution (``axis_name``): chain this transform after :func:`optdist.mean_gradients` so every
worker receives the same averaged gradient. The blocks are then assigned to workers (balanced by
:math:`\sum_i s_i^3`, LPT); each worker updates the statistics, recomputes the roots and
preconditions **only its own blocks**, and the search directions are all-gathered (as in the
PyTorch Distributed Shampoo). The statistics and refresh gates are branches on the step counter
(:func:`optdist.comm.branching.worker_cond`, no collective inside), so the root work is really
skipped between refreshes in every mode, simulated workers included; the all-gather runs every
step.

State placement: ``count``, ``graft_state``, ``diagonal`` and ``bytes_sent`` are identical across
workers. The banks ``stats``, ``preconditioners``, ``root_errors``, ``root_failures`` have the full
``[N_g, ...]`` shape on every worker (independent of the worker count) but each worker keeps only
the rows it owns (plus padding rows it computes redundantly) up to date: they are **per-worker**.
With ``num_workers=n`` they are sharded instead: each worker's banks hold only its
``ceil(N_g / n)`` assigned blocks (memory per worker ~1/n, as in the PyTorch Distributed Shampoo).

Bytes: each step every worker all-gathers its ``ceil(N_g / n)`` direction blocks per block shape:
:math:`(n-1) \sum_g \lceil N_g/n \rceil |block_g| \cdot 4` bytes (float32), recorded in
``bytes_sent``. Nothing is sent with ``axis_name=None``.

Non-finite policy: if any gradient entry is NaN/Inf, the statistics, grafting state, diagonal
statistics and preconditioners are left unchanged (the state never becomes non-finite), the step
counter still advances, and the returned updates are whatever the non-finite gradient produces (so
non-finite). Wrap the chain in :func:`optdist.skip_nonfinite` to skip such steps on every worker.

References:
  Gupta, V., Koren, T., Singer, Y. "Shampoo: Preconditioned Stochastic Tensor Optimization", 2018.
  Anil, R., Gupta, V., Koren, T., Regan, K., Singer, Y. "Scalable Second Order Optimization for Deep
  Learning", 2020.
  Shi, H.-J. M., Lee, T.-H., Iwasaki, S., et al. "A Distributed Data-Parallel PyTorch Implementation
  of the Distributed Shampoo Optimizer for Training Neural Networks At-Scale", 2023.
"""

from __future__ import annotations

import inspect
import string
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from optdist import _checks
from optdist.comm.accounting import ByteCounter
from optdist.comm.axes import AxisName, validate_axis_name
from optdist.comm.branching import worker_cond
from optdist.comm.channel import Channel
from optdist.preconditioning import blocking, storage
from optdist.preconditioning import grafting as graft_lib
from optdist.preconditioning.matrix_roots import METHODS, matrix_inverse_pth_root


class ShampooState(NamedTuple):
    """State of :func:`scale_by_shampoo` (see its docstring for which parts are per-worker).

    Attributes:
      count: steps taken (int32).
      stats: per block shape, a tuple (one per block dim) of ``[N_g, s_i, s_i]`` statistics.
      preconditioners: the same shapes, holding :math:`\\hat L_i^{-1/p}`.
      root_errors: per block shape ``[N_g, k]`` residual estimate of the last refresh.
      root_failures: per block shape ``[N_g, k]`` int32 count of rejected roots.
      diagonal: one statistic per diagonal-fallback leaf (in leaf order).
      graft_state: the grafting transform's state (``()`` for ``grafting="none"``).
      bytes_sent: bytes of the direction all-gathers.
    """

    count: jax.Array
    stats: dict[str, tuple[jax.Array | storage.QuantizedMatrices, ...]]
    preconditioners: dict[str, tuple[jax.Array | storage.QuantizedMatrices, ...]]
    root_errors: dict[str, jax.Array]
    root_failures: dict[str, jax.Array]
    diagonal: tuple[jax.Array, ...]
    graft_state: Any
    bytes_sent: ByteCounter


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


def _compute_dtype(leaves) -> jnp.dtype:
    """float32, or float64 when a leaf is float64 (x64 enabled)."""
    return jnp.result_type(jnp.float32, *[jnp.result_type(x) for x in leaves])


def scale_by_shampoo(
    block_size: int = 1024,
    *,
    merge_small_dims: bool = True,
    max_preconditioner_dim: int = 16384,
    beta2: float = 1.0,
    matrix_epsilon: float = 1e-6,
    relative_epsilon: bool = True,
    exponent_override: int | None = None,
    precondition_every: int = 1,
    start_preconditioning_step: int = 1,
    statistics_every: int = 1,
    grafting: str | optax.GradientTransformation = "adagrad",
    graft_per_block: bool = True,
    graft_beta1: float = 0.9,
    graft_beta2: float = 0.999,
    graft_epsilon: float = 1e-8,
    root_method: str = "auto",
    root_max_iters: int = 100,
    root_impl: str = "auto",
    root_error_threshold: float = 0.25,
    precision: Any = lax.Precision.HIGHEST,
    statistics_dtype: Any = None,
    preconditioner_dtype: Any = None,
    axis_name: AxisName = None,
    num_workers: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Shampoo's preconditioned (and grafted) direction; see the module docstring for the math.

    Args:
      block_size: maximum block side (dims longer than this are split).
      merge_small_dims: merge adjacent dims whose product fits in ``block_size``.
      max_preconditioner_dim: parameters with a (merged) dim longer than this use the diagonal
        fallback.
      beta2: statistics decay in ``(0, 1]``; ``1.0`` accumulates a running sum (AdaGrad-style).
      matrix_epsilon: ridge ``>= 0`` added before each root (relative to the statistic's largest
        eigenvalue unless ``relative_epsilon=False``).
      relative_epsilon: whether ``matrix_epsilon`` is relative.
      exponent_override: use :math:`\hat L_i^{-1/p}` with this ``p >= 1`` for every dim instead of
        ``p = 2 k`` (order ``k`` of the block; ``2`` for the diagonal fallback).
      precondition_every: recompute roots every this many steps (counting from
        ``start_preconditioning_step``).
      start_preconditioning_step: before this step the output is the grafting direction.
      statistics_every: update statistics every this many steps.
      grafting: ``"sgd"``, ``"adagrad"``, ``"rmsprop"``, ``"adam"``, ``"none"`` or any optax
        transform whose output gives the step size.
      graft_per_block: rescale per block (default) or per parameter.
      graft_beta1: first-moment decay of Adam grafting.
      graft_beta2: second-moment decay of RMSProp/Adam grafting.
      graft_epsilon: epsilon of AdaGrad/RMSProp/Adam grafting.
      root_method: ``"eigh"``, ``"coupled_newton"``, ``"newton_schulz"`` or ``"auto"``.
      root_max_iters: iteration cap of the iterative root methods.
      root_impl: ``"auto"``, ``"pallas"`` or ``"xla"``: whether the iterative roots run as the
        Pallas kernel (blocks kept on chip, a fixed ``root_max_iters`` iterations; see
        :func:`optdist.matrix_inverse_pth_root`). ``"auto"`` uses it only where it was measured
        faster (none yet), so by default the roots are the XLA loop with early exit.
      root_error_threshold: reject (keep the previous preconditioner) above this residual estimate.
      precision: matmul precision of statistics, roots and preconditioning.
      statistics_dtype: storage dtype of the statistics: a float dtype (e.g. ``jnp.bfloat16``), or
        ``jnp.int16`` / ``jnp.int8`` for quantized storage with per-column scales and a float32
        diagonal (:mod:`optdist.preconditioning.storage`; int8 loses EMA updates below its
        resolution, prefer int16 for statistics); default: the compute dtype (float32, or float64
        for float64 parameters). Math always runs in the compute dtype.
      preconditioner_dtype: storage dtype of the preconditioners (same choices and default; int8
        is the paper's memory-reduction mode for the recomputed roots).
      axis_name: worker axis over which root and preconditioning work is split, or None.
      num_workers: the size of ``axis_name``, to *shard the state*: each worker's banks then hold
        only the ``ceil(N_g / n)`` blocks assigned to it, so statistics and preconditioners take
        ``~1/n`` of the memory per worker (the state is per-worker; ``optdist.replicate`` of
        ``init`` is still the right start, every shard starts at zeros / identity). ``None``: every
        worker holds full-size banks and keeps only its own rows up to date.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with :class:`ShampooState`.

    Example::

      tx = optax.chain(
          optdist.mean_gradients("data"),
          optdist.scale_by_shampoo(block_size=512, grafting="rmsprop", axis_name="data"),
          optax.scale_by_learning_rate(1e-3),
      )
    """
    block_size = _checks.positive_int(block_size, "block_size")
    max_preconditioner_dim = _checks.positive_int(max_preconditioner_dim, "max_preconditioner_dim")
    beta2 = _checks.in_range(beta2, "beta2", 0.0, 1.0, low_open=True)
    matrix_epsilon = _checks.in_range(matrix_epsilon, "matrix_epsilon", 0.0, float("inf"))
    if exponent_override is not None:
        exponent_override = _checks.positive_int(exponent_override, "exponent_override")
    precondition_every = _checks.positive_int(precondition_every, "precondition_every")
    statistics_every = _checks.positive_int(statistics_every, "statistics_every")
    if isinstance(start_preconditioning_step, bool) or not isinstance(start_preconditioning_step, int):
        raise ValueError(
            f"start_preconditioning_step must be an integer >= 0; got {start_preconditioning_step!r}."
        )
    if start_preconditioning_step < 0:
        raise ValueError(
            f"start_preconditioning_step must be an integer >= 0; got {start_preconditioning_step!r}."
        )
    graft_epsilon = _checks.in_range(graft_epsilon, "graft_epsilon", 0.0, float("inf"))
    graft_beta1 = _checks.in_range(graft_beta1, "graft_beta1", 0.0, 1.0)
    graft_beta2 = _checks.in_range(graft_beta2, "graft_beta2", 0.0, 1.0)
    if root_method not in METHODS:
        raise ValueError(f"root_method must be one of {METHODS}; got {root_method!r}.")
    root_max_iters = _checks.positive_int(root_max_iters, "root_max_iters")
    if root_impl not in ("auto", "pallas", "xla"):
        raise ValueError(f"root_impl must be one of ('auto', 'pallas', 'xla'); got {root_impl!r}.")
    root_error_threshold = _checks.in_range(root_error_threshold, "root_error_threshold", 0.0, float("inf"))
    statistics_dtype = storage.check_dtype(statistics_dtype, "statistics_dtype")
    preconditioner_dtype = storage.check_dtype(preconditioner_dtype, "preconditioner_dtype")
    axis_name = validate_axis_name(axis_name)
    if num_workers is not None:
        num_workers = _checks.positive_int(num_workers, "num_workers")
        if axis_name is None and num_workers > 1:
            raise ValueError(
                f"num_workers={num_workers} shards the state over workers, which needs axis_name; "
                "pass the worker axis (or num_workers=None)."
            )
    graft_tx = graft_lib.grafting_transform(grafting, graft_beta1, graft_beta2, graft_epsilon)
    graft_tx = None if graft_tx is None else optax.with_extra_args_support(graft_tx)

    def layout_of(leaves) -> blocking.Layout:
        return blocking.make_layout(
            [tuple(jnp.shape(x)) for x in leaves], block_size, merge_small_dims, max_preconditioner_dim
        )

    def exponent(order: int) -> int:
        return exponent_override or 2 * order

    def init_fn(params):
        leaves = jax.tree_util.tree_leaves(params)
        layout = layout_of(leaves)
        cdt = _compute_dtype(leaves)
        stat_dt = statistics_dtype or cdt
        pre_dt = preconditioner_dtype or cdt
        diag_dt = cdt if stat_dt in storage.INTEGER_DTYPES else stat_dt
        stats, pres, errs, fails = {}, {}, {}, {}
        shards = blocking.assign_blocks(layout, num_workers) if num_workers else None
        for shape, size in zip(layout.groups, layout.group_sizes):
            key = blocking.group_key(shape)
            size = size if shards is None else shards.tables[key].shape[1]
            stats[key] = tuple(storage.encode(jnp.zeros((size, s, s), cdt), stat_dt) for s in shape)
            pres[key] = tuple(
                storage.encode(jnp.broadcast_to(jnp.eye(s, dtype=cdt), (size, s, s)), pre_dt) for s in shape
            )
            errs[key] = jnp.zeros((size, len(shape)), jnp.float32)
            fails[key] = jnp.zeros((size, len(shape)), jnp.int32)
        diagonal = tuple(jnp.zeros(lay.shape, diag_dt) for lay in layout.leaves if lay.diagonal)
        graft_state = () if graft_tx is None else graft_tx.init(params)
        return ShampooState(
            jnp.zeros((), jnp.int32),
            stats,
            pres,
            errs,
            fails,
            diagonal,
            graft_state,
            ByteCounter.zeros(axis_name),
        )

    def accumulate(old: jax.Array, new: jax.Array) -> jax.Array:
        if beta2 == 1.0:
            return old + new
        return beta2 * old + (1.0 - beta2) * new

    def update_fn(updates, state, params=None, **extra_args):
        _checks.check_same_structure(updates, params, "params")
        _checks.check_floating(updates, "scale_by_shampoo")
        leaves, treedef = jax.tree_util.tree_flatten(updates)
        layout = layout_of(leaves)
        count = state.count
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else True
        do_stats = finite & (count % statistics_every == 0)
        since_start = count - start_preconditioning_step
        do_refresh = finite & (since_start >= 0) & (since_start % precondition_every == 0)
        preconditioning = count >= start_preconditioning_step

        # Grafting direction (identical on every worker; elementwise).
        if graft_tx is None:
            graft_leaves, graft_state = leaves, ()
        else:
            graft_dirs, new_graft = graft_tx.update(updates, state.graft_state, params, **extra_args)
            graft_state = jax.tree_util.tree_map(
                lambda new, old: jnp.where(finite, new, old), new_graft, state.graft_state
            )
            graft_leaves = jax.tree_util.tree_leaves(graft_dirs)

        channel = Channel(axis_name)
        n = channel.size
        keys = layout.keys
        if num_workers is not None and num_workers != n:
            raise ValueError(
                f"scale_by_shampoo(num_workers={num_workers}) runs on axis {axis_name!r} of {n} workers: "
                "pass num_workers equal to the axis size."
            )
        assignment = blocking.assign_blocks(layout, n) if n > 1 else None
        block_rows = {
            key: (None if assignment is None else jnp.asarray(assignment.tables[key])[channel.index])
            for key in keys
        }
        # Rows of this worker's blocks in the state banks (None: the banks hold exactly them).
        rows = {key: None for key in keys} if num_workers else block_rows
        cdt = _compute_dtype(leaves)
        g32 = [x.astype(cdt) for x in leaves]
        banks = blocking.to_banks(layout, g32)
        own = {key: storage.take(banks[key], block_rows[key]) for key in keys}

        # Statistics of this worker's blocks (gated; no collective inside the cond).
        own_stats = {key: tuple(storage.take(s, rows[key]) for s in state.stats[key]) for key in keys}

        def new_stats(own_stats):
            return {
                key: tuple(
                    storage.encode(
                        accumulate(storage.decode(s, cdt), _gram(own[key], i, precision)), storage.dtype_of(s)
                    )
                    for i, s in enumerate(own_stats[key])
                )
                for key in keys
            }

        own_stats = worker_cond(do_stats, new_stats, lambda s: s, own_stats)

        # Roots of this worker's statistics (gated), with failure fallback.
        own_pre = {key: tuple(storage.take(s, rows[key]) for s in state.preconditioners[key]) for key in keys}
        own_err = {key: storage.take(state.root_errors[key], rows[key]) for key in keys}
        own_fail = {key: storage.take(state.root_failures[key], rows[key]) for key in keys}

        def refresh(args):
            own_pre, own_err, own_fail = args
            # One batched root call per (side length, exponent) across all block shapes.
            batches: dict[tuple[int, int], list[tuple[str, int]]] = {}
            for key, shape in zip(keys, layout.groups):
                for i, side in enumerate(shape):
                    batches.setdefault((side, exponent(len(shape))), []).append((key, i))
            roots = {}
            for (_, p), members in batches.items():
                stats = [storage.decode(own_stats[key][i], cdt) for key, i in members]
                root, err = matrix_inverse_pth_root(
                    stats[0] if len(stats) == 1 else jnp.concatenate(stats),
                    p,
                    root_method,
                    ridge_epsilon=matrix_epsilon,
                    relative_epsilon=relative_epsilon,
                    max_iters=root_max_iters,
                    precision=precision,
                    impl=root_impl,
                )
                ok = jnp.isfinite(err) & (err <= root_error_threshold) & jnp.all(jnp.isfinite(root), (-2, -1))
                start = 0
                for (key, i), stat in zip(members, stats):
                    rows = slice(start, start + stat.shape[0])
                    roots[key, i] = (root[rows], err[rows], ok[rows])
                    start += stat.shape[0]
            pre_out, err_out, fail_out = {}, {}, {}
            for key, shape in zip(keys, layout.groups):
                parts = [roots[key, i] for i in range(len(shape))]
                pre_out[key] = tuple(
                    storage.select(ok, storage.encode(root, storage.dtype_of(old)), old)
                    for (root, _, ok), old in zip(parts, own_pre[key])
                )
                err_out[key] = jnp.stack([e for _, e, _ in parts], axis=1).astype(own_err[key].dtype)
                fail_out[key] = own_fail[key] + jnp.stack([~ok for _, _, ok in parts], axis=1).astype(
                    jnp.int32
                )
            return pre_out, err_out, fail_out

        own_pre, own_err, own_fail = worker_cond(
            do_refresh, refresh, lambda args: args, (own_pre, own_err, own_fail)
        )

        # Precondition this worker's blocks, then all-gather the directions.
        own_dirs = {}
        for key in keys:
            d = own[key]
            for i, pre in enumerate(own_pre[key]):
                d = _apply(storage.decode(pre, cdt), d, i, precision)
            own_dirs[key] = d
        gathered = channel.all_gather(own_dirs)
        dirs = {}
        for key in keys:
            flat = gathered[key].reshape((-1, *gathered[key].shape[2:]))
            dirs[key] = flat if assignment is None else flat[assignment.positions[key]]

        if graft_tx is not None and graft_per_block and keys:
            graft_banks = blocking.to_banks(layout, [x.astype(cdt) for x in graft_leaves])
            dirs = {
                key: graft_lib.graft(dirs[key], graft_banks[key], tuple(range(1, dirs[key].ndim)))
                for key in keys
            }
        block_leaves = blocking.from_banks(layout, dirs)

        # Diagonal fallback leaves (identical on every worker).
        new_diag, out = [], []
        diag_iter = iter(state.diagonal)
        for lay, leaf, g, gd, bl in zip(layout.leaves, leaves, g32, graft_leaves, block_leaves):
            if lay.diagonal:
                old = next(diag_iter)
                d = jnp.where(do_stats, accumulate(old.astype(cdt), g * g), old.astype(cdt))
                new_diag.append(d.astype(old.dtype))
                ridge = matrix_epsilon * jnp.max(d) if relative_epsilon else matrix_epsilon
                reg = d + ridge
                direction = jnp.where(
                    reg > 0, g * jnp.power(jnp.where(reg > 0, reg, 1.0), -1.0 / exponent(1)), 0.0
                )
                per_leaf = graft_tx is not None
            else:
                direction = bl
                per_leaf = graft_tx is not None and not graft_per_block
            if per_leaf:
                direction = graft_lib.graft(direction, gd.astype(cdt))
            direction = jnp.where(preconditioning, direction, gd.astype(cdt))
            out.append(direction.astype(leaf.dtype))

        stats = {}
        pres = {}
        errs = {}
        fails = {}
        for key in keys:
            r = rows[key]
            stats[key] = tuple(storage.put(s, r, v) for s, v in zip(state.stats[key], own_stats[key]))
            pres[key] = tuple(storage.put(s, r, v) for s, v in zip(state.preconditioners[key], own_pre[key]))
            errs[key] = storage.put(state.root_errors[key], r, own_err[key])
            fails[key] = storage.put(state.root_failures[key], r, own_fail[key])
        new_state = ShampooState(
            count + 1,
            stats,
            pres,
            errs,
            fails,
            tuple(new_diag),
            graft_state,
            state.bytes_sent.add(channel.nbytes),
        )
        return jax.tree_util.tree_unflatten(treedef, out), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def shampoo(
    learning_rate: optax.ScalarOrSchedule,
    block_size: int = 1024,
    *,
    momentum: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    weight_decay_mask: Any = None,
    merge_small_dims: bool = True,
    max_preconditioner_dim: int = 16384,
    beta2: float = 1.0,
    matrix_epsilon: float = 1e-6,
    relative_epsilon: bool = True,
    exponent_override: int | None = None,
    precondition_every: int = 1,
    start_preconditioning_step: int = 1,
    statistics_every: int = 1,
    grafting: str | optax.GradientTransformation = "adagrad",
    graft_per_block: bool = True,
    graft_beta1: float = 0.9,
    graft_beta2: float = 0.999,
    graft_epsilon: float = 1e-8,
    root_method: str = "auto",
    root_max_iters: int = 100,
    root_impl: str = "auto",
    root_error_threshold: float = 0.25,
    precision: Any = lax.Precision.HIGHEST,
    statistics_dtype: Any = None,
    preconditioner_dtype: Any = None,
    axis_name: AxisName = None,
    num_workers: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Shampoo with momentum and decoupled weight decay:
    ``chain(scale_by_shampoo, trace(momentum, nesterov), add_decayed_weights, scale_by_learning_rate)``.

    .. math:: u \leftarrow -\eta\,(m_t + \lambda \theta), \quad m_t = \mu m_{t-1} + P_t

    (Nesterov: :math:`m_t = \mu(\mu m_{t-1} + P_t) + P_t`), where :math:`P_t` is the grafted Shampoo
    direction of :func:`scale_by_shampoo` (see it for every other argument, the state placement,
    bytes and the non-finite policy). Momentum state is identical across workers.

    Args:
      learning_rate: a scalar or schedule. To inject it, keep every other argument static:
        ``optax.inject_hyperparams(optdist.shampoo, static_args=optdist.SHAMPOO_STATIC_ARGS)``.
      block_size: maximum block side.
      momentum: heavy-ball momentum in ``[0, 1)`` (``0`` disables it).
      nesterov: Nesterov momentum.
      weight_decay: decoupled weight decay ``>= 0`` (needs ``params`` in ``update``).
      weight_decay_mask: optax mask for weight decay.
      **others: as :func:`scale_by_shampoo`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example::

      tx = optax.chain(optdist.mean_gradients("data"),
                       optdist.shampoo(1e-3, block_size=512, grafting="adam", axis_name="data"))

      # The recipe that beat AdamW on the char-LM (BENCHMARKS.md: its final loss in 0.55x the
      # steps): precondition the filtered gradient, graft to RMSProp, exponent -1/2 per side.
      tx = optax.chain(optdist.mean_gradients("data"), optax.ema(0.9, debias=True),
                       optdist.shampoo(3e-3, block_size=128, beta2=0.99, grafting="rmsprop",
                                       exponent_override=2, start_preconditioning_step=10,
                                       precondition_every=10, axis_name="data"))
    """
    injected = [
        name
        for name, value in locals().items()
        if name != "learning_rate" and isinstance(value, (jax.Array, np.ndarray))
    ]
    if injected:
        raise TypeError(
            f"shampoo's {injected} must be Python values, not arrays. With optax.inject_hyperparams "
            "only the learning rate is injectable: pass static_args=optdist.SHAMPOO_STATIC_ARGS."
        )
    momentum = _checks.in_range(momentum, "momentum", 0.0, 1.0, high_open=True)
    weight_decay = _checks.in_range(weight_decay, "weight_decay", 0.0, float("inf"))
    parts = [
        scale_by_shampoo(
            block_size,
            merge_small_dims=merge_small_dims,
            max_preconditioner_dim=max_preconditioner_dim,
            beta2=beta2,
            matrix_epsilon=matrix_epsilon,
            relative_epsilon=relative_epsilon,
            exponent_override=exponent_override,
            precondition_every=precondition_every,
            start_preconditioning_step=start_preconditioning_step,
            statistics_every=statistics_every,
            grafting=grafting,
            graft_per_block=graft_per_block,
            graft_beta1=graft_beta1,
            graft_beta2=graft_beta2,
            graft_epsilon=graft_epsilon,
            root_method=root_method,
            root_max_iters=root_max_iters,
            root_impl=root_impl,
            root_error_threshold=root_error_threshold,
            precision=precision,
            statistics_dtype=statistics_dtype,
            preconditioner_dtype=preconditioner_dtype,
            axis_name=axis_name,
            num_workers=num_workers,
        )
    ]
    if momentum > 0:
        parts.append(optax.trace(decay=momentum, nesterov=nesterov))
    if weight_decay > 0:
        parts.append(optax.add_decayed_weights(weight_decay, weight_decay_mask))
    parts.append(optax.scale_by_learning_rate(learning_rate))
    return optax.chain(*parts)


SHAMPOO_STATIC_ARGS: tuple[str, ...] = tuple(
    name for name in inspect.signature(shampoo).parameters if name != "learning_rate"
)
"""Arguments of :func:`shampoo` that ``optax.inject_hyperparams`` must keep static (all but the lr)."""
