"""robust_mean: all-gather the per-worker updates and aggregate them robustly on every worker."""

from __future__ import annotations

from typing import Any, NamedTuple

import optax
from jax.flatten_util import ravel_pytree

from optdist import _checks
from optdist.comm.accounting import ByteCounter
from optdist.comm.axes import AxisName, validate_axis_name
from optdist.comm.channel import Channel
from optdist.robust.aggregators import Aggregator, PreAggregation, with_pre_aggregation


class RobustMeanState(NamedTuple):
    """State of :func:`robust_mean` (identical on every worker).

    Attributes:
      aggregator: the aggregator's state (e.g. centered clipping's previous estimate).
      bytes_sent: bytes this worker has sent in the all-gathers.
    """

    aggregator: Any
    bytes_sent: ByteCounter


def robust_mean(
    aggregator: Aggregator, axis_name: AxisName, pre_aggregation: PreAggregation | None = None
) -> optax.GradientTransformationExtraArgs:
    r"""Replaces each worker's update by a Byzantine-robust aggregate over workers.

    Every worker flattens its whole update tree into one vector
    :math:`x_i \in \mathbb{R}^d` (``jax.flatten_util.ravel_pytree``), the
    vectors are all-gathered into :math:`X \in \mathbb{R}^{n \times d}`, and
    every worker computes

    .. math:: v = \operatorname{Agg}(\operatorname{Pre}(X)) \quad
       (\operatorname{Pre} = \text{identity when } ``pre_aggregation`` \text{ is None}),

    then unravels :math:`v` back into the update tree. All workers see the same
    ``X`` and run the same deterministic rule, so the result is identical on
    every worker.

    Bytes: one all-gather of the flattened update, ``(n - 1) d s`` bytes per
    worker for ``d`` elements of ``s`` bytes (the dtype ``ravel_pytree``
    produces: the common dtype of the leaves).

    State: the aggregator's state and the byte counter, both identical on all
    workers. Worker momentum (per-worker state) is a separate transform chained
    before, e.g. ``optax.ema(0.9, debias=False)``.

    Non-finite policy: that of the aggregator (every rule except ``mean``
    returns a finite update while the non-finite rows stay within its
    tolerance); see :mod:`optdist.robust.aggregators`.

    Args:
      aggregator: an :class:`~optdist.robust.aggregators.Aggregator`, e.g.
        ``optdist.aggregators.trimmed_mean(2)``.
      axis_name: worker axis (str or tuple of str), or None for one worker.
      pre_aggregation: optional ``[n, d] -> [n, d]`` map applied first, e.g.
        ``optdist.aggregators.nnm(f)``.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example::

      agg = optdist.aggregators
      tx = optax.chain(
          optax.ema(0.9, debias=False),                      # worker momentum
          optdist.robust_mean(agg.centered_clip(1.0), "data", pre_aggregation=agg.nnm(2)),
          optax.sgd(0.1),
      )

    References:
      Karimireddy, He, Jaggi, "Learning from History for Byzantine Robust
      Optimization", 2021 (worker momentum + robust aggregation).
    """
    axis_name = validate_axis_name(axis_name)
    if not isinstance(aggregator, Aggregator):
        raise TypeError(
            f"aggregator must be an optdist.aggregators.Aggregator (e.g. aggregators.median()); "
            f"got {aggregator!r}."
        )
    if pre_aggregation is not None and not callable(pre_aggregation):
        raise TypeError(f"pre_aggregation must be a function [n, d] -> [n, d]; got {pre_aggregation!r}.")
    rule = with_pre_aggregation(aggregator, pre_aggregation)

    def init_fn(params):
        flat, _ = ravel_pytree(params)
        return RobustMeanState(rule.init(flat.size), ByteCounter.zeros(axis_name))

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        _checks.check_same_structure(updates, params, "params")
        _checks.check_floating(updates, "robust_mean")
        flat, unravel = ravel_pytree(updates)
        channel = Channel(axis_name)
        gathered = channel.all_gather(flat)
        vec, agg_state = rule.aggregate(gathered, state.aggregator)
        return unravel(vec.astype(flat.dtype)), RobustMeanState(
            agg_state, state.bytes_sent.add(channel.nbytes)
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
