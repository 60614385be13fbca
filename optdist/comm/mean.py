"""The baseline: exact all-reduce mean of per-worker gradients."""

from __future__ import annotations

from typing import NamedTuple

import optax

from optdist import _checks
from optdist.comm.accounting import ByteCounter
from optdist.comm.axes import AxisName, validate_axis_name
from optdist.comm.channel import Channel


class MeanGradientsState(NamedTuple):
    """State of :func:`mean_gradients`: the bytes this worker has sent (identical on all workers)."""

    bytes_sent: ByteCounter


def mean_gradients(axis_name: AxisName) -> optax.GradientTransformationExtraArgs:
    r"""Replaces each worker's gradient by the exact mean over workers.

    .. math:: g \leftarrow \frac{1}{n} \sum_{i=1}^{n} g_i

    One ring all-reduce per step (leaves packed per dtype); each worker sends
    ``2 (n - 1) ceil(E / n) s`` bytes for ``E`` elements of ``s`` bytes, which
    the state records. This is plain synchronous data parallelism (the
    baseline every compressed method is compared with).

    Non-finite policy: a NaN/Inf in any worker's gradient reaches every
    worker's mean. ``optax.apply_if_finite`` is *not* enough here (it checks
    each worker's input alone); wrap the chain in
    :func:`optdist.skip_nonfinite` to skip the step on every worker alike.

    Args:
      axis_name: worker axis (str or tuple of str), or None for one worker.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example::

      tx = optax.chain(optdist.mean_gradients("data"), optax.adam(1e-3))
      step = optdist.simulate(train_step, axis_name="data")
    """
    axis_name = validate_axis_name(axis_name)

    def init_fn(params):
        del params
        return MeanGradientsState(ByteCounter.zeros(axis_name))

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        _checks.check_same_structure(updates, params, "params")
        channel = Channel(axis_name)
        updates = channel.pmean(updates)
        return updates, MeanGradientsState(state.bytes_sent.add(channel.nbytes))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
