"""Streaming DiLoCo: parameter fragments synchronized on staggered schedules, merged τ steps late."""

from __future__ import annotations

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
from optdist.outer import _precision, _validate


class StreamingDiLoCoState(NamedTuple):
    """State of :func:`streaming_diloco`.

    Attributes:
      count: inner steps taken (identical on every worker).
      anchor: the shared parameters ``θ`` (identical); fragment ``p``'s part
        changes at its syncs.
      outer_states: one outer Nesterov state per fragment (identical).
      inner_state: the inner AdamW state (**per worker**).
      bytes_sent: bytes this worker has sent (identical).
      aggregator_states: one aggregator state per fragment (as the aggregator documents: an
        error-feedback residual is per worker), updated at that fragment's syncs only.
    """

    count: jax.Array
    anchor: Any
    outer_states: tuple
    inner_state: Any
    bytes_sent: ByteCounter
    aggregator_states: tuple


def _fragments(num_leaves: int, num_fragments: int) -> list[np.ndarray]:
    if num_leaves < num_fragments:
        raise ValueError(
            f"num_fragments={num_fragments} exceeds the {num_leaves} parameter leaves: a fragment is a "
            "group of whole leaves (layers); use at most one fragment per leaf."
        )
    return np.array_split(np.arange(num_leaves), num_fragments)


def _validate_schedule(sync_every: Any, num_fragments: Any, delay: Any, alpha: Any) -> tuple[int, int, float]:
    sync_every = _checks.positive_int(sync_every, "sync_every")
    num_fragments = _checks.positive_int(num_fragments, "num_fragments")
    if sync_every % num_fragments:
        raise ValueError(
            f"num_fragments={num_fragments} does not divide sync_every={sync_every}: fragments sync "
            "every sync_every / num_fragments steps in turn."
        )
    if isinstance(delay, bool) or not isinstance(delay, int) or not 0 <= delay < sync_every:
        raise ValueError(f"delay must be an integer in [0, sync_every={sync_every}); got {delay!r}.")
    return sync_every, num_fragments, _checks.in_range(alpha, "alpha", 0.0, 1.0)


