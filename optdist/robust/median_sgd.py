r"""Median-gradient estimators (Schaipp, Garrigos, Simsekli, Gower): SGD on a median of gradients.

The paper replaces the mean gradient of SGD by a *median* gradient, estimated in one of two ways:

* **across samples** (here: across workers): the coordinate-wise or geometric median of the
  workers' gradients, :func:`median_gradients` (it reuses :func:`optdist.aggregators.median` and
  :func:`optdist.aggregators.geometric_median` through :func:`optdist.robust_mean`);
* **across iterations**: a running estimate :math:`m_t` of the median of the gradient *sequence*,
  one stochastic proximal point (SPP) step per gradient on :math:`\min_m \mathbb E\,\|m - g\|`,
  :func:`running_median`. The proximal step of :math:`\tau\|\cdot - g_t\|` is a clipping step,

  .. math:: m_{t+1} = \operatorname{prox}_{\tau\|\cdot - g_t\|}(m_t)
     = m_t + \operatorname{clip}_\tau(g_t - m_t), \qquad
     \operatorname{clip}_\tau(y) = y \min\!\Big(1, \frac{\tau}{\|y\|}\Big)

  (the coordinate-wise median takes the prox of :math:`\tau\|\cdot - g_t\|_1`: clip every coordinate
  of :math:`g_t - m_t` into :math:`[-\tau, \tau]`). The paper's special cases: restarting the
  estimate at zero every step (``center="zero"``) gives :math:`m_{t+1} = \operatorname{clip}_\tau(g_t)`,
  i.e. SGD with norm clipping (:func:`optax.clip_by_global_norm`) or value clipping
  (:func:`optax.clip`); the SPP step on the *mean* objective :math:`\tfrac12\|m - g\|^2` instead
  gives :math:`m + \tfrac{\tau}{1+\tau}(g - m)`, heavy-ball momentum (an online mean).

Across workers, one SPP step from the previous aggregate is
``robust_mean(aggregators.clipped_mean(tau, center="previous"), axis)``, already in the library.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optdist import _checks
from optdist.comm.axes import AxisName
from optdist.robust import aggregators
from optdist.robust.robust_mean import robust_mean

_NORMS = ("l2", "coordinate")
_CENTERS = ("previous", "zero")


def median_gradients(
    axis_name: AxisName,
    kind: str = "coordinate",
    *,
    tau: float = 1.0,
    eps: float = 1e-8,
    max_iters: int = 100,
    tol: float = 1e-6,
) -> optax.GradientTransformationExtraArgs:
    r"""The median of the workers' gradients (median-gradient SGD across samples).

    .. math:: \hat g = \operatorname{median}(g_1, \dots, g_n), \quad
       \text{coordinate-wise (``kind="coordinate"``) or } \arg\min_v \sum_i \|v - g_i\|
       \text{ (``kind="geometric"``, smoothed Weiszfeld)}.

    ``kind="proximal"`` is the paper's stochastic-proximal-point estimate of the geometric median,
    one step per call from the previous estimate :math:`v` (identical on every worker):
    :math:`v \leftarrow v + \frac1n \sum_i \operatorname{clip}_\tau(g_i - v)`
    (:func:`optdist.aggregators.clipped_mean` with ``center="previous"``). Its fixed points with
    every :math:`\|g_i - v\| > \tau` satisfy :math:`\sum_i (g_i - v)/\|g_i - v\| = 0`, the geometric
    median's optimality condition; one clipping step per call costs no iterations.

    Chain an optimizer after it: ``optax.chain(median_gradients("data"), optax.sgd(lr))`` is the
    paper's sample-median SGD with one sample per worker. The paper shows it converges under
    heavy-tailed, state-dependent noise (e.g. Cauchy) where mean-SGD does not.

    Bytes: one all-gather of the flattened gradient, ``(n - 1) d s`` per worker (as
    :func:`optdist.robust_mean`).

    State: that of :func:`optdist.robust_mean` (a byte counter, and for ``"proximal"`` the previous
    estimate; identical on every worker).

    Non-finite policy: the rule's (finite while fewer than half the workers are non-finite).

    Args:
      axis_name: worker axis (str or tuple of str), or None for one worker.
      kind: ``"coordinate"`` (:func:`optdist.aggregators.median`), ``"geometric"``
        (:func:`optdist.aggregators.geometric_median`) or ``"proximal"`` (one SPP step per call).
      tau: the proximal step (clipping radius) of ``kind="proximal"``, ``> 0``.
      eps, max_iters, tol: the geometric median's smoothing, iteration cap and tolerance.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example::

      tx = optax.chain(optdist.robust.median_gradients("data", "geometric"), optax.sgd(0.1))

    References:
      Schaipp, Garrigos, Simsekli, Gower, "SGD with Clipping is Secretly Estimating the Median
      Gradient", 2024.
    """
    if kind == "coordinate":
        rule = aggregators.median()
    elif kind == "geometric":
        rule = aggregators.geometric_median(eps=eps, max_iters=max_iters, tol=tol)
    elif kind == "proximal":
        rule = aggregators.clipped_mean(tau, center="previous")
    else:
        raise ValueError(f"kind must be 'coordinate', 'geometric' or 'proximal'; got {kind!r}.")
    return robust_mean(rule, axis_name)


class RunningMedianState(NamedTuple):
    """State of :func:`running_median`.

    Attributes:
      median: the current estimate :math:`m_t` of the median gradient, shaped like the parameters
        (zeros at init; unused when ``center="zero"``).
    """

    median: Any


def _wide(x: jax.Array) -> jax.Array:
    """At least float32 for the arithmetic (bf16/fp16 gradients; float64 stays float64)."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _global_norm(tree: Any) -> jax.Array:
    leaves = jax.tree_util.tree_leaves(tree)
    if not leaves:
        return jnp.zeros((), jnp.float32)
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in leaves))


