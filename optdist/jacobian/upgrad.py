r"""Aggregators of a stack of gradients (Jacobian descent): UPGrad, MGDA and the mean.

Each aggregator maps a matrix :math:`J \in \mathbb{R}^{m \times d}` (one row per objective, or one
row per worker) to one direction :math:`A(J) \in \mathbb{R}^d`. All three are of the form
:math:`A(J) = J^\top w` with weights :math:`w \in \mathbb{R}^m` computed from the Gram matrix
:math:`G = J J^\top` only (``m x m``: cheap when ``m`` is small, whatever ``d``).

They are :class:`~optdist.robust.aggregators.Rule` objects, so they serve in two places:

* **Jacobian descent** (one row per objective): :func:`aggregate_jacobian` turns a rule into a
  gradient transformation on a Jacobian tree (each leaf with a leading axis of size ``m``, as
  ``jax.jacrev`` of a vector-valued loss returns it);
* **over workers** (one row per worker): ``optdist.robust_mean(upgrad(), "data")`` all-gathers the
  workers' flattened gradients and every worker computes the same conflict-free direction, in the
  slot of the mean.

QP solver (all rules here): the box-constrained quadratic programs below are solved by the
Lawson-Hanson active-set method on the Gram matrix (:func:`box_qp`), in at least float32: finite
termination, exact when ``G`` is singular (more objectives or workers than dimensions, where the
answer is often 0), jittable and vmappable (``lax.while_loop``; each step solves one ``m x m``
system). The paper's reference implementation uses ``quadprog``'s dual active-set method; the
solution is the same QP optimum. ``tests/jacobian`` checks it against an exhaustive active-set
solve of the KKT system in float64 NumPy, with fewer and with more rows than dimensions.

References:
  Quinton, Rey, "Jacobian Descent for Multi-Objective Optimization", 2024 (UPGrad, Jacobian
  descent, the mean and MGDA as aggregators).
  Désidéri, "Multiple-gradient descent algorithm (MGDA) for multiobjective optimization", 2012.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax import lax

from optdist import _checks
from optdist.robust import _geometry as geo
from optdist.robust import aggregators as _robust
from optdist.robust.aggregators import Rule


def box_qp(g: jax.Array, b: jax.Array, lower: jax.Array, max_iters: int, tol: float) -> jax.Array:
    r"""Solves :math:`\min_{v \ge \ell} \tfrac12 v^\top G v - b^\top v` for every column of ``b``
    and ``lower`` (``[m, p]``: ``p`` problems sharing the positive semi-definite ``G``).

    With :math:`v = \ell + \mu` this is the non-negative QP
    :math:`\min_{\mu \ge 0} \tfrac12 \mu^\top G \mu + c^\top \mu`, :math:`c = G\ell - b`, solved by
    the Lawson-Hanson active-set method in Gram form: the passive set :math:`P` grows by the
    coordinate of largest negative gradient :math:`-(G\mu + c)_k`, the equality-constrained solution
    on :math:`P` (:math:`G_{PP} z_P = -c_P`) replaces :math:`\mu`, and when it leaves the orthant
    :math:`\mu` moves to the boundary and the coordinates that reach 0 leave :math:`P`. It stops when
    no negative gradient exceeds ``tol`` times the problem's scale (:math:`\max(\max_k G_{kk},
    \max_k |c_k|)`), or after ``max_iters`` additions. Finite termination in exact arithmetic, and it
    stays exact when :math:`G` is singular (more objectives than dimensions: the passive columns stay
    independent), where coordinate descent crawls. A zero row of ``J`` (zero diagonal entry) has a
    zero gradient and keeps its coordinate at its bound.
    """
    c = jnp.matmul(g, lower, precision=lax.Precision.HIGHEST) - b
    mu = jax.vmap(lambda col: _nonnegative_qp(g, col, max_iters, tol), in_axes=1, out_axes=1)(c)
    return lower + mu


def _nonnegative_qp(g: jax.Array, c: jax.Array, max_iters: int, tol: float) -> jax.Array:
    """Lawson-Hanson for ``min_{mu >= 0} mu'G mu / 2 + c'mu`` (one column; see :func:`box_qp`)."""
    m = g.shape[0]
    eye = jnp.eye(m, dtype=g.dtype)
    scale = jnp.maximum(jnp.maximum(jnp.max(jnp.diagonal(g)), jnp.max(jnp.abs(c))), jnp.finfo(g.dtype).tiny)
    threshold = tol * scale

    def objective(mu):
        return 0.5 * mu @ jnp.matmul(g, mu, precision=lax.Precision.HIGHEST) + c @ mu

    def on_passive(passive):  # the minimizer with the coordinates outside `passive` held at 0
        p = passive.astype(g.dtype)
        system = g * p[:, None] * p[None, :] + eye * (1 - p)
        return jnp.linalg.solve(system, -c * p) * p

    def back_off(carry):  # z left the orthant: move mu towards z until a coordinate hits 0
        mu, passive, z = carry
        blocking = passive & (z <= 0)
        ratio = jnp.where(blocking, mu / jnp.where(blocking, mu - z, 1.0), jnp.inf)
        alpha = jnp.clip(jnp.min(ratio), 0.0, 1.0)
        mu = jnp.maximum(mu + alpha * (z - mu), 0.0)
        passive = passive & ~(blocking & (ratio <= alpha)) & (mu > 0)
        return mu, passive, on_passive(passive)

    def outside(carry):
        _, passive, z = carry
        return jnp.any(passive & (z <= 0))

    def cond(carry):
        i, _, _, done = carry
        return (i < max_iters) & ~done

    def body(carry):
        i, mu, passive, _ = carry
        gradient = -(jnp.matmul(g, mu, precision=lax.Precision.HIGHEST) + c)
        candidates = jnp.where(passive, -jnp.inf, gradient)
        k = jnp.argmax(candidates)
        optimal = candidates[k] <= threshold
        grown = passive.at[k].set(True)
        new_mu, new_passive, z = lax.while_loop(outside, back_off, (mu, grown, on_passive(grown)))
        new_mu = jnp.where(new_passive, z, 0.0)
        # No progress is possible when the coordinate just added leaves at once, or when rounding
        # (a near-singular G_PP in float32) makes the step fail to lower the objective: keep mu.
        stuck = ~new_passive[k] | ~(objective(new_mu) < objective(mu))
        finished = optimal | stuck
        mu = jnp.where(finished, mu, new_mu)
        passive = jnp.where(finished, passive, new_passive)
        return i + 1, mu, passive, finished

    start = (jnp.asarray(0), jnp.zeros_like(c), jnp.zeros(m, bool), jnp.asarray(False))
    return lax.while_loop(cond, body, start)[1]


def _checked_options(max_iters: Any, tol: Any) -> tuple[int, float]:
    max_iters = _checks.positive_int(max_iters, "max_iters")
    tol = _checks.in_range(tol, "tol", 0.0, float("inf"))
    return max_iters, tol


def _gram_rule(weights_fn, name: str) -> Rule:
    """A stateless rule ``J -> J^T w(G)``; rows with NaN/Inf propagate (no finite-row masking)."""

    def aggregate(x, state):
        geo.check_matrix(name, x)
        dtype = x.dtype
        x = x.astype(geo.compute_dtype(x))
        w = weights_fn(geo.gram(x))
        return jnp.matmul(w, x, precision=lax.Precision.HIGHEST).astype(dtype), state

    return Rule(lambda d: optax.EmptyState(), aggregate)


def upgrad_weights(gram: jax.Array, max_iters: int = 200, tol: float = 1e-7) -> jax.Array:
    r"""UPGrad's weights from the Gram matrix: :math:`w = \frac1m \sum_i \arg\min_{v \ge e_i} v^\top G v`."""
    m = gram.shape[0]
    eye = jnp.eye(m, dtype=gram.dtype)
    v = box_qp(gram, jnp.zeros_like(eye), eye, max_iters, tol)  # column i: the projection of row i
    return jnp.mean(v, axis=1)


def upgrad(max_iters: int = 200, tol: float = 1e-7) -> Rule:
    r"""UPGrad: the mean of the projections of every row onto the dual cone of the rows.

    With :math:`G = J J^\top` and :math:`e_i` the ``i``-th unit vector,

    .. math::
       w^{(i)} = \arg\min_{v \in \mathbb{R}^m,\ v \ge e_i} v^\top G v, \qquad
       A(J) = J^\top \Big(\frac1m \sum_{i=1}^m w^{(i)}\Big).

    :math:`J^\top w^{(i)}` is the Euclidean projection of the row :math:`g_i = J^\top e_i` onto the
    dual cone :math:`\{x : J x \ge 0\}` (the paper's Proposition: projection through the dual QP).
    Properties (the paper's): *non-conflicting*, :math:`J A(J) \ge 0` (the KKT conditions give
    :math:`G w^{(i)} \ge 0`, so the direction has a non-negative inner product with every row);
    *linear under scaling* and equal to the mean when the rows agree (identical rows give
    :math:`w^{(i)} = e_i`, the weights are :math:`\frac1m \mathbf 1`). We use the paper's uniform
    preference weights :math:`\frac1m`.

    Over workers (``robust_mean(upgrad(), axis)``) it is not Byzantine-robust: it removes conflicts
    between honest gradients, it does not bound an adversary.

    Non-finite policy: a row with NaN/Inf makes the output non-finite (as :func:`mean`).

    Args:
      max_iters: cap on the active-set additions of each QP (:func:`box_qp`; ``m`` or a few more
        suffice), ``>= 1``.
      tol: KKT tolerance relative to the Gram matrix's scale, ``>= 0``.

    Returns:
      A stateless :class:`~optdist.robust.aggregators.Rule`.

    Example::

      tx = optax.chain(optdist.jacobian.aggregate_jacobian(optdist.jacobian.upgrad()), optax.sgd(0.1))
      jac = jax.jacrev(lambda p: jnp.stack([loss_a(p), loss_b(p)]))(params)  # leaves [2, ...]
      updates, state = tx.update(jac, state, params)

    References:
      Quinton, Rey, "Jacobian Descent for Multi-Objective Optimization", 2024.
    """
    max_iters, tol = _checked_options(max_iters, tol)
    return _gram_rule(lambda g: upgrad_weights(g, max_iters, tol), "upgrad")


def mgda_weights(gram: jax.Array, max_iters: int = 200, tol: float = 1e-7) -> jax.Array:
    r"""MGDA's weights: :math:`\arg\min_{w \in \Delta_m} w^\top G w` through the non-negative QP
    :math:`u = \arg\min_{u \ge 0} \frac12 u^\top G u - \mathbf 1^\top u`, :math:`w = u / \mathbf 1^\top u`."""
    m = gram.shape[0]
    ones = jnp.ones((m, 1), gram.dtype)
    # A tiny ridge keeps the NNQP bounded when 0 lies in the hull (then u is large, w still on the simplex).
    ridge = 1e-6 * jnp.maximum(jnp.trace(gram) / m, jnp.finfo(gram.dtype).tiny)
    u = box_qp(gram + ridge * jnp.eye(m, dtype=gram.dtype), ones, jnp.zeros_like(ones), max_iters, tol)[:, 0]
    total = jnp.sum(u)
    return jnp.where(total > 0, u / jnp.where(total > 0, total, 1.0), 1.0 / m)


def mgda(max_iters: int = 200, tol: float = 1e-7) -> Rule:
    r"""MGDA: the minimum-norm point of the convex hull of the rows.

    .. math:: w = \arg\min_{w \ge 0,\ \mathbf 1^\top w = 1} \big\|J^\top w\big\|^2, \qquad A(J) = J^\top w.

    Solved through the equivalent non-negative QP (KKT: :math:`Gw = \lambda \mathbf 1 + \mu` with
    :math:`\lambda = w^\top G w`): :math:`u = \arg\min_{u \ge 0} \frac12 u^\top G u - \mathbf 1^\top u`
    and :math:`w = u / \mathbf 1^\top u`, with a ridge of ``1e-6 tr(G)/m`` on ``G`` so the QP stays
    bounded when the hull contains 0 (Pareto-stationary rows; the output is then ~0). Non-conflicting
    (:math:`J A(J) \ge \|A(J)\|^2 \mathbf 1`) but, unlike UPGrad, not linear under scaling: the
    output follows the row of smallest norm (the paper's criticism).

    Non-finite policy: a row with NaN/Inf makes the output non-finite.

    Args:
      max_iters: cap on the active-set additions of the QP, ``>= 1``.
      tol: KKT tolerance relative to the Gram matrix's scale, ``>= 0``.

    Returns:
      A stateless :class:`~optdist.robust.aggregators.Rule`.

    References:
      Désidéri, "Multiple-gradient descent algorithm (MGDA) for multiobjective optimization", 2012;
      Quinton, Rey, "Jacobian Descent for Multi-Objective Optimization", 2024 (as an aggregator).
    """
    max_iters, tol = _checked_options(max_iters, tol)
    return _gram_rule(lambda g: mgda_weights(g, max_iters, tol), "mgda")


def mean() -> Rule:
    r"""The mean of the rows, :math:`A(J) = \frac1m J^\top \mathbf 1` (the reference aggregator;
    it may conflict with a row: :math:`g_i^\top A(J) < 0` is possible). Same as
    ``optdist.aggregators.mean()``."""
    return _robust.mean()


# --------------------------------------------------------------------------- #
# Jacobian descent as a gradient transformation


def _jacobian_matrix(jac: Any, params: Any, who: str) -> tuple[jax.Array, int]:
    leaves = jax.tree_util.tree_leaves(jac)
    if not leaves:
        raise ValueError(f"{who}: the Jacobian tree has no leaves.")
    ms = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in leaves}
    if len(ms) != 1 or None in ms:
        raise ValueError(
            f"{who} takes a Jacobian: every leaf with one leading axis of size m (objectives), e.g. "
            f"jax.jacrev(lambda p: jnp.stack([loss_1(p), loss_2(p)]))(params); got leading sizes "
            f"{sorted(ms, key=str)}."
        )
    m = ms.pop()
    if params is not None:
        for x, p in zip(leaves, jax.tree_util.tree_leaves(params)):
            if jnp.shape(x)[1:] != jnp.shape(p):
                raise ValueError(
                    f"{who}: a Jacobian leaf of shape {jnp.shape(x)} does not match its parameter of shape "
                    f"{jnp.shape(p)}: each leaf must be [m, *parameter.shape]."
                )
    dtype = jnp.result_type(*leaves)
    return jnp.concatenate([jnp.reshape(x, (m, -1)).astype(dtype) for x in leaves], axis=1), m


def aggregate_jacobian(rule: Rule) -> optax.GradientTransformationExtraArgs:
    r"""Jacobian descent: replaces a Jacobian tree by one aggregated update tree.

    The incoming "gradient" is a Jacobian: every leaf has a leading axis of size ``m`` (one row per
    objective). Each leaf is flattened to ``[m, d_leaf]``, the rows are concatenated into
    :math:`J \in \mathbb{R}^{m \times d}` (the whole model: conflicts are measured on the full
    gradients, as in the paper), the rule gives :math:`A(J) \in \mathbb{R}^d`, and it is split
    back into the parameter tree (leaves lose the leading axis). Chain a step size after it
    (``optax.sgd``, ``optax.adam``): Jacobian descent with UPGrad is ``θ ← θ − η A(J)``.

    No communication (the Jacobian is local); for one row per *worker* use
    ``optdist.robust_mean(rule, axis_name)`` instead.

    Args:
      rule: a :class:`~optdist.robust.aggregators.Rule`: :func:`upgrad`, :func:`mgda`,
        :func:`mean` (or any robust rule).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is the rule's state.

    Example::

      tx = optax.chain(aggregate_jacobian(upgrad()), optax.sgd(0.1))
      jac = jax.jacrev(lambda p: jnp.stack([loss_a(p), loss_b(p)]))(params)
      updates, state = tx.update(jac, state, params)

    References:
      Quinton, Rey, "Jacobian Descent for Multi-Objective Optimization", 2024.
    """
    if not isinstance(rule, Rule):
        raise TypeError(
            f"rule must be an optdist Rule (optdist.jacobian.upgrad(), mgda(), mean()); got {rule!r}."
        )

    def init_fn(params):
        return rule.init(sum(int(jnp.size(p)) for p in jax.tree_util.tree_leaves(params)))

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        _checks.check_floating(updates, "aggregate_jacobian", "Jacobians")
        matrix, _ = _jacobian_matrix(updates, params, "aggregate_jacobian")
        vec, state = rule.aggregate(matrix, state)
        leaves, treedef = jax.tree_util.tree_flatten(updates)
        out, start = [], 0
        for x in leaves:
            shape = jnp.shape(x)[1:]
            size = int(jnp.size(x)) // jnp.shape(x)[0]
            out.append(vec[start : start + size].reshape(shape).astype(x.dtype))
            start += size
        return jax.tree_util.tree_unflatten(treedef, out), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
