"""The baseline: exact all-reduce mean of per-worker gradients."""

from __future__ import annotations

import optax

from optdist import _checks
from optdist.comm.aggregation import as_transform, exact_mean
from optdist.comm.axes import AxisName


def mean_gradients(axis_name: AxisName) -> optax.GradientTransformationExtraArgs:
    r"""Replaces each worker's gradient by the exact mean over workers.

    .. math:: g \leftarrow \frac{1}{n} \sum_{i=1}^{n} g_i

    One ring all-reduce per step; each worker sends ``2 (n - 1) ceil(E / n) s`` bytes per array of
    ``E`` elements of ``s`` bytes, which the state records. This is plain synchronous data
    parallelism (the baseline every compressed method is compared with); it is
    :func:`optdist.aggregation.exact_mean` run as a gradient transformation.

    Non-finite policy: a NaN/Inf in any worker's gradient reaches every
    worker's mean. ``optax.apply_if_finite`` is *not* enough here (it checks
    each worker's input alone); wrap the chain in
    :func:`optdist.skip_nonfinite` to skip the step on every worker alike.
    Integer gradient leaves raise a TypeError naming the leaf (a mean of integers is no integer).

    Args:
      axis_name: worker axis (str or tuple of str), or None for one worker.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (state: :class:`optdist.comm.AggregationState`).

    Example::

      tx = optax.chain(optdist.mean_gradients("data"), optax.adam(1e-3))
      step = optdist.simulate(train_step, axis_name="data")
    """
    return as_transform(
        exact_mean(), axis_name, check=lambda updates: _checks.check_floating(updates, "mean_gradients")
    )
