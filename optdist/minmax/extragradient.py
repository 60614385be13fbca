"""Extragradient and the single-call family (past extragradient, optimistic, reflected gradient)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optdist import _checks
from optdist.aggregation import Aggregator, as_aggregator
from optdist.comm.accounting import ByteCounter
from optdist.comm.axes import AxisName, validate_axis_name
from optdist.comm.channel import Channel
from optdist.comm.packing import compute_dtype

LearningRate = float | Callable[[jax.Array], Any]
Projection = Callable[[Any], Any]


def minmax_operator(loss_fn: Callable[..., Any]) -> Callable[..., Any]:
    r"""The game operator :math:`F(x, y) = (\nabla_x f(x, y), -\nabla_y f(x, y))` of a loss ``f(x, y)``.

    A zero of :math:`F` is a stationary point of :math:`\min_x \max_y f`; for convex-concave
    :math:`f` it is a saddle point and :math:`F` is monotone. Pass :math:`F` where a minimiser
    passes the gradient (``grads``, or ``operator_fn`` of :func:`extragradient`).

    Args:
      loss_fn: ``loss_fn(x, y, *args) -> scalar`` (``x`` the minimising player, ``y`` the maximising
        one; any pytrees).

    Returns:
      ``operator(params, *args) -> (F_x, F_y)`` with ``params = (x, y)``.

    Example::

      F = optdist.minmax.minmax_operator(lambda x, y, batch: game_loss(x, y, batch))
      grads = F(params, batch)  # params = (x, y)
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be a function (x, y, *args) -> scalar; got {loss_fn!r}.")
    grad = jax.grad(loss_fn, argnums=(0, 1))

    def operator(params, *args):
        if not (isinstance(params, (tuple, list)) and len(params) == 2):
            raise ValueError(
                "params must be the pair (x, y) of the minimising and the maximising player; pass "
                f"params=(x, y); got {type(params).__name__}."
            )
        gx, gy = grad(params[0], params[1], *args)
        return type(params)((gx, jax.tree_util.tree_map(jnp.negative, gy)))

    return operator


# ------------------------------------------------------------------------------------------------
# Shared pieces.


def _learning_rate(learning_rate: Any) -> Any:
    if callable(learning_rate):
        return learning_rate
    return _checks.in_range(learning_rate, "learning_rate", 0.0, float("inf"), low_open=True, high_open=True)


def _rate(learning_rate: Any, count: jax.Array) -> jax.Array:
    value = learning_rate(count) if callable(learning_rate) else learning_rate
    return jnp.asarray(value, jnp.float32)


def _projection(projection: Any) -> Projection:
    if projection is None:
        return lambda tree: tree
    if not callable(projection):
        raise TypeError(f"projection must be None or a function params -> params; got {projection!r}.")
    return projection


def _wide(tree: Any) -> Any:
    """``tree`` in the dtype its arithmetic runs in (float32 for half-precision leaves)."""
    return jax.tree_util.tree_map(lambda x: x.astype(compute_dtype(x.dtype)), tree)


def _step(x: Any, rate: jax.Array, v: Any) -> Any:
    """``x - rate * v`` leaf by leaf, in ``x``'s dtype."""
    return jax.tree_util.tree_map(lambda a, b: a - rate.astype(a.dtype) * b.astype(a.dtype), x, v)


def _difference(new: Any, params: Any) -> Any:
    """``new - params`` in the parameters' dtypes (the optax update that moves ``params`` to ``new``)."""
    return jax.tree_util.tree_map(lambda n, p: (n - p.astype(n.dtype)).astype(p.dtype), new, params)


def _check_inputs(updates: Any, params: Any, who: str) -> None:
    if params is None:
        raise ValueError(f"{who} needs the current parameters: call tx.update(operator, state, params).")
    _checks.check_same_structure(updates, params, "params")
    _checks.check_floating(updates, who, "operator values")
    _checks.check_floating(params, who, "parameters")


def _projected(project: Projection, tree: Any, like: Any) -> Any:
    out = project(tree)
    _checks.check_same_structure(out, like, "params (the projection's input)")
    return jax.tree_util.tree_map(lambda o, t: jnp.asarray(o).astype(t.dtype), out, tree)


# ------------------------------------------------------------------------------------------------
# Extragradient.


class ExtragradientState(NamedTuple):
    """State of :func:`extragradient` (identical on every worker unless the aggregator keeps per-worker
    state, e.g. error-feedback residuals).

    Attributes:
      count: steps taken (int32); the learning-rate schedule's argument.
      aggregator: the aggregator's state (see its docs for what is per worker).
      bytes_sent: bytes this worker has sent (two aggregations per step).
    """

    count: jax.Array
    aggregator: Any
    bytes_sent: ByteCounter


