"""The local-update outer loop: H inner steps per worker, then one outer step on the shared anchor.

Every local-update method in :mod:`optdist.outer` (Local SGD, DiLoCo, FedOpt,
SCAFFOLD, local adaptive scaling, Delayed Nesterov) is this loop with a
particular inner optimizer, outer optimizer and, for SCAFFOLD and the local
adaptive methods, a :class:`SyncHook` that exchanges extra statistics at the
synchronization step.

Sign convention: the pseudo-gradient is DiLoCo's ``Δ_i = θ_anchor − θ_i``
(a descent direction the outer optimizer *minimizes* along, so
``optax.sgd(1.0)`` moves the anchor to the mean of the workers).  The FedOpt
papers write the server step on ``mean(θ_i − θ) = −Δ``; see
:mod:`optdist.outer.fedopt`.

The sync gate
-------------
The synchronization branch (aggregation collectives + outer step) runs under
:func:`optdist.comm.branching.worker_cond` (``lax.cond``, kept a real branch
under simulated workers).  This was checked to work with collectives inside
the branch in all three execution modes (``vmap`` with an axis name,
``shard_map``, ``pmap``), and it is what makes the method cheap: on non-sync
steps the all-reduce and the outer step are really skipped, on real devices
and in ``optdist.simulate`` alike.  The predicate depends only on the step
count, which is identical on every worker, so every worker takes the same
branch (required for a collective inside a branch).  Under a plain
``jax.vmap`` (not ``optdist.simulate``) the predicate is batched and JAX
computes both branches every step (correct, not amortized).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optdist import _checks
from optdist.aggregation import Aggregator, as_aggregator
from optdist.comm.accounting import ByteCounter
from optdist.comm.axes import AxisName, validate_axis_name
from optdist.comm.channel import Channel
from optdist.outer import _validate

SyncEvery = int | Callable[[jax.Array], jax.Array]
_MAX_PERIOD = 2**30  # an 'infinite' H (e.g. QSR at lr = 0) is clipped here


@dataclasses.dataclass(frozen=True)
class SyncHook:
    """Extra statistics some methods exchange at the sync step (SCAFFOLD's control variates...).

    Attributes:
      payload: ``(inner_state, delta_i, round_steps) -> tree``: this worker's
        contribution, computed after the inner update of the sync step.
      apply: ``(inner_state, payload_i, payload_sum, num_participants,
        num_workers, participates, round_steps) -> inner_state``: the new
        inner state given this worker's payload and the sum of the
        participants' payloads (one ``psum``, counted). ``participates`` is
        this worker's bool flag; ``num_workers`` a static int.
    """

    payload: Callable[[Any, Any, jax.Array], Any]
    apply: Callable[[Any, Any, Any, jax.Array, int, jax.Array, jax.Array], Any]


class OuterLoopState(NamedTuple):
    """State of :func:`outer_loop`.

    Attributes:
      count: inner steps taken (identical on every worker).
      since_sync: inner steps since the last sync (identical).
      round_length: ``H`` of the current round, from ``sync_every`` at the
        round's first step (identical).
      rounds: completed sync rounds (identical).
      skipped_rounds: sync rounds skipped because nobody participated (identical).
      anchor: the shared parameters ``θ`` of the last sync (identical).
      outer_state: the outer optimizer's state (identical).
      inner_state: the inner optimizer's state (**per worker**).
      bytes_sent: bytes this worker has sent (identical).
      aggregator_state: the aggregator's state (e.g. a per-worker error-feedback residual;
        ``()`` for the exact mean), updated on sync steps only.
    """

    count: jax.Array
    since_sync: jax.Array
    round_length: jax.Array
    rounds: jax.Array
    skipped_rounds: jax.Array
    anchor: Any
    outer_state: Any
    inner_state: Any
    bytes_sent: ByteCounter
    aggregator_state: Any


def _validate_sync_every(sync_every: Any) -> SyncEvery:
    if callable(sync_every):
        try:
            h0 = sync_every(jnp.zeros((), jnp.int32))
            h0 = int(np.asarray(h0))
        except (jax.errors.ConcretizationTypeError, TypeError):
            return sync_every  # only known under tracing; clipped to >= 1 at run time
        if h0 < 1:
            raise ValueError(f"sync_every must give a period >= 1; the schedule gives {h0} at step 0.")
        return sync_every
    return _checks.positive_int(sync_every, "sync_every")


def _round_length(sync_every: SyncEvery, step: jax.Array) -> jax.Array:
    if callable(sync_every):
        h = jnp.asarray(sync_every(step))
        if not jnp.issubdtype(h.dtype, jnp.integer):
            h = jnp.floor(jnp.nan_to_num(h, nan=1.0, posinf=_MAX_PERIOD))
        return jnp.clip(h, 1, _MAX_PERIOD).astype(jnp.int32)
    return jnp.asarray(sync_every, jnp.int32)


def _validate_participation(
    participation: Any, num_participants: Any
) -> tuple[np.ndarray | None, int | None]:
    """Static participation: a [rounds, n] (or [n]) bool table, or a sample size per round."""
    if participation is not None and num_participants is not None:
        raise ValueError("Pass either participation (a fixed mask) or num_participants (sampling), not both.")
    if num_participants is not None:
        return None, _checks.positive_int(num_participants, "num_participants")
    if participation is None:
        return None, None
    table = np.asarray(participation)
    if table.dtype != np.bool_ or table.ndim not in (1, 2) or table.size == 0:
        raise ValueError(
            "participation must be a boolean array of shape [num_workers] or [num_rounds, num_workers]; "
            f"got dtype {table.dtype} and shape {table.shape}."
        )
    table = np.atleast_2d(table)
    empty = np.flatnonzero(~table.any(axis=1))
    if empty.size:
        raise ValueError(
            f"participation has an empty participant set in round(s) {empty.tolist()}: every round needs "
            "at least one participating worker."
        )
    return table, None


def _participates(
    table: np.ndarray | None, sample: int | None, seed: int, rounds: jax.Array, channel: Channel
) -> jax.Array | None:
    """This worker's participation flag for the current round (None: everyone participates)."""
    if table is None and sample is None:
        return None
    n = channel.size
    if table is not None:
        if table.shape[1] != n:
            raise ValueError(f"participation has {table.shape[1]} columns but there are {n} workers.")
        return jnp.asarray(table)[rounds % table.shape[0], channel.index]
    if sample > n:
        raise ValueError(f"num_participants={sample} exceeds the {n} workers.")
    # The same key on every worker (seed and round only): all agree on the sample.
    key = jax.random.fold_in(jax.random.key(seed), rounds)
    order = jax.random.permutation(key, n)
    return jnp.any(order[:sample] == channel.index)