def running_median(
    tau: float, norm: str = "l2", center: str = "previous"
) -> optax.GradientTransformationExtraArgs:
    r"""Running median of the gradients across iterations: one proximal step per gradient.

    .. math::
       m_{t+1} = c_t + \operatorname{clip}_\tau(g_t - c_t), \qquad
       c_t = \begin{cases} m_t & \text{``center="previous"'' (the paper's online median)} \\
       0 & \text{``center="zero"'' (clipped SGD)} \end{cases}

    with :math:`\operatorname{clip}_\tau(y) = y\min(1, \tau/\|y\|_2)` over the whole gradient tree
    (``norm="l2"``: the geometric median of the gradient sequence) or
    :math:`\operatorname{clip}_\tau(y)_k = \max(-\tau, \min(\tau, y_k))` per coordinate
    (``norm="coordinate"``: the coordinate-wise median), and :math:`m_0 = 0`. The output is
    :math:`m_{t+1}`; chain an optimizer after it (``optax.chain(running_median(tau), optax.sgd(lr))``).
    With ``center="zero"`` it equals ``optax.clip_by_global_norm(tau)`` (``"l2"``) and
    ``optax.clip(tau)`` (``"coordinate"``): the paper's "clipping is secretly estimating the median".

    A local (per-worker) transform: no collective. Put it after :func:`optdist.mean_gradients` to
    track the median of the averaged gradients, or before a robust mean to send each worker's own
    running median.

    Deviation: the paper also studies a decreasing estimator step; here ``tau`` is constant (the
    clipping radius), as in clipped SGD.

    State: the estimate, shaped like the parameters (kept in the parameters' dtype), per worker.

    Non-finite policy: a NaN/Inf gradient makes the estimate non-finite (wrap in
    :func:`optdist.skip_nonfinite`).

    Args:
      tau: the estimator's proximal step = clipping radius ``> 0``.
      norm: ``"l2"`` (global norm over the tree) or ``"coordinate"``.
      center: ``"previous"`` (running median) or ``"zero"`` (clipping).

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example::

      tx = optax.chain(optdist.mean_gradients("data"), optdist.robust.running_median(1.0),
                       optax.sgd(0.1))

    References:
      Schaipp, Garrigos, Simsekli, Gower, "SGD with Clipping is Secretly Estimating the Median
      Gradient", 2024 (arXiv:2402.12828).
    """
    tau = _checks.in_range(tau, "tau", 0.0, float("inf"), low_open=True)
    if norm not in _NORMS:
        raise ValueError(f"norm must be 'l2' or 'coordinate'; got {norm!r}.")
    if center not in _CENTERS:
        raise ValueError(f"center must be 'previous' or 'zero'; got {center!r}.")

    def init_fn(params):
        _checks.check_floating(params, "running_median", "parameters")
        return RunningMedianState(jax.tree_util.tree_map(jnp.zeros_like, params))

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        _checks.check_floating(updates, "running_median")
        _checks.check_same_structure(updates, state.median, "the running median's state")
        if center == "previous":
            c = state.median
        else:
            c = jax.tree_util.tree_map(jnp.zeros_like, state.median)
        diff = jax.tree_util.tree_map(lambda g, m: _wide(g) - _wide(m), updates, c)
        if norm == "l2":
            size = _global_norm(diff)
            scale = jnp.minimum(1.0, tau / jnp.maximum(size, jnp.finfo(size.dtype).tiny))
            step = jax.tree_util.tree_map(lambda d: d * scale.astype(d.dtype), diff)
        else:
            step = jax.tree_util.tree_map(lambda d: jnp.clip(d, -tau, tau), diff)
        new = jax.tree_util.tree_map(lambda m, s: (_wide(m) + s).astype(m.dtype), c, step)
        out = jax.tree_util.tree_map(lambda m, g: m.astype(g.dtype), new, updates)
        return out, RunningMedianState(new)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


__all__ = ["RunningMedianState", "median_gradients", "running_median"]