def extragradient(
    learning_rate: LearningRate,
    axis_name: AxisName = None,
    *,
    aggregator: Aggregator | Any = None,
    projection: Projection | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Extragradient (Korpelevich): an extrapolation step, then the step with the operator there.

    For a monotone operator :math:`V = \frac1n \sum_i V_i` (:math:`V_i` worker :math:`i`'s), step
    sizes :math:`\gamma_t` and the projection :math:`\Pi` onto the feasible set:

    .. math::
        X_{t+1/2} &= \Pi(X_t - \gamma_t V(X_t)) \\
        X_{t+1} &= \Pi(X_t - \gamma_t V(X_{t+1/2}))

    The parameters are :math:`X_t`. ``update`` gets this worker's :math:`V_i(X_t)` as ``updates``
    and evaluates ``operator_fn`` (this worker's :math:`V_i`) once at :math:`X_{t+1/2}`; each of
    the two operator values is averaged over the workers by ``aggregator`` (the exact mean by
    default), so every worker takes the same step. The ergodic average
    :math:`\bar X_T = \sum_t \gamma_t X_{t+1/2} / \sum_t \gamma_t` has an :math:`O(1/T)` gap on
    smooth monotone problems (Nemirovski's Mirror-Prox); keep it outside the optimizer if you need it.
    For a game :math:`\min_x \max_y f`, :math:`V = (\nabla_x f, -\nabla_y f)`
    (:func:`minmax_operator`).

    Bytes: two aggregations per step (the exact mean: two all-reduces of the parameters' size).

    Non-finite policy: like :func:`optdist.mean_gradients` (a NaN operator value on any worker makes
    the update NaN on every worker); wrap in :func:`optdist.skip_nonfinite` to skip such steps.

    Args:
      learning_rate: :math:`\gamma > 0`, a float or a schedule ``count -> rate``.
      axis_name: the worker axis (str or tuple), or None for one worker.
      aggregator: how the operator values are averaged: an :class:`optdist.aggregation.Aggregator`,
        a compressor or a robust rule (see :func:`optdist.aggregation.as_aggregator`); None: exact mean.
      projection: :math:`\Pi`, a function ``params -> params`` (e.g. a clip onto a box); None:
        unconstrained.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose
      ``update(updates, state, params, *, operator_fn)`` needs ``params`` (:math:`X_t`),
      ``updates`` = this worker's :math:`V_i(X_t)` and ``operator_fn(params) -> V_i(params)``
      (``optax.chain`` forwards it). It outputs :math:`X_{t+1} - X_t`.

    Example::

      F = optdist.minmax.minmax_operator(game_loss)            # game_loss(x, y, batch)
      tx = optdist.minmax.extragradient(0.1, "data")

      def train_step(params, opt_state, batch):                # params = (x, y), one worker's view
          operator_fn = lambda p: F(p, batch)
          updates, opt_state = tx.update(operator_fn(params), opt_state, params,
                                         operator_fn=operator_fn)
          return optax.apply_updates(params, updates), opt_state

    References:
      Korpelevich, "The extragradient method for finding saddle points and other problems",
      Matecon 12, 1976.
      Nemirovski, "Prox-method with rate of convergence O(1/t) for variational inequalities with
      Lipschitz continuous monotone operators and smooth convex-concave saddle point problems",
      SIAM J. Optim. 15(1), 2004.
    """
    axis_name = validate_axis_name(axis_name)
    learning_rate = _learning_rate(learning_rate)
    project = _projection(projection)
    agg = as_aggregator(aggregator, "extragradient")

    def init_fn(params):
        return ExtragradientState(jnp.zeros((), jnp.int32), agg.init(params), ByteCounter.zeros(axis_name))

    def update_fn(updates, state, params=None, *, operator_fn: Callable[[Any], Any] | None = None, **extra):
        del extra
        if operator_fn is None or not callable(operator_fn):
            raise ValueError(
                "extragradient evaluates the operator at the extrapolated point: call "
                "tx.update(V_i(params), state, params, operator_fn=lambda p: V_i(p)) with this worker's "
                f"operator (optax.chain forwards operator_fn); got operator_fn={operator_fn!r}."
            )
        _check_inputs(updates, params, "extragradient")
        channel = Channel(axis_name, state.bytes_sent)
        rate = _rate(learning_rate, state.count)
        x = _wide(params)
        v, agg_state = agg.aggregate(updates, state.aggregator, channel)
        half = _projected(project, _step(x, rate, v), x)
        half_params = jax.tree_util.tree_map(lambda h, p: h.astype(p.dtype), half, params)
        v_half_i = operator_fn(half_params)
        _checks.check_same_structure(v_half_i, params, "params (operator_fn's output)")
        v_half, agg_state = agg.aggregate(v_half_i, agg_state, channel)
        new = _projected(project, _step(x, rate, v_half), x)
        return _difference(new, params), ExtragradientState(state.count + 1, agg_state, channel.counter)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ------------------------------------------------------------------------------------------------
# Single-call methods: one operator value per step, so they are plain update(operator) transforms.


class SingleCallState(NamedTuple):
    """State of :func:`past_extragradient`, :func:`optimistic_gradient` and :func:`reflected_gradient`.

    The parameters are the points :math:`X_{t+1/2}` where the operator is evaluated; the state keeps
    what the rule needs besides them (identical on every worker).

    Attributes:
      count: steps taken (int32); the learning-rate schedule's argument.
      anchor: the base iterate :math:`X_t` (past extragradient, reflected gradient; the parameters'
        compute dtype), or None.
      previous: the previous operator value :math:`V_{t-1/2}` (optimistic gradient), or None.
      aggregator: the aggregator's state.
      bytes_sent: bytes this worker has sent (one aggregation per step).
    """

    count: jax.Array
    anchor: Any
    previous: Any
    aggregator: Any
    bytes_sent: ByteCounter


_KINDS = ("past_extragradient", "optimistic_gradient", "reflected_gradient")


def _single_call(
    kind: str, learning_rate: Any, axis_name: AxisName, aggregator: Any, projection: Any
) -> optax.GradientTransformationExtraArgs:
    """The three single-call rules on one skeleton (the docstrings of the public factories)."""
    assert kind in _KINDS
    axis_name = validate_axis_name(axis_name)
    learning_rate = _learning_rate(learning_rate)
    project = _projection(projection)
    agg = as_aggregator(aggregator, kind)
    keeps_anchor = kind != "optimistic_gradient"

    def init_fn(params):
        wide = jax.tree_util.tree_map(lambda p: jnp.asarray(p).astype(compute_dtype(p.dtype)), params)
        zeros = jax.tree_util.tree_map(jnp.zeros_like, wide)
        return SingleCallState(
            jnp.zeros((), jnp.int32),
            wide if keeps_anchor else None,
            None if keeps_anchor else zeros,
            agg.init(params),
            ByteCounter.zeros(axis_name),
        )

    def update_fn(updates, state, params=None, **extra):
        del extra
        _check_inputs(updates, params, kind)
        channel = Channel(axis_name, state.bytes_sent)
        v_i, agg_state = agg.aggregate(updates, state.aggregator, channel)
        v = _wide(v_i)
        rate, next_rate = _rate(learning_rate, state.count), _rate(learning_rate, state.count + 1)
        anchor, previous = state.anchor, state.previous
        if kind == "past_extragradient":
            anchor = _projected(project, _step(state.anchor, rate, v), v)  # X_{t+1}
            new = _projected(project, _step(anchor, next_rate, v), v)  # X_{t+3/2}
        elif kind == "reflected_gradient":
            anchor = _projected(project, _step(state.anchor, rate, v), v)  # X_{t+1}
            new = jax.tree_util.tree_map(lambda a, b: 2 * a - b, anchor, state.anchor)  # 2 X_{t+1} - X_t
        else:  # optimistic gradient
            x_half = _wide(params)
            x_next = jax.tree_util.tree_map(  # X_{t+1} = X_{t+1/2} + γ_t V_{t-1/2} - γ_t V_{t+1/2}
                lambda x, p, c: x + rate.astype(x.dtype) * (p - c), x_half, state.previous, v
            )
            new = _projected(project, _step(x_next, next_rate, v), v)  # X_{t+3/2}
            previous = v
        new_state = SingleCallState(state.count + 1, anchor, previous, agg_state, channel.counter)
        return _difference(new, params), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


_SINGLE_CALL_COMMON = r"""
    The parameters are the points :math:`X_{t+1/2}` where the operator is evaluated: ``update`` gets
    this worker's :math:`V_i(X_{t+1/2})` as ``updates`` (``updates`` of a plain optax step), averages
    it over the workers with ``aggregator`` (exact mean by default: one all-reduce per step, half of
    :func:`extragradient`'s), and returns :math:`X_{t+3/2} - X_{t+1/2}`. Initialisation:
    :math:`V_{-1/2} = 0` and :math:`X_{-1} = X_0`, so :math:`X_{1/2} = X_0` is the initial
    parameters. With constant steps and no projection past extragradient, optimistic gradient and
    reflected gradient produce the same iterates,
    :math:`X_{t+3/2} = X_{t+1/2} - 2\gamma V_{t+1/2} + \gamma V_{t-1/2}` (the paper's Section 3;
    optimistic gradient is then ``optax.optimistic_gradient_descent(γ)`` after the first step, where
    optax takes :math:`V_{-1/2} = V_{1/2}`); they differ under a
    projection and (reflected gradient) under a step-size schedule. Their ergodic average of
    :math:`X_{t+1/2}` has the :math:`O(1/t)` gap of extragradient on smooth monotone problems (the
    paper's Theorem 1).

    Non-finite policy: like :func:`optdist.mean_gradients`; wrap in :func:`optdist.skip_nonfinite`.

    Args:
      learning_rate: :math:`\gamma > 0`, a float or a schedule ``count -> rate``.
      axis_name: the worker axis (str or tuple), or None for one worker (no communication).
      aggregator: how the operator values are averaged (see :func:`extragradient`); None: exact mean.
      projection: :math:`\Pi`, a function ``params -> params``; None: unconstrained.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (it outputs parameter updates: chain nothing after).

    References:
      Hsieh, Iutzeler, Malick, Mertikopoulos, "On the convergence of single-call stochastic
      extra-gradient methods", NeurIPS 2019, arXiv:1908.08465.
"""


def past_extragradient(
    learning_rate: LearningRate,
    axis_name: AxisName = None,
    *,
    aggregator: Aggregator | Any = None,
    projection: Projection | None = None,
) -> optax.GradientTransformationExtraArgs:
    return _single_call("past_extragradient", learning_rate, axis_name, aggregator, projection)


past_extragradient.__doc__ = (
    r"""Past extragradient (Popov): extragradient that reuses the last operator value to extrapolate.

    .. math::
        X_{t+1/2} &= \Pi(X_t - \gamma_t V_{t-1/2}) \\
        X_{t+1} &= \Pi(X_t - \gamma_t V_{t+1/2}), \qquad V_{t+1/2} = V(X_{t+1/2})

    The state keeps :math:`X_t`.

    Example::

      tx = optdist.minmax.past_extragradient(0.1, "data")
      updates, opt_state = tx.update(F(params, batch), opt_state, params)
"""
    + _SINGLE_CALL_COMMON
    + """      Popov, "A modification of the Arrow-Hurwicz method for search of saddle points",
      Mathematical Notes 28(5), 1980.
"""
)


def optimistic_gradient(
    learning_rate: LearningRate,
    axis_name: AxisName = None,
    *,
    aggregator: Aggregator | Any = None,
    projection: Projection | None = None,
) -> optax.GradientTransformationExtraArgs:
    return _single_call("optimistic_gradient", learning_rate, axis_name, aggregator, projection)


optimistic_gradient.__doc__ = (
    r"""Optimistic gradient: the last operator value as a prediction of the next one.

    .. math::
        X_{t+1/2} &= \Pi(X_t - \gamma_t V_{t-1/2}) \\
        X_{t+1} &= X_{t+1/2} + \gamma_t V_{t-1/2} - \gamma_t V_{t+1/2}

    The state keeps :math:`V_{t-1/2}`; :math:`X_{t+1}` is not projected (the paper's form).

    Example::

      tx = optdist.minmax.optimistic_gradient(0.1, "data")
      updates, opt_state = tx.update(F(params, batch), opt_state, params)
"""
    + _SINGLE_CALL_COMMON
    + """      Daskalakis, Ilyas, Syrgkanis, Zeng, "Training GANs with Optimism", ICLR 2018.
"""
)


def reflected_gradient(
    learning_rate: LearningRate,
    axis_name: AxisName = None,
    *,
    aggregator: Aggregator | Any = None,
    projection: Projection | None = None,
) -> optax.GradientTransformationExtraArgs:
    return _single_call("reflected_gradient", learning_rate, axis_name, aggregator, projection)


reflected_gradient.__doc__ = (
    r"""Reflected gradient (Malitsky): extrapolate by reflecting the last move.

    .. math::
        X_{t+1/2} &= X_t - (X_{t-1} - X_t) = 2 X_t - X_{t-1} \\
        X_{t+1} &= \Pi(X_t - \gamma_t V(X_{t+1/2}))

    The state keeps :math:`X_t`; :math:`X_{t+1/2}` is not projected, so :math:`V` must be defined
    outside the feasible set.

    Example::

      tx = optdist.minmax.reflected_gradient(0.1, "data")
      updates, opt_state = tx.update(F(params, batch), opt_state, params)
"""
    + _SINGLE_CALL_COMMON
    + """      Malitsky, "Projected reflected gradient methods for monotone variational inequalities",
      SIAM J. Optim. 25(1), 2015.
"""
)
