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
(:meth:`optdist.comm.Channel.cond`, a real branch in every mode, simulated workers included, with
no collective inside), so the root work is really skipped between refreshes; the all-gather runs
every step. The steps are the pure functions of :mod:`optdist.preconditioning.shampoo_ops`.

State placement: ``count``, ``graft_state``, ``diagonal`` and ``bytes_sent`` are identical across
workers. The banks ``stats``, ``preconditioners``, ``root_errors``, ``root_failures`` have the full
``[N_g, ...]`` shape on every worker (independent of the worker count) but each worker keeps only
the rows it owns (plus padding rows it computes redundantly) up to date: they are **per-worker**.
With ``num_workers=n`` they are sharded instead: each worker's banks hold only its
``ceil(N_g / n)`` assigned blocks (memory per worker ~1/n, as in the PyTorch Distributed Shampoo).

Bytes: each step every worker all-gathers its ``ceil(N_g / n)`` direction blocks per block shape:
:math:`(n-1) \sum_g \lceil N_g/n \rceil |block_g| \cdot 4` bytes (float32), counted by the
:class:`~optdist.comm.Channel` on ``bytes_sent``. Nothing is sent with ``axis_name=None``.

Edge leaves: a leaf with zero elements passes through untouched (no blocks, no statistic); integer
leaves are refused (at ``init`` and ``update``) with an error asking to cast them out of the tree.

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

import dataclasses
import functools
import inspect
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from optdist import _checks
from optdist.comm.accounting import ByteCounter
from optdist.comm.axes import AxisName, validate_axis_name
from optdist.comm.channel import Channel
from optdist.preconditioning import blocking, storage
from optdist.preconditioning import grafting as graft_lib
from optdist.preconditioning.matrix_roots import METHODS
from optdist.preconditioning.shampoo_ops import (
    Banks,
    RootConfig,
    Stored,
    diagonal_step,
    gather_directions,
    graft_blocks,
    init_banks,
    precondition_blocks,
    put_rows,
    refresh_preconditioners,
    take_rows,
    update_statistics,
    worker_blocks,
)


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
    stats: dict[str, tuple[Stored, ...]]
    preconditioners: dict[str, tuple[Stored, ...]]
    root_errors: dict[str, jax.Array]
    root_failures: dict[str, jax.Array]
    diagonal: tuple[jax.Array, ...]
    graft_state: Any
    bytes_sent: ByteCounter


def _compute_dtype(leaves) -> jnp.dtype:
    """float32, or float64 when a leaf is float64 (x64 enabled)."""
    return jnp.result_type(jnp.float32, *[jnp.result_type(x) for x in leaves])


def _graft_step(graft_tx, updates, graft_state, params, finite, extra_args):
    """The grafting directions (leaves) and the grafting state, kept unchanged on a non-finite step."""
    if graft_tx is None:
        return jax.tree_util.tree_leaves(updates), ()
    dirs, new_state = graft_tx.update(updates, graft_state, params, **extra_args)
    new_state = jax.tree_util.tree_map(lambda new, old: jnp.where(finite, new, old), new_state, graft_state)
    return jax.tree_util.tree_leaves(dirs), new_state


def _leaf_outputs(
    layout: blocking.Layout,
    leaves: list[jax.Array],
    grads: list[jax.Array],
    graft_dirs: list[jax.Array] | None,
    block_dirs: list[jax.Array | None],
    diagonal: tuple[jax.Array, ...],
    *,
    do_stats: jax.Array,
    preconditioning: jax.Array,
    beta2: float,
    config: RootConfig,
    graft_per_block: bool,
) -> tuple[list[jax.Array], tuple[jax.Array, ...]]:
    """Each leaf's output: the blocked direction or the diagonal fallback, grafted per leaf where
    asked, the grafting direction before preconditioning starts; empty leaves pass through.

    ``leaves`` are the incoming updates, ``grads`` the same in the compute dtype, ``graft_dirs`` the
    grafting directions (None without grafting), ``block_dirs`` from :func:`blocking.from_banks`.
    Returns the outputs (in the leaves' dtypes) and the new diagonal statistics.
    """
    out, new_diag = [], []
    diag_iter = iter(diagonal)
    for i, (lay, leaf, g, bl) in enumerate(zip(layout.leaves, leaves, grads, block_dirs)):
        if lay.empty:
            out.append(leaf)
            continue
        fallback = g if graft_dirs is None else graft_dirs[i].astype(g.dtype)
        if lay.diagonal:
            d, direction = diagonal_step(next(diag_iter), g, do_stats, beta2, config)
            new_diag.append(d)
        else:
            direction = bl
        if graft_dirs is not None and (lay.diagonal or not graft_per_block):
            direction = graft_lib.graft(direction, fallback)
        out.append(jnp.where(preconditioning, direction, fallback).astype(leaf.dtype))
    return out, tuple(new_diag)


