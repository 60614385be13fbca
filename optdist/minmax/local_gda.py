"""Local gradient descent-ascent: H local GDA steps per worker, then the parameters are averaged."""

from __future__ import annotations

from typing import Any

import optax

from optdist.comm.axes import AxisName
from optdist.outer import _validate
from optdist.outer.outer_loop import SyncEvery, outer_loop


def local_gda(
    learning_rate: float, sync_every: SyncEvery, axis_name: AxisName = "data", **kwargs: Any
) -> optax.GradientTransformationExtraArgs:
    r"""Local GDA (local SGDA in the stochastic case): :math:`H` local steps on the game operator.

    With worker :math:`i`'s operator :math:`F_i = (\nabla_x f_i, -\nabla_y f_i)` (pass it as the
    gradient, e.g. with :func:`optdist.minmax.minmax_operator`), a round from the shared
    :math:`z` is

    .. math::
        z_i \leftarrow z_i - \gamma F_i(z_i) \quad (H \text{ times}), \qquad
        z \leftarrow \frac1n \sum_i z_i

    i.e. :func:`optdist.local_sgd` with inner ``optax.sgd(γ)`` (gradient *descent-ascent*, because
    :math:`F` already carries the ascent sign of :math:`y`), built on :func:`optdist.outer_loop`:
    any aggregator, participation or overlap option of the outer loop applies (``**kwargs``). With
    :math:`H = 1` it is synchronous GDA. Bytes: one all-reduce of the parameters per round.

    On heterogeneous games the local steps drift towards each worker's own equilibrium, so at a
    constant step the method stops at a neighbourhood of the saddle whose size grows with
    :math:`\gamma H` and the spread of the :math:`F_i`; for the exact solution use drift
    correction (``optdist.scaffold(γ, H, axis)`` with :math:`F` as the gradient: SCAFFOLD's control
    variates, the role ProxSkip-VIP-FL's control variates play in the reference paper).

    Args:
      learning_rate: :math:`\gamma > 0` (or a schedule).
      sync_every: :math:`H` (int >= 1) or a schedule ``step -> H``.
      axis_name: the worker axis, or None.
      **kwargs: forwarded to :func:`optdist.outer_loop`.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (it outputs parameter updates).

    Example::

      F = optdist.minmax.minmax_operator(game_loss)
      tx = optdist.minmax.local_gda(0.05, sync_every=8, axis_name="data")
      updates, opt_state = tx.update(F(params, batch), opt_state, params)

    References:
      Zhang, Choudhury, Stich, Loizou, "Communication-Efficient Gradient Descent-Ascent Methods for
      Distributed Variational Inequalities: Unified Analysis and Local Updates", ICLR 2024,
      arXiv:2306.05100.
      Deng, Mahdavi, "Local Stochastic Gradient Descent Ascent: Convergence Analysis and
      Communication Efficiency", AISTATS 2021.
    """
    learning_rate = _validate.learning_rate(learning_rate, "learning_rate")
    kwargs = _validate.forwarded(kwargs)
    return outer_loop(optax.sgd(learning_rate), optax.sgd(1.0), sync_every, axis_name, **kwargs)
