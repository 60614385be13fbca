"""MoNNA as written in the paper: local momentum step, then nearest-neighbour averaging of models."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.flatten_util import ravel_pytree

from optdist import _checks
from optdist.comm.accounting import ByteCounter
from optdist.comm.axes import AxisName, validate_axis_name
from optdist.comm.channel import Channel
from optdist.robust import _geometry as geo


class MonnaState(NamedTuple):
    """State of :func:`monna_sgd`.

    Attributes:
      momentum: this worker's Polyak momentum of its own gradients (per worker).
      bytes_sent: bytes sent in the model all-gathers (identical on all workers).
    """

    momentum: jax.Array
    bytes_sent: ByteCounter


def monna_sgd(
    learning_rate: float, f: int, axis_name: AxisName, beta: float = 0.9
) -> optax.GradientTransformationExtraArgs:
    r"""MoNNA (decentralized): momentum step, then average of the ``n - f`` nearest models.

    For worker :math:`i` with model :math:`\theta_i` and gradient :math:`g_i`:

    .. math::
       m_i &\leftarrow \beta m_i + (1 - \beta) g_i, \qquad
       \theta_i^{+1/2} = \theta_i - \gamma m_i, \\
       \theta_i^{+} &= \frac{1}{n - f} \sum_{j \in N_i} \theta_j^{+1/2},

    :math:`N_i` = the ``n - f`` half-step models closest to
    :math:`\theta_i^{+1/2}` (itself included). Returned update:
    :math:`\theta_i^{+} - \theta_i`, so ``optax.apply_updates`` yields
    :math:`\theta_i^{+}`. A complete optimizer (it contains the learning rate);
    do not chain another scaling after it.

    This is the paper's peer-to-peer algorithm: each worker averages around
    *its own* model, so models may differ across workers (they carry the
    worker axis, as in gossip). For a single server-side aggregate identical
    on every worker use ``robust_mean(aggregators.monna(f), ...)`` with worker
    momentum chained before it.

    Bytes: one all-gather of the flattened half-step model per step,
    ``(n - 1) d s``.

    State: momentum per worker; byte counter identical on all workers.

    Non-finite policy: received models with NaN/Inf are at distance ``+inf``
    and never averaged (up to ``f`` of them); this worker's own non-finite
    gradient makes its own model non-finite (wrap in :func:`optdist.skip_nonfinite`).

    Args:
      learning_rate: step size :math:`\gamma > 0`.
      f: number of Byzantine workers tolerated (``n > 2f``, checked at trace time).
      axis_name: worker axis (str or tuple of str), or None for one worker.
      beta: momentum coefficient in ``[0, 1)``.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (needs ``params`` in ``update``).

    Example::

      tx = optdist.robust.monna_sgd(0.1, f=2, axis_name="data")
      step = optdist.simulate(train_step, "data")   # params carry the worker axis

    References:
      Farhadkhani, Guerraoui, Gupta, Hoang, Pinot, Stephan, "Robust
      Collaborative Learning with Linear Gradient Overhead", 2023.
    """
    learning_rate = _checks.in_range(learning_rate, "learning_rate", 0.0, float("inf"), low_open=True)
    if isinstance(f, bool) or not isinstance(f, int) or f < 0:
        raise ValueError(f"f must be an integer >= 0; got {f!r}.")
    beta = _checks.in_range(beta, "beta", 0.0, 1.0, high_open=True)
    axis_name = validate_axis_name(axis_name)

    def init_fn(params):
        flat, _ = ravel_pytree(params)
        return MonnaState(jnp.zeros_like(flat), ByteCounter.zeros(axis_name))

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError("monna_sgd averages models: pass params to update(grads, state, params).")
        _checks.check_same_structure(updates, params, "params")
        g, _ = ravel_pytree(updates)
        theta, unravel = ravel_pytree(params)
        momentum = beta * state.momentum + (1.0 - beta) * g.astype(state.momentum.dtype)
        half = theta - learning_rate * momentum.astype(theta.dtype)
        channel = Channel(axis_name, state.bytes_sent)
        models = channel.all_gather(half)
        n = models.shape[0]
        geo.check_f("monna_sgd", f, n, min_n=2 * f + 1, limit="n > 2f")
        ok, models0 = geo.finite_rows(models.astype(geo.compute_dtype(models)))
        dist = jnp.where(ok, jnp.sum((models0 - half.astype(models0.dtype)) ** 2, axis=1), jnp.inf)
        nearest = lax.top_k(-dist, n - f)[1]
        weights = jnp.sum(jax.nn.one_hot(nearest, n, dtype=models0.dtype), axis=0) / (n - f)
        new = geo.row_mean(models0, weights).astype(theta.dtype)
        return unravel(new - theta), MonnaState(momentum, channel.counter)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