def _hooked(hook: SyncHook, inner_state, deltas, round_steps, flag, count, ok, channel: Channel):
    """The inner state after ``hook``'s exchange (one ``psum`` of the participants' payloads)."""
    mine = hook.payload(inner_state, deltas, round_steps)
    mine_w = jax.tree_util.tree_map(lambda x: x * flag.astype(x.dtype), mine)
    total = channel.psum(mine_w)
    hooked = hook.apply(inner_state, mine, total, count, channel.size, flag, round_steps)
    return jax.tree_util.tree_map(lambda new, old: jnp.where(ok, new, old), hooked, inner_state)


def _validate_flags(reset_inner_state: Any, overlap: Any, sync_hook: SyncHook | None) -> None:
    for value, name in ((reset_inner_state, "reset_inner_state"), (overlap, "overlap")):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool; got {value!r}.")
    if overlap and (sync_hook is not None or reset_inner_state):
        raise ValueError("overlap=True does not combine with a sync_hook or reset_inner_state.")


def _aggregate_round(aggregator: Aggregator, deltas, agg_state, channel: Channel, flag):
    """``(Δ, aggregator state, flag, participant count, ok)`` for one sync round (``flag=None``: all)."""
    if flag is None:
        delta, agg_state = aggregator.aggregate(deltas, agg_state, channel)
        return delta, agg_state, jnp.asarray(True), jnp.asarray(channel.size, jnp.float32), jnp.asarray(True)
    weight = flag.astype(jnp.float32)
    delta, agg_state = aggregator.aggregate(deltas, agg_state, channel, weights=weight)
    count = channel.psum(weight)
    return delta, agg_state, flag, count, count > 0


