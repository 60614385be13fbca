r"""SMEA (Allouah et al.): the ``n - f`` rows whose covariance has the smallest top eigenvalue, and
local differential-privacy noise for the workers' updates.

:func:`smea` is a robust :class:`~optdist.robust.aggregators.Rule` (use it with
:func:`optdist.robust_mean` or as an outer loop's aggregator); :func:`local_dp_noise` is the
per-worker clip-and-noise step (local DP) that the paper's algorithm applies before sending.
The paper's algorithm chains both, with worker momentum in between::

  tx = optax.chain(
      optdist.robust.local_dp_noise(clip_norm=1.0, noise_multiplier=1.0, axis_name="data"),
      optax.ema(0.9, debias=False),                       # worker momentum
      optdist.robust_mean(optdist.robust.smea(f=2), "data"),
      optax.sgd(0.1),
  )
"""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from optdist import _checks
from optdist.comm.axes import AxisName, validate_axis_name, worker_index
from optdist.robust import _geometry as geo
from optdist.robust.aggregators import Rule

# Subsets searched exhaustively: C(n, f) of them, each an (n - f) x (n - f) symmetric
# eigendecomposition. C(16, 4) = 1820, C(20, 5) = 15504; the default cap leaves room for those.
MAX_SUBSETS = 20_000


def _subsets(n: int, f: int, max_subsets: int) -> np.ndarray:
    count = math.comb(n, f)
    if count > max_subsets:
        raise ValueError(
            f"smea(f={f}) with n={n} workers searches C({n}, {f}) = {count} subsets of size n - f, more "
            f"than max_subsets={max_subsets}. Lower f, use fewer workers (e.g. bucket them first), or "
            "raise max_subsets if the compile time and memory are acceptable."
        )
    return np.array(list(itertools.combinations(range(n), n - f)), dtype=np.int32).reshape(count, n - f)


def smea(f: int, max_subsets: int = MAX_SUBSETS) -> Rule:
    r"""Smallest Maximum Eigenvalue Averaging: the mean of the ``n - f`` rows of least spread.

    .. math:: S^\star = \arg\min_{|S| = n - f} \lambda_{\max}\Big(\frac{1}{|S|}\sum_{i\in S}
       (x_i - \bar x_S)(x_i - \bar x_S)^\top\Big), \qquad v = \bar x_{S^\star}
       = \frac{1}{n - f}\sum_{i \in S^\star} x_i.

    Every subset's top eigenvalue is that of its centred ``(n - f) x (n - f)`` Gram matrix
    :math:`\frac1{|S|} C G_{SS} C` (:math:`C` the centring matrix), all read from one ``n x n``
    Gram matrix of the rows, so the ``d x d`` covariance is never formed. Ties go to the first
    subset in lexicographic order.

    Complexity: one ``O(n^2 d)`` Gram matmul, then an exhaustive search over
    :math:`\binom{n}{f}` subsets at ``O((n - f)^3)`` each (batched ``eigh``): exponential in ``f``,
    meant for small ``n``. Above ``max_subsets`` subsets it raises (at trace time, naming the count).

    The paper's guarantee: the squared error to the honest mean is of order
    :math:`\frac{f}{n}\lambda_{\max}` of the honest inputs' covariance (the top eigenvalue, not
    the trace: with isotropic local DP noise :math:`\sigma^2 I` the noise enters through
    :math:`\lambda_{\max}` rather than :math:`\sigma^2 d` as for coordinate-wise rules and Krum),
    for ``n > 2f``; that limit is checked at trace time. ``f = 0`` is the mean.

    Non-finite policy: a subset containing a row with NaN/Inf has eigenvalue ``+inf`` and is
    never chosen while at most ``f`` rows are non-finite (the output is then finite).

    Args:
      f: number of Byzantine workers tolerated (``n > 2f``).
      max_subsets: cap on :math:`\binom{n}{f}`, the subsets searched.

    Returns:
      A :class:`~optdist.robust.aggregators.Rule` (stateless).

    Example::

      tx = optax.chain(optdist.robust_mean(optdist.robust.smea(2), "data"), optax.sgd(0.1))

    References:
      Allouah, Guerraoui, Gupta, Pinot, Stephan, "On the Privacy-Robustness-Utility Trilemma in
      Distributed Learning", ICML 2023.
    """
    if isinstance(f, bool) or not isinstance(f, int) or f < 0:
        raise ValueError(f"f must be an integer >= 0; got {f!r}.")
    max_subsets = _checks.positive_int(max_subsets, "max_subsets")

    def aggregate(x, state):
        geo.check_matrix("smea", x)
        n = x.shape[0]
        geo.check_f("smea", f, n, min_n=2 * f + 1, limit="n > 2f")
        dtype = x.dtype
        x = x.astype(geo.compute_dtype(x))
        ok, x0 = geo.finite_rows(x)
        subsets = jnp.asarray(_subsets(n, f, max_subsets))  # [C, m]
        m = n - f
        g = geo.gram(x0)
        sub = g[subsets[:, :, None], subsets[:, None, :]]  # [C, m, m]
        row = jnp.mean(sub, axis=2, keepdims=True)
        centred = sub - row - jnp.swapaxes(row, 1, 2) + jnp.mean(row, axis=1, keepdims=True)
        top = jnp.linalg.eigvalsh(centred / m)[:, -1]
        top = jnp.where(jnp.all(ok[subsets], axis=1), top, jnp.inf)
        best = jnp.argmin(top)
        weights = jnp.zeros((n,), x.dtype).at[subsets[best]].set(1.0 / m)
        return geo.row_mean(x0, weights).astype(dtype), state

    return Rule(lambda d: optax.EmptyState(), aggregate)


