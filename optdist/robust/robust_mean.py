"""robust_mean: all-gather the per-worker updates and aggregate them robustly on every worker."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from optdist import _checks
from optdist.comm.aggregation import Aggregator, as_transform
from optdist.comm.axes import AxisName
from optdist.robust.aggregators import PreAggregation, Rule, with_pre_aggregation


def robust_mean(
    aggregator: Rule, axis_name: AxisName, pre_aggregation: PreAggregation | None = None
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

    State: an :class:`~optdist.comm.AggregationState` holding the rule's state and the byte counter,
    both identical on all workers. Worker momentum (per-worker state) is a separate transform chained
    before, e.g. ``optax.ema(0.9, debias=False)``.

    Non-finite policy: that of the aggregator (every rule except ``mean``
    returns a finite update while the non-finite rows stay within its
    tolerance); see :mod:`optdist.robust.aggregators`.

    Args:
      aggregator: a :class:`~optdist.robust.aggregators.Rule`, e.g.
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
    return as_transform(
        robust(aggregator, pre_aggregation),
        axis_name,
        check=lambda updates: _checks.check_floating(updates, "robust_mean"),
    )


def robust(rule: Rule, pre_aggregation: PreAggregation | None = None) -> Aggregator:
    """The :class:`~optdist.comm.Aggregator` of a robust rule: all-gather the flattened trees, apply
    ``rule`` (after ``pre_aggregation``) on every worker, unravel. See :func:`robust_mean` (this
    aggregator as a gradient transformation) for the math and the bytes; in an outer loop it makes
    the sync robust (``optdist.diloco(..., aggregator=robust(aggregators.trimmed_mean(1)))``).

    The state is the rule's (identical on every worker). Participation weights are not taken (a
    rule's tolerance ``f`` is defined over all ``n`` rows): it raises if given them.
    """
    if not isinstance(rule, Rule):
        raise TypeError(
            f"aggregator must be an optdist.aggregators.Rule (e.g. aggregators.median()); got {rule!r}."
        )
    if pre_aggregation is not None and not callable(pre_aggregation):
        raise TypeError(f"pre_aggregation must be a function [n, d] -> [n, d]; got {pre_aggregation!r}.")
    full = with_pre_aggregation(rule, pre_aggregation)

    def init(params):  # the flattened size (no ravel: a reshape would drop an explicit sharding)
        return full.init(sum(math.prod(jnp.shape(x)) for x in jax.tree_util.tree_leaves(params)))

    def aggregate(tree, state, channel, *, weights=None):
        if weights is not None:
            raise ValueError(
                "a robust aggregator does not take participation weights (partial participation)."
            )
        flat, unravel = ravel_pytree(tree)
        vec, state = full.aggregate(channel.all_gather(flat), state)
        return unravel(vec.astype(flat.dtype)), state

    return Aggregator(init, aggregate, "robust")