def streaming_diloco(
    inner_lr: Any,
    sync_every: int,
    axis_name: AxisName = "data",
    num_fragments: int = 1,
    delay: int = 0,
    alpha: float = 0.0,
    outer_lr: float = 0.7,
    outer_momentum: float = 0.9,
    outer_dtype: Any = None,
    *,
    inner_weight_decay: float = 0.1,
    inner_eps: float = 1e-8,
    inner_dtype: str | None = "auto",
    aggregator: Aggregator | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Streaming DiLoCo: DiLoCo whose outer synchronization is spread over parameter fragments.

    The parameter leaves (in tree order) are split into ``P = num_fragments``
    contiguous groups. Fragment ``p`` synchronizes at the steps
    ``t ≡ (p + 1) H / P (mod H)`` (1-based), so one fragment's all-reduce is in
    flight at a time. At fragment ``p``'s sync at step ``t``, with the
    worker's local parameters ``θ_i`` after this step's inner AdamW update:

    .. math::

        Δ_p = \mathrm{mean}_i(θ_{p} - θ_{i,p}), \qquad
        θ_p \leftarrow \mathrm{Nesterov}(θ_p, Δ_p)

    and the result is merged ``τ = delay`` steps later (modelling an all-reduce
    overlapped with ``τ`` inner steps), at step ``t + τ``:

    .. math:: θ_{i,p} \leftarrow α\, θ_{i,p} + (1 - α)\, θ_p

    ``P = 1, τ = 0, α = 0`` is DiLoCo exactly. ``outer_dtype`` (e.g.
    ``jnp.bfloat16``) casts the pseudo-gradient before the all-reduce (low-bit
    outer gradients); bytes are counted from that dtype.

    State: inner state per worker; anchor, outer states and counters
    identical. Bytes: fragment ``p``'s all-reduce on its sync steps only (so
    the per-round total equals DiLoCo's, but the peak per step is ``~1/P``).
    Non-finite policy: a NaN/Inf reaches every worker through the fragment's
    all-reduce; wrap in :func:`optdist.skip_nonfinite`. Partial
    participation is not supported here (use :func:`outer_loop`). Half precision: as
    :func:`optdist.diloco` (``inner_dtype="auto"``: a float32 inner AdamW on float16 / bfloat16 leaves).

    Args:
      inner_lr: inner AdamW learning rate (float or schedule).
      sync_every: ``H``: steps between two syncs of the same fragment (int,
        a multiple of ``num_fragments``).
      axis_name: the worker axis, or None.
      num_fragments: ``P`` (at most the number of parameter leaves).
      delay: ``τ``, the steps between a fragment's sync and its merge, ``0 ≤ τ < H``.
      alpha: merge weight ``α`` of the local parameters, in [0, 1].
      outer_lr, outer_momentum: the outer Nesterov step.
      outer_dtype: dtype of the communicated pseudo-gradient (None: the params' dtype).
      inner_weight_decay: AdamW decoupled weight decay.
      inner_eps: AdamW's ``eps``.
      inner_dtype: ``"auto"`` (float32 inner state for half-precision leaves) or None (the
        parameters' dtype).
      aggregator: any :class:`optdist.aggregation.Aggregator` (default: the exact mean), as in
        :func:`outer_loop`; each fragment keeps its own aggregator state.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example::

      tx = optdist.streaming_diloco(4e-4, sync_every=100, num_fragments=4, delay=5,
                                    alpha=0.5, outer_dtype=jnp.bfloat16)

    References:
      Douillard, Donchev, Rush, Kale, Rusu, Mohan, ... Ranzato, Szlam, Dean,
      "Streaming DiLoCo with overlapping communication: Towards a Distributed
      Free Lunch", 2025.
    """
    axis_name = validate_axis_name(axis_name)
    sync_every, num_fragments, alpha = _validate_schedule(sync_every, num_fragments, delay, alpha)
    inner_lr = _validate.learning_rate(inner_lr, "inner_lr")
    outer_lr = _validate.learning_rate(outer_lr, "outer_lr")
    outer_momentum = _validate.decay(outer_momentum, "outer_momentum")
    aggregator = as_aggregator(aggregator, "streaming_diloco")
    inner_eps = _checks.in_range(inner_eps, "inner_eps", 0.0, float("inf"), high_open=True)
    inner = optax.adamw(inner_lr, eps=inner_eps, weight_decay=inner_weight_decay)
    if _precision.inner_dtype(inner_dtype) == "auto":
        inner = _precision.float32_for_half(inner)
    outer = optax.sgd(outer_lr, momentum=outer_momentum, nesterov=True)
    stride = sync_every // num_fragments

    def _cast(x):  # the communicated pseudo-gradient's dtype
        return x if outer_dtype is None else x.astype(outer_dtype)

    def init_fn(params):
        _checks.check_floating(params, "streaming_diloco", "parameters")
        leaves = jax.tree_util.tree_leaves(params)
        groups = _fragments(len(leaves), num_fragments)
        return StreamingDiLoCoState(
            count=jnp.zeros((), jnp.int32),
            anchor=jax.tree_util.tree_map(jnp.asarray, params),
            outer_states=tuple(outer.init([leaves[j] for j in g]) for g in groups),
            inner_state=inner.init(params),
            bytes_sent=ByteCounter.zeros(axis_name),
            aggregator_states=tuple(aggregator.init([_cast(leaves[j]) for j in g]) for g in groups),
        )

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError("streaming_diloco needs params in update(grads, state, params).")
        _checks.check_same_structure(updates, params, "params")
        _checks.check_floating(params, "streaming_diloco", "parameters")
        u, inner_state = inner.update(updates, state.inner_state, params)
        local = jax.tree_util.tree_map(lambda p, d: (p + d).astype(p.dtype), params, u)
        treedef = jax.tree_util.tree_structure(params)
        local_leaves = treedef.flatten_up_to(local)
        anchor_leaves = treedef.flatten_up_to(state.anchor)
        groups = _fragments(len(local_leaves), num_fragments)
        t = state.count + 1  # this step, 1-based
        channel = Channel(axis_name, state.bytes_sent)
        outer_states, agg_states = [], []
        for p, group in enumerate(groups):
            phase = ((p + 1) * stride) % sync_every
            is_sync = t % sync_every == phase
            frag_local = [local_leaves[j] for j in group]
            frag_anchor = [anchor_leaves[j] for j in group]

            def sync(channel, operands, frag_local=frag_local):
                anchor, ostate, agg_state = operands
                deltas = [_cast(a - x) for a, x in zip(anchor, frag_local)]
                delta, agg_state = aggregator.aggregate(deltas, agg_state, channel)
                delta = [d.astype(a.dtype) for d, a in zip(delta, anchor)]
                step, ostate = outer.update(delta, ostate, anchor)
                return optax.apply_updates(anchor, step), ostate, agg_state

            new_anchor, ostate, agg_state = channel.cond(
                is_sync,
                sync,
                lambda channel, ops: ops,
                (frag_anchor, state.outer_states[p], state.aggregator_states[p]),
            )
            outer_states.append(ostate)
            agg_states.append(agg_state)
            # Merge τ steps after this fragment's sync (its anchor is unchanged in between).
            merge = jnp.logical_and(t % sync_every == (phase + delay) % sync_every, t > delay)
            for j, a in zip(group, new_anchor):
                anchor_leaves[j] = a
                mixed = (alpha * local_leaves[j] + (1 - alpha) * a).astype(a.dtype)
                local_leaves[j] = jnp.where(merge, mixed, local_leaves[j])
        new_params = treedef.unflatten(local_leaves)
        out = jax.tree_util.tree_map(lambda n, p: (n - p).astype(p.dtype), new_params, params)
        return out, StreamingDiLoCoState(
            count=t,
            anchor=treedef.unflatten(anchor_leaves),
            outer_states=tuple(outer_states),
            inner_state=inner_state,
            bytes_sent=channel.counter,
            aggregator_states=tuple(agg_states),
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