class LocalDPState(NamedTuple):
    """State of :func:`local_dp_noise`: the step count (for fresh noise keys), identical on all workers."""

    count: jax.Array


def local_dp_noise(
    clip_norm: float, noise_multiplier: float, axis_name: AxisName = "data", seed: int = 0
) -> optax.GradientTransformationExtraArgs:
    r"""Local differential privacy: each worker clips its update and adds Gaussian noise before sending.

    .. math:: \tilde g_i = g_i \min\!\Big(1, \frac{C}{\|g_i\|}\Big) + \xi_i, \qquad
       \xi_i \sim \mathcal N(0, (\sigma C)^2 I),

    the Gaussian mechanism on an update of ``L2`` sensitivity :math:`C` (one clipped gradient per
    step), with :math:`\sigma` = ``noise_multiplier``. The norm is over the whole update tree.
    Privacy accounting (composition over steps, subsampling) is not done here: the per-step
    mechanism is :math:`(\varepsilon, \delta)`-DP for :math:`\sigma \ge
    \sqrt{2\ln(1.25/\delta)}/\varepsilon` (:math:`\varepsilon < 1`), the classical bound.

    The paper clips per-example gradients inside a worker's mini-batch; with one gradient per worker
    per step, as here, the clipped unit is the worker's mini-batch gradient (a deviation: pass
    per-example-clipped, averaged gradients to get example-level privacy).

    Randomness: the key is ``fold_in(fold_in(key(seed), step), worker_index)``: distinct per worker
    and step, reproducible in every execution mode.

    Bytes: none (local). State: the step count (identical on every worker).

    Non-finite policy: a non-finite update stays non-finite.

    Args:
      clip_norm: :math:`C > 0`.
      noise_multiplier: :math:`\sigma \ge 0` (0: clipping only).
      axis_name: worker axis (for the worker index in the key), or None for one worker.
      seed: seed of the noise.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    References:
      Allouah, Guerraoui, Gupta, Pinot, Stephan, "On the Privacy-Robustness-Utility Trilemma in
      Distributed Learning", ICML 2023; Dwork, Roth, "The Algorithmic Foundations of Differential
      Privacy", 2014 (Gaussian mechanism).
    """
    clip_norm = _checks.in_range(clip_norm, "clip_norm", 0.0, float("inf"), low_open=True)
    noise_multiplier = _checks.in_range(noise_multiplier, "noise_multiplier", 0.0, float("inf"))
    axis_name = validate_axis_name(axis_name)
    seed = int(seed)

    def init_fn(params):
        del params
        return LocalDPState(jnp.zeros((), jnp.int32))

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        _checks.check_same_structure(updates, params, "params")
        _checks.check_floating(updates, "local_dp_noise")
        flat, unravel = ravel_pytree(updates)
        wide = flat.astype(jnp.promote_types(flat.dtype, jnp.float32))
        norm = jnp.linalg.norm(wide)
        clipped = wide * jnp.minimum(1.0, clip_norm / jnp.maximum(norm, jnp.finfo(wide.dtype).tiny))
        key = jax.random.fold_in(
            jax.random.fold_in(jax.random.key(seed), state.count), worker_index(axis_name)
        )
        noise = (noise_multiplier * clip_norm) * jax.random.normal(key, wide.shape, wide.dtype)
        return unravel((clipped + noise).astype(flat.dtype)), LocalDPState(state.count + 1)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


__all__ = ["LocalDPState", "MAX_SUBSETS", "local_dp_noise", "smea"]
