"""DIFF2: a private mean-gradient estimator built from clipped, noised gradient differences."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optdist import _checks
from optdist.comm.aggregation import Aggregator, as_transform
from optdist.comm.axes import AxisName
from optdist.comm.channel import Channel


class DiffState(NamedTuple):
    """State of :func:`dp_diff`.

    Attributes:
      estimate: the running private estimate :math:`v` of the mean gradient (float32; identical on
        every worker).
      previous: this worker's previous gradient (float32; per worker).
      count: steps taken (int32; identical on every worker).
    """

    estimate: Any
    previous: Any
    count: jax.Array


def _clip(tree: Any, max_norm: float) -> Any:
    leaves = jax.tree_util.tree_leaves(tree)
    norm = jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in leaves)) if leaves else jnp.float32(0)
    scale = jnp.minimum(1.0, max_norm / jnp.maximum(norm, 1e-30))
    return jax.tree_util.tree_map(lambda x: x * scale, tree)


def _noise(key: jax.Array, like: Any, std: jax.Array) -> Any:
    leaves, treedef = jax.tree_util.tree_flatten(like)
    keys = [jax.random.fold_in(key, i) for i in range(len(leaves))]
    noised = [std * jax.random.normal(k, x.shape, jnp.float32) for k, x in zip(keys, leaves)]
    return jax.tree_util.tree_unflatten(treedef, noised)


def dp_diff(
    clip_norm: float,
    noise_multiplier: float,
    refresh_every: int,
    diff_clip_norm: float | None = None,
    seed: int = 0,
) -> Aggregator:
    r"""DIFF2's private estimator of the mean gradient as an :class:`~optdist.comm.aggregation.Aggregator`.

    At step :math:`t = 0, 1, \dots` worker :math:`i` with gradient :math:`g_{i,t}` sends

    .. math::
       m_{i,t} = \begin{cases}
         \mathrm{clip}_{C_1}(g_{i,t}) + \mathcal N(0, \sigma^2 C_1^2 I) & t \bmod T = 0 \text{ (refresh)} \\
         \mathrm{clip}_{C_2}(g_{i,t} - g_{i,t-1}) + \mathcal N(0, \sigma^2 C_2^2 I) & \text{otherwise,}
       \end{cases}

    with :math:`\mathrm{clip}_C(x) = x \min(1, C/\|x\|_2)` over this worker's whole tree, the noise
    drawn per worker and step; one all-reduce averages the messages and every worker updates

    .. math::
       v_t = \frac1n \sum_i m_{i,t} \ \text{(refresh)}, \qquad
       v_t = v_{t-1} + \frac1n \sum_i m_{i,t} \ \text{(otherwise)}.

    The estimate :math:`v_t` replaces the mean gradient (chain a step, e.g. ``optax.sgd``: DIFF2 with
    the gradient-descent subroutine). Near convergence differences are small, so a small
    :math:`C_2` clips little and the noise it needs is small: the estimator's variance is what the
    paper improves. With :math:`\sigma = 0`, ``refresh_every=1`` and an inactive clip it is the exact
    mean (gradient descent).

    Privacy (see :mod:`optdist.privacy.accountant` for the assumptions): every step releases one
    Gaussian mechanism per worker of sensitivity :math:`2C` (replace-one-worker's data) and noise
    :math:`\sigma C`, so :math:`T` steps are :math:`2T/\sigma^2`-zCDP for each worker's local data,
    against the server and the other workers too (the noise is added before sending);
    ``optdist.privacy.noise_multiplier_for(eps, delta, T)`` gives :math:`\sigma`.

    Bytes: one all-reduce of a gradient-sized float32 tree per step (as the exact mean).

    Deviations from the paper: the difference is taken between this worker's consecutive *received*
    gradients. For full local gradients (the paper's setting) this is
    :math:`\nabla f_i(x_t) - \nabla f_i(x_{t-1})`; with minibatches it also carries the change of
    batch (the paper evaluates both points on the same data). The clip is applied to the message
    rather than assumed from Lipschitz / smoothness constants, so the sensitivity is explicit.
    Partial participation (``weights``) is refused: the running sum needs every worker's
    differences.

    Args:
      clip_norm: :math:`C_1 > 0`, the clip of the refresh gradients.
      noise_multiplier: :math:`\sigma \ge 0` (noise std in units of the clip norm).
      refresh_every: :math:`T \ge 1`, steps between full refreshes.
      diff_clip_norm: :math:`C_2 > 0` for the differences (default :math:`C_1`).
      seed: seeds the noise (folded with the step and the worker index).

    Returns:
      An :class:`~optdist.comm.aggregation.Aggregator` whose state is a :class:`DiffState`.

    References:
      Murata, Suzuki, "DIFF2: Differential Private Optimization via Gradient Differences for
      Nonconvex Distributed Learning", ICML 2023.
    """
    clip_norm = _checks.in_range(clip_norm, "clip_norm", 0.0, float("inf"), low_open=True)
    noise_multiplier = _checks.in_range(noise_multiplier, "noise_multiplier", 0.0, float("inf"))
    refresh_every = _checks.positive_int(refresh_every, "refresh_every")
    if diff_clip_norm is None:
        diff_clip_norm = clip_norm
    diff_clip_norm = _checks.in_range(diff_clip_norm, "diff_clip_norm", 0.0, float("inf"), low_open=True)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int; got {seed!r}.")

    def init(params):
        _checks.check_floating(params, "dp_diff", "parameters")
        zeros = lambda p: jnp.zeros_like(p, jnp.float32)  # noqa: E731
        return DiffState(
            jax.tree_util.tree_map(zeros, params),
            jax.tree_util.tree_map(zeros, params),
            jnp.zeros((), jnp.int32),
        )

    def aggregate(tree, state, channel: Channel, *, weights=None):
        if weights is not None:
            raise ValueError(
                "dp_diff does not support weights (partial participation): its running estimate "
                "adds every worker's gradient differences. Pass weights=None."
            )
        _checks.check_floating(tree, "dp_diff")
        g = jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), tree)
        refresh = state.count % refresh_every == 0
        diff = jax.tree_util.tree_map(jnp.subtract, g, state.previous)
        full_msg, diff_msg = _clip(g, clip_norm), _clip(diff, diff_clip_norm)
        message = jax.tree_util.tree_map(lambda a, b: jnp.where(refresh, a, b), full_msg, diff_msg)
        if noise_multiplier > 0:
            key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), state.count), channel.index)
            std = noise_multiplier * jnp.where(refresh, clip_norm, diff_clip_norm).astype(jnp.float32)
            message = jax.tree_util.tree_map(jnp.add, message, _noise(key, message, std))
        mean = channel.pmean(message)
        estimate = jax.tree_util.tree_map(lambda v, m: jnp.where(refresh, m, v + m), state.estimate, mean)
        out = jax.tree_util.tree_map(lambda v, x: v.astype(x.dtype), estimate, tree)
        return out, DiffState(estimate, g, state.count + 1)

    return Aggregator(
        init, aggregate, f"dp_diff(C={clip_norm:g}, sigma={noise_multiplier:g}, T={refresh_every})"
    )


def dp_diff_mean(
    clip_norm: float,
    noise_multiplier: float,
    refresh_every: int,
    axis_name: AxisName,
    diff_clip_norm: float | None = None,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    r"""DIFF2's private mean-gradient estimate as a gradient transformation (:func:`dp_diff` through
    :func:`~optdist.comm.aggregation.as_transform`): each worker's gradient is replaced by
    :math:`v_t` (identical on every worker).

    Args:
      clip_norm: :math:`C_1 > 0` for the refresh gradients.
      noise_multiplier: :math:`\sigma \ge 0` (e.g. from :func:`optdist.privacy.noise_multiplier_for`).
      refresh_every: :math:`T \ge 1` steps between full refreshes.
      axis_name: the worker axis (str or tuple), or None for one worker.
      diff_clip_norm: :math:`C_2` for the differences (default :math:`C_1`).
      seed: seeds the noise.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is an
      :class:`~optdist.comm.aggregation.AggregationState` holding a :class:`DiffState`.

    Example::

      sigma = optdist.privacy.noise_multiplier_for(epsilon=8.0, delta=1e-5, steps=1000)
      tx = optax.chain(optdist.privacy.dp_diff_mean(1.0, sigma, 10, "data", diff_clip_norm=0.1),
                       optax.sgd(0.1))

    References:
      Murata, Suzuki, "DIFF2: Differential Private Optimization via Gradient Differences for
      Nonconvex Distributed Learning", ICML 2023.
    """
    agg = dp_diff(clip_norm, noise_multiplier, refresh_every, diff_clip_norm, seed)
    return as_transform(agg, axis_name, check=lambda g: _checks.check_floating(g, "dp_diff_mean"))