def _outer_step(outer, delta, outer_state, anchor, ok):
    """The new anchor and outer state, both kept where the round is not ``ok`` (nobody took part)."""
    step, new_outer = outer.update(delta, outer_state, anchor)
    new_anchor = optax.apply_updates(anchor, step)
    keep = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(ok, n, o), new, old)
    return keep(new_anchor, anchor), keep(new_outer, outer_state)


def _next_counters(state: OuterLoopState, is_sync, sync_every: SyncEvery):
    """``(count, since_sync, round_length, rounds)`` after this step."""
    count = state.count + 1
    since = jnp.where(is_sync, 0, state.since_sync + 1).astype(jnp.int32)
    length = jnp.where(is_sync, _round_length(sync_every, count), state.round_length).astype(jnp.int32)
    return count, since, length, state.rounds + is_sync.astype(jnp.int32)


def outer_loop(
    inner: optax.GradientTransformation,
    outer: optax.GradientTransformation,
    sync_every: SyncEvery,
    axis_name: AxisName,
    aggregator: Aggregator | Any = None,
    reset_inner_state: bool = False,
    *,
    participation: Sequence[Sequence[bool]] | np.ndarray | None = None,
    num_participants: int | None = None,
    seed: int = 0,
    sync_hook: SyncHook | None = None,
    overlap: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""Runs ``inner`` locally on each worker and an ``outer`` step on the shared anchor every ``H`` steps.

    Per step, on worker ``i`` with parameters ``θ_i`` and gradient ``g_i``:

    .. math::

        u_i, s_i &\leftarrow \mathrm{inner}(g_i, s_i, θ_i), \qquad θ_i' = θ_i + u_i \\
        \text{sync step:}\quad Δ_i &= θ - θ_i', \qquad Δ = \mathrm{aggregate}(\{Δ_i\}) \\
        v, s_{out} &\leftarrow \mathrm{outer}(Δ, s_{out}, θ), \qquad θ \leftarrow θ + v

    and the returned update is ``u_i`` on non-sync steps and ``θ - θ_i`` on
    sync steps (so every worker's parameters become the new anchor, up to
    one float rounding of ``θ_i + (θ − θ_i)``). A step is a sync step when
    it completes a round of ``H`` inner steps; ``H`` is ``sync_every`` or, for
    a schedule, ``sync_every(t)`` evaluated at the round's first step ``t``
    (so :func:`optdist.outer.qsr_sync_every` fixes ``H`` per round, as QSR does).

    With ``outer = optax.sgd(1.0)`` the anchor becomes the workers' mean
    (Local SGD); ``H = 1`` is then synchronous data-parallel training.

    Partial participation: with ``participation`` (a fixed ``[num_rounds,
    num_workers]`` boolean table, cycled) or ``num_participants`` (a uniform
    sample without replacement per round, from ``seed`` and the round index,
    identical on every worker), and/or the per-call extra argument
    ``participating=<bool>`` (this worker's flag at the sync step; e.g. a
    worker that dropped out mid-round passes False), ``Δ`` is the mean over
    participants only. A round in which nobody participates is skipped:
    the anchor and outer state stay, every worker returns to the anchor, and
    ``skipped_rounds`` counts it. Non-participants still join the all-reduce
    (sending zeros), as they would in a real ring.

    State placement: the inner state is per worker; the anchor, outer state
    and counters are identical on every worker. Parameters must be floating point: an integer
    leaf raises a TypeError naming it at ``init`` (keep counters out of the optimized tree).

    Bytes: zero on non-sync steps. On a sync step, what the aggregator sends
    (default: one ring all-reduce of the parameters, ``2 (n-1) ceil(E/n) s``;
    with participation, one ``psum`` of the parameters plus a float32 weight,
    and one 4-byte all-reduce of the participant count), plus the sync
    hook's payload all-reduce if any.

    Non-finite policy: a NaN/Inf in one worker's pseudo-gradient reaches the
    anchor of every worker at the sync. Wrap the transform in
    :func:`optdist.skip_nonfinite` (same axis) to skip such a step on every
    worker — it keeps the previous state, anchor and outer state included.

    Args:
      inner: the local optimizer (a full optimizer producing updates, e.g.
        ``optax.adamw(1e-3)``), applied to this worker's gradient.
      outer: the outer optimizer, fed the aggregated pseudo-gradient ``Δ``
        as its gradient and the anchor as its params.
      sync_every: ``H >= 1`` (int) or a schedule ``step -> H`` (traced
        step; values below 1 are clipped to 1 at run time).
      axis_name: the worker axis, or None for one worker.
      aggregator: any :class:`optdist.aggregation.Aggregator` (default: the exact mean),
        e.g. ``optdist.aggregation.compressed(optdist.compressors.top_k(0.01), feedback="ef")``,
        ``optdist.aggregation.powersgd(4)``, ``optdist.aggregation.robust(aggregators.median())``
        (a robust rule or a compressor is accepted as is). It gets the pseudo-gradients
        ``Δ_i`` on sync steps only; its state lives in ``aggregator_state`` (updated at
        syncs only) and its bytes in this transform's counter. With partial participation
        it gets each worker's weight; aggregators that cannot take weights raise.
      reset_inner_state: re-initialize the inner state at every sync (DiLoCo
        keeps it: default False).
      participation: fixed participation table, ``[num_workers]`` or
        ``[num_rounds, num_workers]`` booleans; no round may be empty.
      num_participants: sample this many workers per round instead.
      seed: seed of the participation sampling.
      overlap: sync on the parameters this step *started* from, so the sync's collectives have no
        data dependence on this step's gradient and a scheduler can run them alongside the
        forward/backward pass: :math:`Δ_i = θ - θ_i` before this step's inner update :math:`u_i`,
        and the worker continues from the new anchor plus :math:`u_i` (the step's update, one
        step stale, is applied on top of the merged parameters instead of being lost). The first
        round's pseudo-gradient then spans ``H - 1`` inner steps, every later one ``H``. Checked on
        the traced program and on the optimized HLO under ``data_parallel``
        (``tests/outer/test_overlap.py``, :func:`optdist.comm.dependence.compiled_collective_dependence`):
        combined with a per-step collective of the gradient, XLA's all-reduce combiner can merge the
        two, and the merged one waits.
      sync_hook: extra statistics to exchange at sync (used by SCAFFOLD and
        the local adaptive methods).

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` accepts the
      extra argument ``participating`` (bool, this worker).

    Example::

      tx = optdist.outer_loop(optax.adamw(1e-3), optax.sgd(0.7, momentum=0.9, nesterov=True),
                              sync_every=50, axis_name="data")
      params_w, state_w = optdist.replicate((params, tx.init(params)), 8)
      step = optdist.simulate(train_step, "data")   # train_step applies tx.update

    References:
      Stich, "Local SGD Converges Fast and Communicates Little", 2019.
      Douillard et al., "DiLoCo: Distributed Low-Communication Training of Language Models", 2023.
      Reddi et al., "Adaptive Federated Optimization", 2021.
    """
    axis_name = validate_axis_name(axis_name)
    sync_every = _validate_sync_every(sync_every)
    table, sample = _validate_participation(participation, num_participants)
    _validate_flags(reset_inner_state, overlap, sync_hook)
    aggregator = as_aggregator(aggregator, "outer_loop")
    _validate.transformation(inner, "inner")
    _validate.transformation(outer, "outer")
    inner = optax.with_extra_args_support(inner)
    outer = optax.with_extra_args_support(outer)

    def init_fn(params):
        _checks.check_floating(params, "outer_loop", "parameters")
        zero = jnp.zeros((), jnp.int32)
        return OuterLoopState(
            count=zero,
            since_sync=zero,
            round_length=_round_length(sync_every, zero),
            rounds=zero,
            skipped_rounds=zero,
            anchor=jax.tree_util.tree_map(jnp.asarray, params),
            outer_state=outer.init(params),
            inner_state=inner.init(params),
            bytes_sent=ByteCounter.zeros(axis_name),
            aggregator_state=aggregator.init(params),
        )

    def update_fn(updates, state, params=None, *, participating=None, **extra_args):
        if params is None:
            raise ValueError("outer_loop needs params in update(grads, state, params).")
        _checks.check_same_structure(updates, params, "params")
        _checks.check_floating(params, "outer_loop", "parameters")
        u, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
        local = jax.tree_util.tree_map(lambda p, d: (p + d).astype(p.dtype), params, u)
        is_sync = state.since_sync + 1 >= state.round_length

        # The inner state goes through the gate only if the sync step changes it
        # (under vmap every gated leaf costs a select per step).
        gate_inner = sync_hook is not None or reset_inner_state

        def sync(channel, operands):
            inner_state, anchor, outer_state, agg_state = operands
            flag = _participates(table, sample, seed, state.rounds, channel)
            if participating is not None:
                given = jnp.asarray(participating, bool)
                flag = given if flag is None else jnp.logical_and(flag, given)
            deltas = jax.tree_util.tree_map(lambda a, x: a - x, anchor, params if overlap else local)
            delta, agg_state, flag, count, ok = _aggregate_round(aggregator, deltas, agg_state, channel, flag)
            if sync_hook is not None:
                round_steps = state.since_sync + 1
                inner_state = _hooked(sync_hook, inner_state, deltas, round_steps, flag, count, ok, channel)
            new_anchor, new_outer = _outer_step(outer, delta, outer_state, anchor, ok)
            if reset_inner_state:
                inner_state = inner.init(new_anchor)
            to_anchor = jax.tree_util.tree_map(lambda a, p: (a - p).astype(p.dtype), new_anchor, params)
            if overlap:
                to_anchor = jax.tree_util.tree_map(lambda t, d: (t + d).astype(t.dtype), to_anchor, u)
            skipped = jnp.logical_not(ok).astype(jnp.int32)
            return to_anchor, inner_state, new_anchor, new_outer, agg_state, skipped

        def local_step(channel, operands):
            del channel
            inner_state, anchor, outer_state, agg_state = operands
            return u, inner_state, anchor, outer_state, agg_state, jnp.zeros((), jnp.int32)

        channel = Channel(axis_name, state.bytes_sent)
        gated_inner = inner_state if gate_inner else None
        out, gated_inner, anchor, outer_state, agg_state, skipped = channel.cond(
            is_sync, sync, local_step, (gated_inner, state.anchor, state.outer_state, state.aggregator_state)
        )
        inner_state = gated_inner if gate_inner else inner_state
        new_state = OuterLoopState(
            *_next_counters(state, is_sync, sync_every),
            skipped_rounds=state.skipped_rounds + skipped,
            anchor=anchor,
            outer_state=outer_state,
            inner_state=inner_state,
            bytes_sent=channel.counter,
            aggregator_state=agg_state,
        )
        return out, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
