r"""Schedule-free learning (Defazio et al.) inside an outer loop, and the parameters to evaluate.

``optax.contrib.schedule_free`` is used as is, as the outer or the inner optimizer of
:func:`optdist.outer_loop` (nothing is reimplemented). Its update, for a base optimizer that
moves :math:`z` (plain SGD: :math:`z \leftarrow z - \gamma g`):

.. math::
   y_t = (1 - \beta) z_t + \beta x_t, \qquad z_{t+1} = z_t - \gamma \nabla f(y_t), \qquad
   x_{t+1} = (1 - c_{t+1}) x_t + c_{t+1} z_{t+1},

with :math:`c_{t+1} = \gamma_t^p / \sum_{s \le t} \gamma_s^p` (``weight_lr_power`` :math:`p`;
:math:`1/(t+1)` for a constant learning rate: the uniform average of :math:`z_1, \dots, z_{t+1}`).
The optimizer's parameters are :math:`y` (where gradients are taken), its state holds :math:`z`
(and :math:`\beta`), and :math:`x = (y - (1 - \beta) z)/\beta` is the sequence to *evaluate*.
The paper's limits: :math:`\beta = 1` is primal averaging (gradients at the running average,
:math:`y = x`); :math:`\beta = 0` is Polyak averaging (SGD on :math:`z = y`, evaluated at the
average of its iterates). ``optax.contrib.schedule_free`` needs :math:`\beta > 0` (it recovers
:math:`x` by dividing by :math:`\beta`), so :math:`\beta = 0` is reached as a limit (a small
:math:`\beta` is within :math:`O(\beta)` of it; ``tests/outer/test_schedule_free.py``).

**Outer optimizer** (``outer_loop(inner, schedule_free(optax.sgd(outer_lr), outer_lr, b1), H,
axis)``): the pseudo-gradient :math:`\Delta` is the gradient at :math:`y` = the anchor, the state
(:math:`z`) lives in ``OuterLoopState.outer_state`` and is identical on every worker. The
evaluation parameters are :math:`x = (\theta_{\text{anchor}} - (1-\beta) z)/\beta`, identical on
every worker: ``schedule_free_eval_params(state)``. Between syncs the workers' parameters are
local iterates; evaluate :math:`x`, not them. Deviation from the paper: the base optimizer
sees one pseudo-gradient per round, so :math:`t` counts rounds and the average is over the
anchors :math:`z` of past rounds.

**Inner optimizer** (``outer_loop(schedule_free(optax.sgd(lr), lr, b1), optax.sgd(1.0), H,
axis)``): each worker keeps its own :math:`z_i` (``inner_state``, per worker) and its parameters
are its :math:`y_i`; the worker's evaluation parameters are :math:`x_i = (\theta_i - (1-\beta)
z_i)/\beta`, ``schedule_free_eval_params(state, params)`` with the worker's parameters. At a sync the
outer loop replaces every :math:`y_i` by the anchor and keeps :math:`z_i`; with the averaging outer
step (``optax.sgd(1.0)``) the workers' mean of :math:`x_i` is unchanged by the sync (it is linear in
:math:`y_i` and :math:`z_i`), so the model to evaluate is :math:`\frac1n\sum_i x_i` (the mean of
this function's per-worker output over the worker axis). ``reset_inner_state=True`` instead
restarts every worker's average at the anchor each round.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from optax.contrib import ScheduleFreeState

from optdist._tree import instances
from optdist.outer.outer_loop import OuterLoopState


def _find(tree: Any, kind: type) -> Any:
    """The first instance of ``kind`` in a state tree, or None."""
    return next(iter(instances(tree, kind)), None)


def _eval(sf: ScheduleFreeState, params: Any) -> Any:
    """``(y - (1 - b1) z) / b1``; ``b1`` may carry leading worker axes (a replicated state)."""

    def one(y, z):
        b1 = jnp.asarray(sf.b1)
        b1 = b1.reshape(b1.shape + (1,) * (jnp.ndim(y) - b1.ndim)).astype(jnp.result_type(y))
        return ((y - (1.0 - b1) * z) / b1).astype(jnp.result_type(y))

    return jax.tree_util.tree_map(one, params, sf.z)


def schedule_free_eval_params(state: Any, params: Any = None) -> Any:
    r"""The parameters to evaluate for a schedule-free optimizer inside :func:`optdist.outer_loop`.

    .. math:: x = \frac{y - (1 - \beta) z}{\beta}

    * schedule-free as the **outer** optimizer: :math:`y` is the anchor and :math:`z` is in the outer
      state; ``params`` is not needed (ignored). The result is identical on every worker.
    * schedule-free as the **inner** optimizer: :math:`y` is the worker's parameters (pass them as
      ``params``) and :math:`z` is in its inner state; the result is per worker, and the model to
      evaluate is its mean over workers (see the module docstring).
    * a plain ``ScheduleFreeState`` (no outer loop): as ``optax.contrib.schedule_free_eval_params``.

    Works on one worker's state or on a stacked state with a leading worker axis (as returned by
    ``optdist.simulate``); the outer loop's state may sit inside a chain or ``skip_nonfinite``.

    Args:
      state: an :class:`~optdist.outer.OuterLoopState` (or a state tree holding one), or a
        ``ScheduleFreeState``.
      params: the worker's parameters :math:`y` (inner case and plain case).

    Returns:
      The evaluation parameters, structured like the parameters.

    Example::

      tx = optdist.outer_loop(optax.sgd(0.1), optax.contrib.schedule_free(optax.sgd(0.7), 0.7, 0.9),
                              sync_every=10, axis_name="data")
      ...
      eval_params = optdist.outer.schedule_free_eval_params(state_w)  # [workers, ...], all equal

    References:
      Defazio, Yang, Mehta, Mishchenko, Khaled, Cutkosky, "The Road Less Scheduled", 2024.
    """
    loop = _find(state, OuterLoopState)
    if loop is None:
        sf = _find(state, ScheduleFreeState)
        if sf is None:
            raise ValueError(
                "schedule_free_eval_params needs the state of an outer_loop (or of "
                "optax.contrib.schedule_free) that uses optax.contrib.schedule_free; none found in "
                f"a state of type {type(state).__name__}."
            )
        if params is None:
            raise ValueError("pass params (the optimizer's parameters y) with a plain ScheduleFreeState.")
        return _eval(sf, params)
    outer = _find(loop.outer_state, ScheduleFreeState)
    if outer is not None:
        return _eval(outer, loop.anchor)
    inner = _find(loop.inner_state, ScheduleFreeState)
    if inner is None:
        raise ValueError(
            "this outer_loop uses optax.contrib.schedule_free neither as its outer nor as its inner "
            "optimizer: its parameters are the ones to evaluate."
        )
    if params is None:
        raise ValueError(
            "schedule-free is the inner optimizer here: pass params (this worker's parameters, or the "
            "stacked [workers, ...] parameters) to get each worker's evaluation parameters."
        )
    return _eval(inner, params)


__all__ = ["schedule_free_eval_params"]
