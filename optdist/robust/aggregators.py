r"""Byzantine-robust aggregation rules on a gathered ``[n, d]`` matrix.

Each rule is an :class:`Rule`: ``init(d) -> state`` and
``aggregate(x, state) -> (vector [d], state)`` where ``x`` holds one row per
worker (the whole flattened update of that worker). They are plain jittable,
vmappable functions: :func:`optdist.robust_mean` runs them after an
all-gather (every worker computes the same result), and other code (e.g. an
outer loop aggregating pseudo-gradients) can call them directly.

Pre-aggregations (:func:`nnm`) map ``[n, d] -> [n, d]`` and compose with any
rule via :func:`with_pre_aggregation`.

Limits on ``f`` (Byzantine workers tolerated) depend on ``n``, known only at
trace time; they are checked on the first call with a message naming the limit.

Non-finite policy (per rule, see each docstring): ``mean`` propagates NaN/Inf;
every other rule returns a finite vector as long as at most ``f`` rows (the
rule's tolerance; for ``median``/``geometric_median`` fewer than half) contain
NaN/Inf. Distance-based rules treat a row with any NaN/Inf as infinitely far
away; coordinate-wise rules order NaN as ``+inf``.

Worker momentum ("Learning from History"): chain a per-worker momentum before
the robust mean, e.g. ``optax.chain(optax.ema(0.9, debias=False),
optdist.robust_mean(centered_clip(1.0), "data"), optax.sgd(lr))``. The EMA
state is per worker (each worker averages its own gradients) and the robust
aggregate of the momenta is identical on every worker.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from optdist import _checks
from optdist.robust import _geometry as geo

PreAggregation = Callable[[jax.Array], jax.Array]


class Rule(NamedTuple):
    """An aggregation rule: ``init(d) -> state``, ``aggregate(x [n, d], state) -> (v [d], state)``.

    The state (e.g. :func:`centered_clip`'s previous estimate) is a function
    of the gathered inputs only, hence identical on every worker.
    """

    init: Callable[[int], Any]
    aggregate: Callable[[jax.Array, Any], tuple[jax.Array, Any]]


def _stateless(fn: Callable[[jax.Array], jax.Array], name: str) -> Rule:
    def aggregate(x, state):
        geo.check_matrix(name, x)
        dtype = x.dtype
        return fn(x.astype(geo.compute_dtype(x))).astype(dtype), state

    return Rule(lambda d: optax.EmptyState(), aggregate)


def _nonneg_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0; got {value!r}.")
    return value


def with_pre_aggregation(aggregator: Rule, pre_aggregation: PreAggregation | None) -> Rule:
    """``aggregator`` applied to ``pre_aggregation(x)`` (e.g. NNM then Krum)."""
    if pre_aggregation is None:
        return aggregator

    def aggregate(x, state):
        return aggregator.aggregate(pre_aggregation(x), state)

    return Rule(aggregator.init, aggregate)


# --------------------------------------------------------------------------- #
# Coordinate-wise rules


def mean() -> Rule:
    r"""The plain mean :math:`\frac1n\sum_i x_i` (not robust: one bad row moves it arbitrarily).

    Non-finite policy: NaN/Inf in any row reaches the output.

    Returns:
      A :class:`Rule` (stateless).
    """
    return _stateless(geo.row_mean, "mean")


def median() -> Rule:
    r"""Coordinate-wise median: :math:`v_k = \operatorname{median}_i x_{ik}` (average of the two
    middle values for even ``n``). Breakdown point 1/2 per coordinate.

    Non-finite policy: NaN is ordered as ``+inf``; ``+-inf`` entries are
    ordinary extreme values, so the output is finite whenever fewer than half
    the entries of each coordinate are non-finite.

    Sorting: a compare-exchange network for ``n <= 64`` (fast elementwise
    min/max), XLA's sort above.

    Returns:
      A :class:`Rule` (stateless).

    References:
      Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning:
      Towards Optimal Statistical Rates", 2018.
    """

    def fn(x):
        s = _sorted_nan_high(x)
        n = x.shape[0]
        return 0.5 * (s[(n - 1) // 2] + s[n // 2])

    return _stateless(fn, "median")


def _sorted_nan_high(x: jax.Array) -> jax.Array:
    return geo.sort_rows(jnp.where(jnp.isnan(x), jnp.inf, x))


def trimmed_mean(f: int) -> Rule:
    r"""Coordinate-wise trimmed mean: per coordinate, drop the ``f`` largest and ``f`` smallest
    values and average the remaining ``n - 2f``.

    Limit: ``n > 2f`` (checked at trace time). ``f = 0`` is the mean.

    Non-finite policy: NaN is ordered as ``+inf``; up to ``f`` non-finite
    entries per coordinate are trimmed away, so the output stays finite.

    Args:
      f: values trimmed at each end (number of Byzantine workers tolerated).

    Returns:
      A :class:`Rule` (stateless).

    References:
      Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning:
      Towards Optimal Statistical Rates", 2018.
    """
    f = _nonneg_int(f, "f")

    def fn(x):
        n = x.shape[0]
        geo.check_f("trimmed_mean", f, n, min_n=2 * f + 1, limit="n > 2f")
        return geo.row_mean(_sorted_nan_high(x)[f : n - f])

    return _stateless(fn, "trimmed_mean")


# --------------------------------------------------------------------------- #
# Distance-based rules


def _krum_scores(x0: jax.Array, ok: jax.Array, f: int) -> jax.Array:
    """Krum score: sum of squared distances to the ``n - f - 2`` nearest other rows."""
    n = x0.shape[0]
    d = geo.pairwise_sq_dists(x0, ok, self_distance=jnp.inf)
    k = n - f - 2
    nearest = -lax.top_k(-d, k)[0]  # k smallest per row, ascending
    return jnp.sum(nearest, axis=1)


def multi_krum(f: int, m: int) -> Rule:
    r"""Multi-Krum: the mean of the ``m`` rows with the lowest Krum score.

    .. math:: s_i = \sum_{j \in N_i} \|x_i - x_j\|^2, \quad
       N_i = \text{the } n - f - 2 \text{ rows } j \ne i \text{ closest to } x_i;
       \qquad v = \frac1m \sum_{i \in S} x_i, \; S = \text{the } m \text{ smallest } s_i.

    Limits: ``n > 2f + 2`` (Krum's own) and ``m <= n - f``. Ties are broken
    by lower worker index. Pairwise distances come from one Gram matmul.

    Non-finite policy: a row with NaN/Inf is at distance ``+inf`` from all
    others, so its score is ``+inf`` and it is never selected; honest scores
    stay finite while at most ``f`` rows are non-finite.

    Args:
      f: number of Byzantine workers tolerated.
      m: number of selected rows averaged (``m = 1`` is Krum).

    Returns:
      A :class:`Rule` (stateless).

    References:
      Blanchard, El Mhamdi, Guerraoui, Stainer, "Machine Learning with
      Adversaries: Byzantine Tolerant Gradient Descent", 2017.
    """
    f = _nonneg_int(f, "f")
    m = _checks.positive_int(m, "m")
    name = "krum" if m == 1 else "multi_krum"

    def fn(x):
        n = x.shape[0]
        geo.check_f(name, f, n, min_n=2 * f + 3, limit="n > 2f + 2")
        if m > n - f:
            raise ValueError(f"multi_krum needs m <= n - f; got m={m}, n={n}, f={f} (n - f = {n - f}).")
        ok, x0 = geo.finite_rows(x)
        scores = _krum_scores(x0, ok, f)
        chosen = lax.top_k(-scores, m)[1]
        return geo.row_mean(x0, jnp.sum(jax.nn.one_hot(chosen, n, dtype=x.dtype), axis=0) / m)

    return _stateless(fn, name)


def krum(f: int) -> Rule:
    """Krum: the single row with the lowest Krum score (:func:`multi_krum` with ``m=1``)."""
    return multi_krum(f, 1)


def geometric_median(eps: float = 1e-8, max_iters: int = 100, tol: float = 1e-6) -> Rule:
    r"""Geometric median :math:`\arg\min_v \sum_i \|v - x_i\|` by smoothed Weiszfeld iterations.

    .. math:: v \leftarrow \frac{\sum_i \beta_i x_i}{\sum_i \beta_i}, \quad
       \beta_i = \frac{1}{\max(\varepsilon, \|v - x_i\|)},

    starting from the mean of the finite rows, until the smoothed objective
    :math:`\sum_i \max(\varepsilon, \|v - x_i\|)` decreases by less than
    ``tol`` times its value, or ``max_iters`` iterations. Breakdown point 1/2.

    Non-finite policy: rows with NaN/Inf get weight 0 (infinitely far).

    Args:
      eps: smoothing ``> 0`` (avoids division by zero at a data point).
      max_iters: iteration cap ``>= 1``.
      tol: relative objective-decrease tolerance ``>= 0``.

    Returns:
      A :class:`Rule` (stateless).

    References:
      Pillutla, Kakade, Harchaoui, "Robust Aggregation for Federated Learning", 2022.
    """
    eps = _checks.in_range(eps, "eps", 0.0, float("inf"), low_open=True)
    max_iters = _checks.positive_int(max_iters, "max_iters")
    tol = _checks.in_range(tol, "tol", 0.0, float("inf"))

    def fn(x):
        ok, x0 = geo.finite_rows(x)
        okf = ok.astype(x.dtype)

        def dists(v):
            return jnp.maximum(eps, jnp.linalg.norm(x0 - v, axis=1))

        def objective(dist):
            return jnp.sum(okf * dist)

        v0 = geo.row_mean(x0, okf / jnp.maximum(jnp.sum(okf), 1.0))
        dist0 = dists(v0)

        def cond(carry):
            k, _, _, prev_obj, obj = carry
            return (k < max_iters) & (prev_obj - obj > tol * obj)

        def body(carry):
            k, v, dist, _, obj = carry
            beta = okf / dist
            v = geo.row_mean(x0, beta / jnp.sum(beta))
            dist = dists(v)
            return k + 1, v, dist, obj, objective(dist)

        init = (jnp.asarray(0), v0, dist0, jnp.asarray(jnp.inf, x.dtype), objective(dist0))
        return lax.while_loop(cond, body, init)[1]

    return _stateless(fn, "geometric_median")


# --------------------------------------------------------------------------- #
# Clipping rules (stateful)


class ClipState(NamedTuple):
    """The previous aggregate (identical on every worker)."""

    center: jax.Array


def _clip_step(x0: jax.Array, ok: jax.Array, v: jax.Array, tau: float) -> jax.Array:
    """``v + mean_i (x_i - v) min(1, tau / |x_i - v|)``; non-finite rows add 0."""
    diff = x0 - v
    norm = jnp.linalg.norm(diff, axis=1)
    scale = jnp.where(ok, jnp.minimum(1.0, tau / jnp.maximum(norm, jnp.finfo(x0.dtype).tiny)), 0.0)
    return v + geo.row_mean(diff, scale / x0.shape[0])


def _clipping(tau: float, iters: int, center: str, name: str) -> Rule:
    def init(d):
        return ClipState(jnp.zeros((d,), jnp.float32))

    def aggregate(x, state):
        geo.check_matrix(name, x)
        dtype = x.dtype
        x = x.astype(geo.compute_dtype(x))
        ok, x0 = geo.finite_rows(x)
        v = state.center.astype(x.dtype) if center == "previous" else jnp.zeros(x.shape[1], x.dtype)
        v = lax.fori_loop(0, iters, lambda _, v: _clip_step(x0, ok, v, tau), v)
        return v.astype(dtype), ClipState(v.astype(state.center.dtype))

    return Rule(init, aggregate)


def centered_clip(tau: float, iters: int = 1) -> Rule:
    r"""Centered clipping, started from the previous aggregate.

    .. math:: v_0 = v^{\text{prev}}, \qquad
       v_{l+1} = v_l + \frac1n \sum_i (x_i - v_l)\,\min\!\Big(1, \frac{\tau}{\|x_i - v_l\|}\Big),
       \quad l < L,

    output :math:`v_L`, which becomes the next round's :math:`v^{\text{prev}}`
    (zero at the first round). Meant to be used with worker momentum chained
    before the robust mean (see the module docstring).

    State: the previous aggregate (identical on every worker).

    Non-finite policy: rows with NaN/Inf contribute 0 (treated as infinitely
    far, the clipped step toward them has no defined direction).

    Args:
      tau: clipping radius ``> 0``.
      iters: clipping iterations ``L >= 1``.

    Returns:
      A :class:`Rule` whose state is a :class:`ClipState`.

    References:
      Karimireddy, He, Jaggi, "Learning from History for Byzantine Robust
      Optimization", 2021.
    """
    tau = _checks.in_range(tau, "tau", 0.0, float("inf"), low_open=True)
    iters = _checks.positive_int(iters, "iters")
    return _clipping(tau, iters, "previous", "centered_clip")


def clipped_mean(tau: float, center: str = "zero") -> Rule:
    r"""Mean of clipped inputs: one proximal step toward the geometric median.

    .. math:: v = c + \frac1n \sum_i \operatorname{clip}_\tau(x_i - c), \qquad
       \operatorname{clip}_\tau(y) = y \min(1, \tau / \|y\|).

    Schaipp et al. show that this is one stochastic proximal-point step on
    :math:`\frac1n\sum_i\|v - x_i\|` (median estimation) from the point
    :math:`c`, so clipped SGD is "secretly estimating the median":
    ``center="zero"`` is plain clipped averaging (:math:`c = 0`, stateless in
    effect); ``center="previous"`` starts from the previous round's output,
    the paper's median estimated *across iterations* (it then coincides with
    ``centered_clip(tau, iters=1)``).

    State: the previous output (identical on every worker).

    Non-finite policy: rows with NaN/Inf contribute 0.

    Args:
      tau: clipping radius ``> 0``.
      center: ``"zero"`` or ``"previous"``.

    Returns:
      A :class:`Rule` whose state is a :class:`ClipState`.

    References:
      Schaipp, Garrigos, Simsekli, Gower, "SGD with Clipping is Secretly
      Estimating the Median Gradient", 2024.
    """
    tau = _checks.in_range(tau, "tau", 0.0, float("inf"), low_open=True)
    if center not in ("zero", "previous"):
        raise ValueError(f"center must be 'zero' or 'previous'; got {center!r}.")
    return _clipping(tau, 1, center, "clipped_mean")


# --------------------------------------------------------------------------- #
# Nearest-neighbour mixing and MoNNA


def nnm(f: int) -> PreAggregation:
    r"""Nearest-neighbour mixing: replace each row by the mean of its ``n - f`` nearest rows.

    .. math:: x_i \leftarrow \frac{1}{n-f} \sum_{j \in N_i} x_j, \quad
       N_i = \text{the } n - f \text{ rows closest to } x_i \text{ (including } x_i).

    A pre-aggregation composable with any rule (``robust_mean(krum(f), axis,
    pre_aggregation=nnm(f))``). Limit ``n > 2f``. ``f = 0`` replaces every
    row by the mean.

    Non-finite policy: rows with NaN/Inf are read as zeros at distance
    ``+inf``, so no finite row mixes them in; their own mixed value is finite.

    Args:
      f: number of Byzantine workers tolerated.

    Returns:
      A function ``[n, d] -> [n, d]``.

    References:
      Allouah, Farhadkhani, Guerraoui, Gupta, Pinot, Stephan, "Fixing by
      Mixing: A Recipe for Optimal Byzantine ML under Heterogeneity", 2023.
    """
    f = _nonneg_int(f, "f")

    def mix(x):
        geo.check_matrix("nnm", x)
        n = x.shape[0]
        geo.check_f("nnm", f, n, min_n=2 * f + 1, limit="n > 2f")
        dtype = x.dtype
        x = x.astype(geo.compute_dtype(x))
        ok, x0 = geo.finite_rows(x)
        d = geo.pairwise_sq_dists(x0, ok, self_distance=0.0)
        idx = lax.top_k(-d, n - f)[1]  # [n, n - f]
        weights = jnp.sum(jax.nn.one_hot(idx, n, dtype=x.dtype), axis=1) / (n - f)
        return jnp.matmul(weights, x0, precision=lax.Precision.HIGHEST).astype(dtype)

    return mix


def monna(f: int) -> Rule:
    r"""MoNNA's aggregation as a server rule: NNM(f) followed by the trimmed mean(f).

    Our reading of "Robust Collaborative Learning with Linear Gradient
    Overhead" (Algorithm MoNNA): every honest worker keeps Polyak momentum of
    its own gradients, takes a local step, and replaces its model by the
    average of the ``n - f`` received models nearest to its own (nearest-
    neighbour averaging, NNA). With a shared model, NNA of models is NNA of
    momenta; to return one vector identical on every worker (the contract of
    :func:`optdist.robust_mean`) we apply NNA around every row (= :func:`nnm`)
    and then reduce the mixed rows with the coordinate-wise trimmed mean, the
    composition analysed in the follow-up "Fixing by Mixing". Chain worker
    momentum before it (``optax.ema(beta, debias=False)``) to get MoNNA's
    momentum. Limit ``n > 2f``.

    Non-finite policy: as :func:`nnm` then :func:`trimmed_mean` (finite).

    Args:
      f: number of Byzantine workers tolerated.

    Returns:
      A :class:`Rule` (stateless).

    References:
      Farhadkhani, Guerraoui, Gupta, Hoang, Pinot, Stephan, "Robust
      Collaborative Learning with Linear Gradient Overhead", 2023.
    """
    return with_pre_aggregation(trimmed_mean(f), nnm(f))


# --------------------------------------------------------------------------- #
# Flag aggregator


def _flag_direction_weights(g: jax.Array, ok: jax.Array, rank: int, iters: int, lam: float, eps: float):
    """IRLS in the ``n``-dimensional coefficient space of the unit rows.

    With ``U`` the ``[n, d]`` unit rows and ``G = U U^T``, the subspace is
    ``Y = U^T C`` (``C`` is ``[n, r]``): the top-``r`` eigenvectors of
    ``U^T B U`` where ``B = R R^T`` holds the IRLS weights. Returns the
    coefficients ``a`` with ``(1/n) sum_i Y Y^T u_i = U^T a``.
    """
    n = g.shape[0]
    sq = jnp.diagonal(g)
    pair_sq = jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * g, 0.0)
    offdiag = ~jnp.eye(n, dtype=bool)
    pair_ok = offdiag & (pair_sq > 0) & ok[:, None] & ok[None, :]
    tiny = jnp.finfo(g.dtype).tiny

    def subspace(w, w_pair):
        if lam > 0:
            # sum_{i != j} c_ij (e_i - e_j)(e_i - e_j)^T = 2 (diag(c 1) - c), c symmetric.
            c = jnp.where(pair_ok, w_pair / jnp.maximum(pair_sq, tiny), 0.0) * (lam / (n * (n - 1)))
            b = jnp.diag(w) + 2.0 * (jnp.diag(jnp.sum(c, axis=1)) - c)
            evals, evecs = jnp.linalg.eigh(b)
            r_mat = evecs * jnp.sqrt(jnp.maximum(evals, 0.0))
        else:
            r_mat = jnp.diag(jnp.sqrt(w))
        k = r_mat.T @ g @ r_mat
        s, v = jnp.linalg.eigh(k)  # ascending
        s, v = s[::-1][:rank], v[:, ::-1][:, :rank]
        return (r_mat @ v) / jnp.sqrt(jnp.maximum(s, tiny))  # C: Y = U^T C, Y^T Y = I

    def reweight(c):
        p = c.T @ g  # [r, n]: Y^T u_i
        sin_sq = jnp.maximum(1.0 - jnp.sum(p * p, axis=0), 0.0)
        w = jnp.where(ok, 1.0 / jnp.sqrt(sin_sq + eps), 0.0)
        pd = p[:, :, None] - p[:, None, :]
        pair_sin_sq = jnp.maximum(1.0 - jnp.sum(pd * pd, axis=0) / jnp.maximum(pair_sq, tiny), 0.0)
        return w, 1.0 / jnp.sqrt(pair_sin_sq + eps)

    ones = ok.astype(g.dtype)
    c = subspace(ones, jnp.ones_like(g))  # flag mean (unit weights) as the starting point
    c = lax.fori_loop(0, iters, lambda _, c: subspace(*reweight(c)), c)
    return c @ (c.T @ jnp.sum(g, axis=1)) / n


def flag(rank: int = 1, iters: int = 4, lam: float = 0.0, eps: float = 1e-7) -> Rule:
    r"""Flag Rule: a robust subspace of the unit-normalized inputs by IRLS.

    Our reading of the paper (and its public code): normalize
    :math:`u_i = x_i / \|x_i\|`; find an orthonormal :math:`Y \in
    \mathbb{R}^{d \times r}` minimizing the flag-median objective
    :math:`\sum_i \sin\theta_i + \frac{\lambda}{n(n-1)}\sum_{i\ne j}\sin\theta_{ij}`,
    :math:`\sin^2\theta_i = 1 - \|Y^\top u_i\|^2` (and for the unit direction of
    :math:`u_i - u_j` in the regularizer), by iteratively reweighted least
    squares: :math:`Y \leftarrow` top-``r`` eigenvectors of
    :math:`\sum_i w_i u_i u_i^\top + \frac{\lambda}{n(n-1)} \sum_{i\ne j} w_{ij}
    \hat u_{ij}\hat u_{ij}^\top` with :math:`w = (\sin^2\theta + \epsilon)^{-1/2}`.
    We start from the flag mean (all weights 1) instead of a random ``Y`` and
    run ``iters`` reweightings. The output is the mean projection
    :math:`\frac1n\sum_i Y Y^\top u_i`, rescaled by the median input norm
    :math:`\operatorname{median}_i \|x_i\|` (the paper's code returns the scale-
    free :math:`\frac1r\sum_i YY^\top u_i`; the rescale gives the output the
    magnitude of an honest update so learning rates transfer).

    All work happens on the ``n x n`` Gram matrix of the unit rows (one
    ``d n^2`` matmul, then ``n x n`` eigendecompositions), never ``d x d``.

    Non-finite policy: rows with NaN/Inf become zero vectors (they span no
    direction) and are excluded from the median norm.

    Args:
      rank: subspace dimension ``r >= 1`` (``r <= n``).
      iters: IRLS reweightings ``>= 0``.
      lam: pairwise regularization ``lambda >= 0``.
      eps: weight smoothing ``> 0``.

    Returns:
      A :class:`Rule` (stateless).

    References:
      Almasi, Mishra, Vinzamuri, Shah, Banerjee, "Flag Rule: Scalable
      Distributed Training under Failures and Augmented Losses using Convex
      Optimization", 2023.
    """
    rank = _checks.positive_int(rank, "rank")
    iters = _nonneg_int(iters, "iters")
    lam = _checks.in_range(lam, "lam", 0.0, float("inf"))
    eps = _checks.in_range(eps, "eps", 0.0, float("inf"), low_open=True)

    def fn(x):
        n = x.shape[0]
        if rank > n:
            raise ValueError(f"flag needs rank <= n; got rank={rank} with n={n} workers.")
        ok, x0 = geo.finite_rows(x)
        norms = jnp.linalg.norm(x0, axis=1)
        u = x0 / jnp.where(norms > 0, norms, 1.0)[:, None]
        a = _flag_direction_weights(geo.gram(u), ok, rank, iters, lam, eps)
        scale = jnp.nanmedian(jnp.where(ok, norms, jnp.nan))
        return scale * jnp.matmul(a, u, precision=lax.Precision.HIGHEST)

    return _stateless(fn, "flag")


__all__ = [
    "Rule",
    "ClipState",
    "PreAggregation",
    "centered_clip",
    "clipped_mean",
    "flag",
    "geometric_median",
    "krum",
    "mean",
    "median",
    "monna",
    "multi_krum",
    "nnm",
    "trimmed_mean",
    "with_pre_aggregation",
]
