"""Aggregators: one protocol for every place workers average something (``optdist.aggregation``).

An :class:`Aggregator` has ``init(params) -> state`` and ``aggregate(tree, state, channel, *,
weights=None) -> (estimate, state)`` (see :mod:`optdist.comm.aggregation`). The same aggregator
serves a per-step gradient (:func:`optdist.comm.as_transform`, or the ready-made
:func:`optdist.mean_gradients`, :func:`optdist.compressed_mean`, :func:`optdist.powersgd`,
:func:`optdist.robust_mean`) and an outer loop's sync (``aggregator=`` of :func:`optdist.outer_loop`
and every outer alias)::

  agg = optdist.aggregation
  tx = optdist.diloco(1e-3, sync_every=50, axis_name="data",
                      aggregator=agg.compressed(optdist.compressors.top_k(0.01), feedback="ef"))
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optax

from optdist.comm.aggregation import AggregationState, Aggregator, as_transform, exact_mean
from optdist.compression.base import Compressor
from optdist.compression.powersgd import powersgd as _powersgd_compressor
from optdist.feedback.compressed_mean import CompressedMeanState, compressed
from optdist.robust.aggregators import Rule
from optdist.robust.robust_mean import robust


def powersgd(rank: int, **options: Any) -> Aggregator:
    """PowerSGD (rank ``r``) with its error feedback as an aggregator:
    ``compressed(compressors.powersgd(rank, **options), feedback="ef")`` (see :func:`optdist.powersgd`)."""
    seed = options.get("seed", 0)
    return compressed(_powersgd_compressor(rank, **options), feedback="ef", seed=seed)


def stateless(fn: Callable[..., Any], name: str | None = None) -> Aggregator:
    """A stateless aggregator from ``fn(tree, channel, *, weights=None) -> estimate``.

    ``fn`` communicates through ``channel`` (so its bytes are counted) and must return the same
    estimate on every worker.
    """

    def aggregate(tree, state, channel, *, weights=None):
        if weights is None:
            return fn(tree, channel), state
        return fn(tree, channel, weights=weights), state

    return Aggregator(lambda params: (), aggregate, name or getattr(fn, "__name__", "stateless"))


def as_aggregator(aggregator: Any, who: str) -> Aggregator:
    """``aggregator`` as an :class:`Aggregator`.

    None is the exact mean; a robust :class:`~optdist.robust.aggregators.Rule`
    (``optdist.aggregators.median()``...) becomes :func:`robust`; a compressor is
    :func:`compressed` without feedback; a function is :func:`stateless`. Anything else raises a
    TypeError naming ``who``.
    """
    if aggregator is None:
        return exact_mean()
    if isinstance(aggregator, Aggregator):
        return aggregator
    if isinstance(aggregator, Rule):
        return robust(aggregator)
    if isinstance(aggregator, Compressor):
        return compressed(aggregator)
    if callable(aggregator) and not isinstance(aggregator, optax.GradientTransformation):
        return stateless(aggregator)
    hint = ""
    if isinstance(aggregator, optax.GradientTransformation):
        hint = (
            " A gradient transformation is not an aggregator: pass the aggregator it is built from, e.g. "
            "optdist.aggregation.compressed(optdist.compressors.top_k(0.01), feedback='ef') instead of "
            "optdist.compressed_mean(...), or optdist.aggregation.powersgd(4) instead of "
            "optdist.powersgd(...)."
        )
    raise TypeError(
        f"{who}: aggregator must be an optdist.aggregation.Aggregator (exact_mean(), compressed(...), "
        f"powersgd(...), robust(...)), a robust rule or a compressor; got {aggregator!r}.{hint}"
    )


__all__ = [
    "AggregationState",
    "Aggregator",
    "CompressedMeanState",
    "Rule",
    "as_aggregator",
    "as_transform",
    "compressed",
    "exact_mean",
    "powersgd",
    "robust",
    "stateless",
]
