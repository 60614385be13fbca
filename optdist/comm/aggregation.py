"""One aggregation protocol for every slot: per-step gradients, per-round pseudo-gradients, fragments.

An :class:`Aggregator` turns every worker's tree into one estimate of their mean, identical on every
worker:

* ``init(params) -> state``;
* ``aggregate(tree, state, channel, *, weights=None) -> (estimate, state)``: all communication goes
  through ``channel`` (:class:`~optdist.comm.channel.Channel`), which counts its bytes, so an
  aggregator never touches a byte counter.

``weights`` (partial participation): this worker's float32 weight (1 participates, 0 not); the
estimate is then the mean over participants, and an aggregator that cannot honour weights raises.

The exact mean (:func:`exact_mean`), every compressor with every feedback variant
(:func:`optdist.aggregation.compressed`), PowerSGD and every robust rule
(:func:`optdist.aggregation.robust`) are Aggregators. :func:`as_transform` makes any of them a
gradient transformation (that is all :func:`optdist.mean_gradients`, :func:`optdist.compressed_mean`,
:func:`optdist.powersgd` and :func:`optdist.robust_mean` are), and every outer loop takes one for its
sync (:func:`optdist.outer_loop`, :func:`optdist.streaming_diloco` with one state per fragment).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optdist import _checks
from optdist.comm.accounting import ByteCounter
from optdist.comm.axes import AxisName, validate_axis_name
from optdist.comm.channel import Channel


class Aggregator(NamedTuple):
    """A way to average per-worker trees over a channel (see the module docstring).

    Attributes:
      init: ``init(params) -> state``.
      aggregate: ``aggregate(tree, state, channel, *, weights=None) -> (estimate, state)``.
      name: a short human-readable name, e.g. ``"compressed(top_k(0.01), ef)"``.
    """

    init: Callable[[Any], Any]
    aggregate: Callable[..., tuple[Any, Any]]
    name: str = "aggregator"


def _mean(tree: Any, state: Any, channel: Channel, *, weights: jax.Array | None = None) -> tuple[Any, Any]:
    if weights is None:
        return channel.pmean(tree), state
    weighted = jax.tree_util.tree_map(lambda d: d * weights.astype(d.dtype), tree)
    total, count = channel.psum((weighted, jnp.asarray(weights, jnp.float32)))
    count = jnp.maximum(count, 1.0)
    return jax.tree_util.tree_map(lambda t: (t / count.astype(t.dtype)).astype(t.dtype), total), state


def exact_mean() -> Aggregator:
    r"""The exact mean over workers, :math:`\frac1n \sum_i x_i`: one ring all-reduce.

    Bytes: ``2 (n - 1) ceil(E / n) s`` per array of ``E`` elements of ``s`` bytes. With weights
    :math:`w_i`: :math:`\sum_i w_i x_i / \max(\sum_i w_i, 1)`, one all-reduce of the weighted tree
    and the float32 weight together (an all-zero weight gives zeros).
    """
    return Aggregator(lambda params: (), _mean, "exact_mean")


class AggregationState(NamedTuple):
    """State of an aggregator run as a gradient transformation (:func:`as_transform`).

    Attributes:
      aggregator: the aggregator's state (its docs say what is shared and what is per worker).
      bytes_sent: bytes this worker has sent (identical on every worker).
    """

    aggregator: Any
    bytes_sent: ByteCounter


def as_transform(
    aggregator: Aggregator, axis_name: AxisName, check: Callable[[Any], None] | None = None
) -> optax.GradientTransformationExtraArgs:
    """Replaces each worker's gradient by ``aggregator``'s estimate of the mean over ``axis_name``.

    Args:
      aggregator: an :class:`Aggregator`.
      axis_name: the worker axis (str or tuple), or None for one worker.
      check: optional validation of the incoming gradient tree (raises on bad input).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is an :class:`AggregationState`.
    """
    axis_name = validate_axis_name(axis_name)

    def init_fn(params):
        return AggregationState(aggregator.init(params), ByteCounter.zeros(axis_name))

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        _checks.check_same_structure(updates, params, "params")
        if check is not None:
            check(updates)
        channel = Channel(axis_name, state.bytes_sent)
        estimate, agg_state = aggregator.aggregate(updates, state.aggregator, channel)
        return estimate, AggregationState(agg_state, channel.counter)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
