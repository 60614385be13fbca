"""Local SGD: average the workers' parameters every H inner steps."""

from __future__ import annotations

from typing import Any

import optax

from optdist.comm.axes import AxisName
from optdist.outer import _validate
from optdist.outer.outer_loop import SyncEvery, outer_loop


def local_sgd(
    inner: optax.GradientTransformation, sync_every: SyncEvery, axis_name: AxisName, **kwargs: Any
) -> optax.GradientTransformationExtraArgs:
    r"""Local SGD (a.k.a. FedAvg with server learning rate 1): ``H`` local steps, then parameter averaging.

    .. math:: θ \leftarrow θ - 1.0 \cdot \mathrm{mean}_i(θ - θ_i) = \mathrm{mean}_i θ_i

    :func:`optdist.outer.outer_loop` with outer ``optax.sgd(1.0)``. With
    ``sync_every=1`` and an SGD inner optimizer this is synchronous
    data-parallel SGD (averaging parameters after one step equals
    averaging gradients before it). Inner state (e.g. local momentum) is
    per worker and kept across rounds unless ``reset_inner_state=True``.
    Bytes: one all-reduce of the parameters per round, zero otherwise.
    Non-finite policy: as :func:`outer_loop` (wrap in ``optdist.skip_nonfinite``).

    Args:
      inner: the local optimizer (e.g. ``optax.sgd(0.1)``).
      sync_every: ``H`` (int >= 1) or a schedule ``step -> H``.
      axis_name: the worker axis, or None.
      **kwargs: forwarded to :func:`outer_loop` (aggregator, participation, ...).

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example::

      tx = optdist.local_sgd(optax.sgd(0.1), sync_every=8, axis_name="data")

    References:
      Stich, "Local SGD Converges Fast and Communicates Little", ICLR 2019.
      Lin et al., "Don't Use Large Mini-Batches, Use Local SGD", ICLR 2020.
    """
    kwargs = _validate.forwarded(kwargs)
    return outer_loop(inner, optax.sgd(1.0), sync_every, axis_name, **kwargs)
