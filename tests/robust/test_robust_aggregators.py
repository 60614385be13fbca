"""Robust aggregators: float64 NumPy references from the papers, fixed points, breakdown,
non-finite rows, permutation invariance and bad-input errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optdist.robust import aggregators as agg

N, D, F = 10, 6, 2


@pytest.fixture(scope="module")
def x():
    rng = np.random.default_rng(0)
    return (rng.normal(size=(N, D)) + rng.normal(size=(1, D))).astype(np.float32)


def run(aggregator, x, state=None):
    """Aggregate once under jit (jitted per aggregator object, cached by jax)."""
    state = aggregator.init(x.shape[1]) if state is None else state
    return jax.jit(aggregator.aggregate)(jnp.asarray(x), state)


# ----------------------------------------------------------------------------- references (float64)


def ref_trimmed_mean(x, f):
    s = np.sort(x, axis=0)
    return s[f : len(x) - f].mean(axis=0)


def ref_krum_scores(x, f):
    n = len(x)
    scores = []
    for i in range(n):
        dists = sorted(np.sum((x[i] - x[j]) ** 2) for j in range(n) if j != i)
        scores.append(sum(dists[: n - f - 2]))
    return np.array(scores)


def ref_multi_krum(x, f, m):
    return x[np.argsort(ref_krum_scores(x, f), kind="stable")[:m]].mean(axis=0)


def ref_geometric_median(x, eps=1e-8, iters=2000):
    v = x.mean(axis=0)
    for _ in range(iters):
        beta = 1.0 / np.maximum(eps, np.linalg.norm(x - v, axis=1))
        v = beta @ x / beta.sum()
    return v


def ref_clip_iterations(x, tau, iters, v):
    for _ in range(iters):
        diff = x - v
        scale = np.minimum(1.0, tau / np.linalg.norm(diff, axis=1))
        v = v + (scale[:, None] * diff).mean(axis=0)
    return v


def ref_nnm(x, f):
    n = len(x)
    out = np.empty_like(x)
    for i in range(n):
        order = np.argsort(np.sum((x - x[i]) ** 2, axis=1), kind="stable")
        out[i] = x[order[: n - f]].mean(axis=0)
    return out


def ref_flag(x, rank, iters, lam, eps):
    """IRLS in d-space: top eigenvectors of a weighted sum of outer products."""
    n, d = x.shape
    norms = np.linalg.norm(x, axis=1)
    u = x / norms[:, None]
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    dirs = {p: (u[p[0]] - u[p[1]]) / np.linalg.norm(u[p[0]] - u[p[1]]) for p in pairs}

    def subspace(w, w_pair):
        m = sum(w[i] * np.outer(u[i], u[i]) for i in range(n))
        if lam > 0:
            m = m + lam / (n * (n - 1)) * sum(w_pair[p] * np.outer(dirs[p], dirs[p]) for p in pairs)
        vals, vecs = np.linalg.eigh(m)
        return vecs[:, ::-1][:, :rank]

    y = subspace(np.ones(n), dict.fromkeys(pairs, 1.0))
    for _ in range(iters):
        w = 1.0 / np.sqrt(1.0 - np.sum((y.T @ u.T) ** 2, axis=0) + eps)
        w_pair = {p: 1.0 / np.sqrt(max(0.0, 1.0 - np.sum((y.T @ dirs[p]) ** 2)) + eps) for p in pairs}
        y = subspace(w, w_pair)
    direction = (y @ (y.T @ u.T)).mean(axis=1)
    return np.median(norms) * direction


# ----------------------------------------------------------------------------- 1. references

STATELESS = {
    "mean": (agg.mean(), lambda x: x.mean(axis=0)),
    "median": (agg.median(), lambda x: np.median(x, axis=0)),
    "trimmed_mean": (agg.trimmed_mean(F), lambda x: ref_trimmed_mean(x, F)),
    "krum": (agg.krum(F), lambda x: ref_multi_krum(x, F, 1)),
    "multi_krum": (agg.multi_krum(F, 4), lambda x: ref_multi_krum(x, F, 4)),
    "monna": (agg.monna(F), lambda x: ref_trimmed_mean(ref_nnm(x, F), F)),
    "flag": (agg.flag(rank=1, iters=4), lambda x: ref_flag(x, 1, 4, 0.0, 1e-7)),
    "flag_rank2_lam": (agg.flag(rank=2, iters=3, lam=2.0), lambda x: ref_flag(x, 2, 3, 2.0, 1e-7)),
    "clipped_mean": (agg.clipped_mean(1.5), lambda x: ref_clip_iterations(x, 1.5, 1, np.zeros(x.shape[1]))),
}


@pytest.mark.parametrize("name", sorted(STATELESS))
def test_matches_float64_reference(x, name):
    aggregator, ref = STATELESS[name]
    out, _ = run(aggregator, x)
    np.testing.assert_allclose(out, ref(x.astype(np.float64)), rtol=2e-4, atol=2e-5)


def test_geometric_median_minimizes_the_sum_of_distances(x):
    # The objective is flat at its minimum: in float32 the argmin is only defined to ~sqrt(eps).
    out, _ = run(agg.geometric_median(max_iters=1000, tol=0.0), x)
    x64 = x.astype(np.float64)
    ref = ref_geometric_median(x64)
    objective = lambda v: np.sum(np.linalg.norm(x64 - v, axis=1))
    assert objective(np.asarray(out, np.float64)) <= objective(ref) * (1 + 1e-6)
    np.testing.assert_allclose(out, ref, atol=1e-3)


def test_nnm_matches_reference(x):
    np.testing.assert_allclose(jax.jit(agg.nnm(F))(x), ref_nnm(x.astype(np.float64), F), rtol=1e-5, atol=1e-6)


def test_centered_clip_carries_its_estimate(x):
    aggregator = agg.centered_clip(tau=0.8, iters=3)
    fn = jax.jit(aggregator.aggregate)
    state = aggregator.init(D)
    x64 = x.astype(np.float64)
    v_ref = np.zeros(D)
    for step in range(3):
        xs = x + np.float32(step)  # moving inputs: the start point matters
        out, state = fn(jnp.asarray(xs), state)
        v_ref = ref_clip_iterations(x64 + step, 0.8, 3, v_ref)
        np.testing.assert_allclose(out, v_ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(state.center, v_ref, rtol=1e-5, atol=1e-5)
    # clipped_mean(center="previous") is one centered-clipping iteration from the previous output.
    a, b = agg.clipped_mean(0.8, center="previous"), agg.centered_clip(0.8, iters=1)
    sa, sb = a.init(D), b.init(D)
    for step in range(2):
        oa, sa = jax.jit(a.aggregate)(x + step, sa)
        ob, sb = jax.jit(b.aggregate)(x + step, sb)
        np.testing.assert_allclose(oa, ob, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- 2. fixed points


def test_median_of_odd_n_is_the_middle_value():
    rng = np.random.default_rng(1)
    v = rng.normal(size=D).astype(np.float32)
    offsets = np.stack([rng.permutation(np.arange(-3, 4)) for _ in range(D)], axis=1)  # [7, D]
    out, _ = run(agg.median(), v + offsets.astype(np.float32))
    np.testing.assert_array_equal(out, v + 0.0)


def test_trimmed_mean_with_f0_is_the_mean(x):
    np.testing.assert_allclose(run(agg.trimmed_mean(0), x)[0], x.mean(axis=0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(jax.jit(agg.nnm(0))(x), np.broadcast_to(x.mean(0), x.shape), atol=1e-6)


def test_krum_selects_an_honest_input():
    rng = np.random.default_rng(2)
    honest = rng.normal(size=(N - F, D)) * 0.1 + 5.0
    outliers = rng.normal(size=(F, D)) * 0.01 + 100.0  # far away, tightly clustered among themselves
    x = np.concatenate([outliers, honest]).astype(np.float32)
    out, _ = run(agg.krum(F), x)
    assert any(np.array_equal(out, h) for h in x[F:])
    out_m, _ = run(agg.multi_krum(F, N - F), x)
    np.testing.assert_allclose(out_m, x[F:].mean(axis=0), rtol=1e-6)


def test_geometric_median_of_collinear_points():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=D), rng.normal(size=D)
    t = np.array([-4.0, -1.0, 0.3, 0.5, 2.0, 7.0, 30.0])
    x = (a + t[:, None] * b).astype(np.float32)
    out, _ = run(agg.geometric_median(max_iters=2000, tol=0.0), x)
    np.testing.assert_allclose(out, a + 0.5 * b, rtol=1e-3, atol=1e-3)


# ----------------------------------------------------------------------------- 3. breakdown

ROBUST = {
    "median": agg.median(),
    "trimmed_mean": agg.trimmed_mean(F),
    "krum": agg.krum(F),
    "multi_krum": agg.multi_krum(F, 3),
    "geometric_median": agg.geometric_median(),
    "centered_clip": agg.centered_clip(tau=1.0, iters=30),
    "clipped_mean": agg.clipped_mean(tau=1.0, center="previous"),
    "monna": agg.monna(F),
    "nnm+krum": agg.with_pre_aggregation(agg.krum(F), agg.nnm(F)),
    "flag": agg.flag(rank=1),
}


@pytest.fixture(scope="module")
def honest():
    rng = np.random.default_rng(4)
    mu = np.full(D, 0.5)
    return (mu + 0.1 * rng.normal(size=(N - F, D))).astype(np.float32)


@pytest.mark.parametrize("name", sorted(ROBUST))
@pytest.mark.parametrize("scale", [1e3, 1e6])
def test_bounded_under_arbitrarily_large_outliers(honest, name, scale):
    rng = np.random.default_rng(5)
    outliers = (scale * rng.normal(size=(F, D))).astype(np.float32)
    x = np.concatenate([honest, outliers])
    aggregator = ROBUST[name]
    state = aggregator.init(D)
    for _ in range(5 if name == "clipped_mean" else 1):  # clipped_mean moves tau per round
        out, state = run(aggregator, x, state)
    spread = np.max(np.linalg.norm(honest - honest.mean(0), axis=1))
    # Bound: twice the honest spread plus F*tau/(N-F) for the clipping rules' bias.
    assert np.linalg.norm(out - honest.mean(0)) <= 2 * spread + 0.3, name
    bad, _ = run(agg.mean(), x)
    assert np.linalg.norm(bad - honest.mean(0)) > 0.01 * scale


# ----------------------------------------------------------------------------- 4. non-finite rows


@pytest.mark.parametrize("name", sorted(ROBUST))
def test_nan_and_inf_rows_give_finite_output(honest, name):
    x = np.concatenate([honest, np.full((1, D), np.nan), np.full((1, D), np.inf)]).astype(np.float32)
    x[-1, 0] = -np.inf
    out, state = run(ROBUST[name], x)
    assert np.all(np.isfinite(out)), name
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(state))
    spread = np.max(np.linalg.norm(honest - honest.mean(0), axis=1))
    if name != "clipped_mean":  # clipped_mean from zero moves at most tau per round
        assert np.linalg.norm(out - honest.mean(0)) <= 2 * spread + 0.3, name
    assert np.all(np.isnan(run(agg.mean(), x)[0]))


# ----------------------------------------------------------------------------- 5. permutation


@pytest.mark.parametrize("name", sorted(ROBUST))
def test_permutation_invariance(x, name):
    perm = np.random.default_rng(6).permutation(N)
    a, _ = run(ROBUST[name], x)
    b, _ = run(ROBUST[name], x[perm])
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- 7. bad input


def test_limits_are_named_at_trace_time(x):
    x8 = x[:8]
    cases = [
        (agg.trimmed_mean(4), r"n > 2f"),
        (agg.krum(3), r"n > 2f \+ 2"),
        (agg.multi_krum(1, 8), r"m <= n - f"),
        (agg.monna(4), r"n > 2f"),
        (agg.flag(rank=9), r"rank <= n"),
    ]
    for aggregator, match in cases:
        with pytest.raises(ValueError, match=match):
            run(aggregator, x8)
    with pytest.raises(ValueError, match=r"nnm\(f=4\) needs n > 2f"):
        agg.nnm(4)(jnp.asarray(x8))
    with pytest.raises(ValueError, match="num_workers, dim"):
        jax.jit(agg.median().aggregate)(x8[0], None)


def test_bad_hyperparameters_at_construction():
    with pytest.raises(ValueError, match="tau"):
        agg.centered_clip(0.0)
    with pytest.raises(ValueError, match="tau"):
        agg.clipped_mean(-1.0)
    with pytest.raises(ValueError, match="iters"):
        agg.centered_clip(1.0, iters=0)
    with pytest.raises(ValueError, match="f must be"):
        agg.trimmed_mean(-1)
    with pytest.raises(ValueError, match="m must be"):
        agg.multi_krum(1, 0)
    with pytest.raises(ValueError, match="eps"):
        agg.geometric_median(eps=0.0)
    with pytest.raises(ValueError, match="max_iters"):
        agg.geometric_median(max_iters=0)
    with pytest.raises(ValueError, match="center"):
        agg.clipped_mean(1.0, center="median")
    with pytest.raises(ValueError, match="lam"):
        agg.flag(lam=-1.0)


def test_bf16_inputs_keep_their_dtype(x):
    out, _ = run(agg.trimmed_mean(F), x.astype(jnp.bfloat16))
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), ref_trimmed_mean(x, F), atol=0.05)


def test_sorting_network_sorts_every_worker_count():
    from optdist.robust import _geometry

    rng = np.random.default_rng(7)
    for n in [*range(1, 18), 31, 64]:
        x = rng.integers(-5, 5, size=(n, 4)).astype(np.float32)  # ties included
        np.testing.assert_array_equal(_geometry.sort_rows(jnp.asarray(x)), np.sort(x, axis=0), err_msg=n)