@dataclasses.dataclass(frozen=True)
class _Options:
    """The validated, static settings of one :func:`scale_by_shampoo` transform."""

    block_size: int
    merge_small_dims: bool
    max_preconditioner_dim: int
    beta2: float
    precondition_every: int
    start_preconditioning_step: int
    statistics_every: int
    graft_tx: optax.GradientTransformationExtraArgs | None
    graft_per_block: bool
    roots: RootConfig
    statistics_dtype: np.dtype | None
    preconditioner_dtype: np.dtype | None
    axis_name: AxisName
    num_workers: int | None

    def layout(self, leaves) -> blocking.Layout:
        return blocking.make_layout(
            [tuple(jnp.shape(x)) for x in leaves],
            self.block_size,
            self.merge_small_dims,
            self.max_preconditioner_dim,
        )


def _options(**kw: Any) -> _Options:
    """Checks :func:`scale_by_shampoo`'s arguments (each error names its argument)."""
    start = kw["start_preconditioning_step"]
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise ValueError(f"start_preconditioning_step must be an integer >= 0; got {start!r}.")
    if kw["root_method"] not in METHODS:
        raise ValueError(f"root_method must be one of {METHODS}; got {kw['root_method']!r}.")
    from optdist_kernels import resolve_impl

    resolve_impl(kw["root_impl"], param="root_impl")  # the one definition of the impl values
    exponent_override = kw["exponent_override"]
    if exponent_override is not None:
        exponent_override = _checks.positive_int(exponent_override, "exponent_override")
    axis_name = validate_axis_name(kw["axis_name"])
    num_workers = kw["num_workers"]
    if num_workers is not None:
        num_workers = _checks.positive_int(num_workers, "num_workers")
        if axis_name is None and num_workers > 1:
            raise ValueError(
                f"num_workers={num_workers} shards the state over workers, which needs axis_name; "
                "pass the worker axis (or num_workers=None)."
            )
    nonneg = {
        name: _checks.in_range(kw[name], name, 0.0, float("inf"))
        for name in ("matrix_epsilon", "graft_epsilon", "root_error_threshold")
    }
    graft_tx = graft_lib.grafting_transform(
        kw["grafting"],
        _checks.in_range(kw["graft_beta1"], "graft_beta1", 0.0, 1.0),
        _checks.in_range(kw["graft_beta2"], "graft_beta2", 0.0, 1.0),
        nonneg["graft_epsilon"],
    )
    roots = RootConfig(
        kw["root_method"],
        exponent_override,
        nonneg["matrix_epsilon"],
        kw["relative_epsilon"],
        _checks.positive_int(kw["root_max_iters"], "root_max_iters"),
        kw["root_impl"],
        nonneg["root_error_threshold"],
        kw["precision"],
    )
    return _Options(
        block_size=_checks.positive_int(kw["block_size"], "block_size"),
        merge_small_dims=kw["merge_small_dims"],
        max_preconditioner_dim=_checks.positive_int(kw["max_preconditioner_dim"], "max_preconditioner_dim"),
        beta2=_checks.in_range(kw["beta2"], "beta2", 0.0, 1.0, low_open=True),
        precondition_every=_checks.positive_int(kw["precondition_every"], "precondition_every"),
        start_preconditioning_step=start,
        statistics_every=_checks.positive_int(kw["statistics_every"], "statistics_every"),
        graft_tx=None if graft_tx is None else optax.with_extra_args_support(graft_tx),
        graft_per_block=kw["graft_per_block"],
        roots=roots,
        statistics_dtype=storage.check_dtype(kw["statistics_dtype"], "statistics_dtype"),
        preconditioner_dtype=storage.check_dtype(kw["preconditioner_dtype"], "preconditioner_dtype"),
        axis_name=axis_name,
        num_workers=num_workers,
    )


def _init(opts: _Options, params: Any) -> ShampooState:
    _checks.check_floating(params, "scale_by_shampoo")
    leaves = jax.tree_util.tree_leaves(params)
    layout = opts.layout(leaves)
    cdt = _compute_dtype(leaves)
    stat_dt, pre_dt = opts.statistics_dtype or cdt, opts.preconditioner_dtype or cdt
    if opts.num_workers:
        tables = blocking.assign_blocks(layout, opts.num_workers).tables
        slots = {key: tables[key].shape[1] for key in layout.keys}
    else:
        slots = dict(zip(layout.keys, layout.group_sizes))
    banks = init_banks(layout, slots, cdt, stat_dt, pre_dt)
    diag_dt = cdt if stat_dt in storage.INTEGER_DTYPES else stat_dt
    # zeros_like keeps a sharded parameter's sharding on its diagonal statistics
    diagonal = tuple(jnp.zeros_like(x, diag_dt) for x, lay in zip(leaves, layout.leaves) if lay.diagonal)
    graft_state = () if opts.graft_tx is None else opts.graft_tx.init(params)
    return ShampooState(
        jnp.zeros((), jnp.int32), *banks, diagonal, graft_state, ByteCounter.zeros(opts.axis_name)
    )


def _update(opts: _Options, updates: Any, state: ShampooState, params: Any = None, **extra_args):
    _checks.check_same_structure(updates, params, "params")
    _checks.check_floating(updates, "scale_by_shampoo")
    leaves, treedef = jax.tree_util.tree_flatten(updates)
    layout = opts.layout(leaves)
    cdt = _compute_dtype(leaves)
    grads = [x.astype(cdt) for x in leaves]
    precision = opts.roots.precision
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else True
    do_stats = finite & (state.count % opts.statistics_every == 0)
    since_start = state.count - opts.start_preconditioning_step
    do_refresh = finite & (since_start >= 0) & (since_start % opts.precondition_every == 0)
    graft_dirs, graft_state = _graft_step(
        opts.graft_tx, updates, state.graft_state, params, finite, extra_args
    )

    # This worker's blocks and its rows of the banks (None: the banks hold exactly them).
    channel = Channel(opts.axis_name, state.bytes_sent)
    if opts.num_workers is not None and opts.num_workers != channel.size:
        raise ValueError(
            f"scale_by_shampoo(num_workers={opts.num_workers}) runs on axis {opts.axis_name!r} of "
            f"{channel.size} workers: pass num_workers equal to the axis size."
        )
    assignment, block_rows = worker_blocks(layout, channel.size, channel.index)
    rows = {key: None for key in layout.keys} if opts.num_workers else block_rows
    blocks = {key: storage.take(b, block_rows[key]) for key, b in blocking.to_banks(layout, grads).items()}
    full = Banks(state.stats, state.preconditioners, state.root_errors, state.root_failures)
    own = take_rows(full, rows)

    # Gated statistics and root refresh: real branches (also under simulate); nothing is sent inside.
    def statistics(_, b):
        new = {k: update_statistics(s, blocks[k], opts.beta2, precision) for k, s in b.stats.items()}
        return b._replace(stats=new)

    own = channel.cond(do_stats, statistics, lambda _, b: b, own)
    own = channel.cond(
        do_refresh, lambda _, b: refresh_preconditioners(b, opts.roots, cdt), lambda _, b: b, own
    )

    # Precondition this worker's blocks, all-gather the directions, graft, assemble the leaves.
    own_dirs = {k: precondition_blocks(blocks[k], own.preconditioners[k], precision) for k in layout.keys}
    dirs = gather_directions(channel, own_dirs, assignment)
    if opts.graft_tx is not None and opts.graft_per_block:
        dirs = graft_blocks(dirs, blocking.to_banks(layout, [x.astype(cdt) for x in graft_dirs]))
    out, diagonal = _leaf_outputs(
        layout,
        leaves,
        grads,
        None if opts.graft_tx is None else graft_dirs,
        blocking.from_banks(layout, dirs),
        state.diagonal,
        do_stats=do_stats,
        preconditioning=state.count >= opts.start_preconditioning_step,
        beta2=opts.beta2,
        config=opts.roots,
        graft_per_block=opts.graft_per_block,
    )
    new_state = ShampooState(
        state.count + 1, *put_rows(full, rows, own), diagonal, graft_state, channel.counter
    )
    return jax.tree_util.tree_unflatten(treedef, out), new_state


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
    opts = _options(**locals())
    return optax.GradientTransformationExtraArgs(
        functools.partial(_init, opts), functools.partial(_update, opts)
    )


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
      learning_rate: a finite number ``> 0`` or a schedule (a callable of the step count). To
        inject it, keep every other argument static:
        ``optax.inject_hyperparams(optdist.shampoo, static_args=optdist.SHAMPOO_STATIC_ARGS)``.
      block_size: maximum block side.
      momentum: heavy-ball momentum in ``[0, 1)`` (``0`` disables it).
      nesterov: Nesterov momentum.
      weight_decay: decoupled weight decay ``>= 0`` (needs ``params`` in ``update``).
      weight_decay_mask: optax mask for weight decay: a tree of booleans with the structure of the
        parameters (or a prefix of it), or a callable ``params -> mask``; None decays every leaf.
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
    kwargs = dict(locals())
    injected = [
        name
        for name, value in kwargs.items()
        if name != "learning_rate" and isinstance(value, (jax.Array, np.ndarray))
    ]
    if injected:
        raise TypeError(
            f"shampoo's {injected} must be Python values, not arrays. With optax.inject_hyperparams "
            "only the learning rate is injectable: pass static_args=optdist.SHAMPOO_STATIC_ARGS."
        )
    learning_rate = kwargs.pop("learning_rate")
    if not callable(learning_rate):  # a schedule is left to optax; a traced (injected) value passes
        inf = float("inf")
        learning_rate = _checks.in_range(
            learning_rate, "learning_rate", 0.0, inf, low_open=True, high_open=True
        )
    momentum = _checks.in_range(kwargs.pop("momentum"), "momentum", 0.0, 1.0, high_open=True)
    nesterov = kwargs.pop("nesterov")
    weight_decay = _checks.in_range(kwargs.pop("weight_decay"), "weight_decay", 0.0, float("inf"))
    weight_decay_mask = kwargs.pop("weight_decay_mask")
    parts = [scale_by_shampoo(**kwargs)]
    if momentum > 0:
        parts.append(optax.trace(decay=momentum, nesterov=nesterov))
    if weight_decay > 0:
        parts.append(
            _checked_mask(optax.add_decayed_weights(weight_decay, weight_decay_mask), weight_decay_mask)
        )
    parts.append(optax.scale_by_learning_rate(learning_rate))
    return optax.chain(*parts)


def _checked_mask(tx: optax.GradientTransformation, mask: Any) -> optax.GradientTransformation:
    """``tx`` (weight decay under ``mask``) that checks the mask's structure at ``init`` and ``update``."""

    def check(tree: Any, what: str) -> None:
        if mask is None:
            return
        m = mask(tree) if callable(mask) else mask
        try:
            jax.tree_util.tree_map(lambda *_: None, m, tree)
        except (ValueError, TypeError):
            raise ValueError(
                "weight_decay_mask must be a tree of booleans with the structure of the parameters (or a "
                "prefix of it), or a callable params -> such a tree; "
                f"{'the callable returned' if callable(mask) else 'got'} {jax.tree_util.tree_structure(m)} "
                f"for {what} of structure {jax.tree_util.tree_structure(tree)}."
            ) from None

    def init_fn(params):
        check(params, "params")
        return tx.init(params)

    def update_fn(updates, state, params=None):
        check(updates, "updates")
        return tx.update(updates, state, params)

    return optax.GradientTransformation(init_fn, update_fn)


SHAMPOO_STATIC_ARGS: tuple[str, ...] = tuple(
    name for name in inspect.signature(shampoo).parameters if name != "learning_rate"
)
"""Arguments of :func:`shampoo` that ``optax.inject_hyperparams`` must keep static (all but the lr)."""
