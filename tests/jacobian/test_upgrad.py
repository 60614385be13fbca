"""UPGrad, MGDA and the mean against float64 NumPy references written from the paper's definitions.

The references solve the same quadratic programs by a different method from the library's
(Lawson-Hanson in Gram form): an exhaustive active-set enumeration of the KKT conditions on small
sizes, in float64.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optdist
from optdist import jacobian

# --------------------------------------------------------------------------- #
# float64 references


def box_qp_reference(g, b, lower):
    """argmin_{v >= lower} 1/2 v'Gv - b'v by enumerating the active set (KKT: stationarity on the free
    coordinates, primal feasibility, non-negative multipliers on the active ones)."""
    m = len(b)
    best = None
    for r in range(m + 1):
        for free in itertools.combinations(range(m), r):
            free = list(free)
            act = [k for k in range(m) if k not in free]
            v = lower.astype(np.float64).copy()
            if free:
                rhs = b[free] - g[np.ix_(free, act)] @ lower[act]
                v[free] = np.linalg.lstsq(g[np.ix_(free, free)], rhs, rcond=None)[0]
            grad = g @ v - b
            if (
                np.all(v >= lower - 1e-10)
                and np.all(grad[act] >= -1e-10)
                and np.allclose(grad[free], 0, atol=1e-9)
            ):
                obj = 0.5 * v @ g @ v - b @ v
                if best is None or obj < best[0] - 1e-12:
                    best = (obj, v)
    assert best is not None
    return best[1]


def upgrad_reference(j):
    """A(J) = J^T mean_i argmin_{v >= e_i} v'Gv (the paper's projection onto the dual cone)."""
    g = j @ j.T
    m = len(j)
    w = np.mean([box_qp_reference(g, np.zeros(m), np.eye(m)[i]) for i in range(m)], axis=0)
    return j.T @ w


def project_dual_cone_reference(x, j):
    """Euclidean projection of x onto {y : J y >= 0} through its own primal KKT (active rows)."""
    m = len(j)
    best = None
    for r in range(m + 1):
        for act in itertools.combinations(range(m), r):
            act = list(act)
            y, lam = x.copy(), np.zeros(m)
            if act:
                ja = j[act]
                lam_a = np.linalg.lstsq(ja @ ja.T, -(ja @ x), rcond=None)[0]
                y = x + ja.T @ lam_a
                lam[act] = lam_a
            if np.all(j @ y >= -1e-9) and np.all(lam >= -1e-10):
                d = np.sum((y - x) ** 2)
                if best is None or d < best[0] - 1e-12:
                    best = (d, y)
    return best[1]


def mgda_reference(j):
    """min-norm point of the convex hull: enumerate supports S, solve [G_SS 1; 1' 0][w; -lam] = [0; 1]."""
    g = j @ j.T
    m = len(j)
    best = None
    for r in range(1, m + 1):
        for s in itertools.combinations(range(m), r):
            s = list(s)
            kkt = np.zeros((r + 1, r + 1))
            kkt[:r, :r] = g[np.ix_(s, s)]
            kkt[:r, r] = -1.0
            kkt[r, :r] = 1.0
            sol = np.linalg.lstsq(kkt, np.r_[np.zeros(r), 1.0], rcond=None)[0]
            w = np.zeros(m)
            w[s] = sol[:r]
            if np.all(w >= -1e-10):
                val = w @ g @ w
                if best is None or val < best[0] - 1e-12:
                    best = (val, w)
    return j.T @ best[1]


def jacobians(seed, m, d, count=6):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(m, d)) * rng.uniform(0.2, 5.0, size=(m, 1)) for _ in range(count)]


SIZES = [(2, 3), (3, 8), (5, 5), (5, 20)]


@pytest.mark.parametrize("m,d", SIZES)
def test_upgrad_matches_the_published_projection(m, d):
    agg = jax.jit(lambda x: jacobian.upgrad(max_iters=2000, tol=1e-9).aggregate(x, None)[0])
    for j in jacobians(m * 100 + d, m, d):
        ref = upgrad_reference(j)
        # The reference's projection also equals the primal projection, row by row.
        proj = np.mean([project_dual_cone_reference(j[i], j) for i in range(m)], axis=0)
        np.testing.assert_allclose(proj, ref, rtol=1e-7, atol=1e-9)
        out = np.asarray(agg(jnp.asarray(j, jnp.float32)), np.float64)
        np.testing.assert_allclose(out, ref, rtol=2e-4, atol=2e-4 * np.abs(ref).max())


@pytest.mark.parametrize("m,d", SIZES)
def test_upgrad_has_a_nonnegative_inner_product_with_every_row(m, d):
    agg = jax.jit(lambda x: jacobian.upgrad().aggregate(x, None)[0])
    for j in jacobians(7 + m + d, m, d, count=10):
        out = np.asarray(agg(jnp.asarray(j, jnp.float32)), np.float64)
        scale = np.linalg.norm(j, axis=1).max() * np.linalg.norm(out)
        assert np.all(j @ out >= -1e-5 * scale), j @ out


@pytest.mark.parametrize("m,d", [(8, 6), (10, 4)])
def test_upgrad_with_more_rows_than_dimensions(m, d):
    """G is singular and the dual cone is often {0}: the output must still be the projection (here
    mostly 0) and conflict with no row beyond float32 rounding (coordinate descent, the earlier
    solver, left -3.5e-3 max|J_i|^2 after its 200 sweeps on such Jacobians)."""
    agg = jax.jit(lambda x: jacobian.upgrad().aggregate(x, None)[0])
    for j in jacobians(m * 100 + d, m, d, count=4):
        rows = np.linalg.norm(j, axis=1).max()
        out = np.asarray(agg(jnp.asarray(j, jnp.float32)), np.float64)
        np.testing.assert_allclose(out, upgrad_reference(j), rtol=0, atol=1e-5 * rows)
        assert np.all(j @ out >= -1e-5 * rows**2), (j @ out) / rows**2


def test_upgrad_conflicting_rows_where_the_mean_conflicts():
    j = np.array([[1.0, 0.1], [-3.0, 0.1]])
    assert (j @ j.mean(0)).min() < 0  # the mean conflicts with row 0
    out = np.asarray(jacobian.upgrad().aggregate(jnp.asarray(j, jnp.float32), None)[0], np.float64)
    assert (j @ out).min() >= -1e-6
    np.testing.assert_allclose(out, upgrad_reference(j), rtol=1e-4, atol=1e-6)


def test_upgrad_equals_the_mean_when_rows_agree():
    row = np.random.default_rng(3).normal(size=11)
    j = np.tile(row, (4, 1))
    out = np.asarray(jacobian.upgrad().aggregate(jnp.asarray(j, jnp.float32), None)[0])
    np.testing.assert_allclose(out, row, rtol=1e-6, atol=1e-7)
    # mean() is the plain mean of the rows.
    j2 = np.random.default_rng(4).normal(size=(3, 5))
    np.testing.assert_allclose(
        np.asarray(jacobian.mean().aggregate(jnp.asarray(j2, jnp.float32), None)[0]), j2.mean(0), rtol=1e-6
    )


@pytest.mark.parametrize("m,d", SIZES)
def test_mgda_matches_the_min_norm_point(m, d):
    agg = jax.jit(lambda x: jacobian.mgda(max_iters=5000, tol=1e-10).aggregate(x, None)[0])
    for j in jacobians(m * 7 + d, m, d):
        ref = mgda_reference(j)
        out = np.asarray(agg(jnp.asarray(j, jnp.float32)), np.float64)
        np.testing.assert_allclose(out, ref, rtol=1e-3, atol=1e-3 * np.abs(j).max())
        # non-conflicting: J A >= |A|^2 (up to float32)
        assert np.all(j @ out >= np.sum(out**2) - 1e-3 * np.abs(j).max() ** 2)


def test_box_qp_solves_every_column():
    rng = np.random.default_rng(5)
    a = rng.normal(size=(4, 6))
    g = a @ a.T
    b = rng.normal(size=(4, 3))
    lower = rng.normal(size=(4, 3))
    out = np.asarray(
        jacobian.box_qp(
            jnp.asarray(g, jnp.float32),
            jnp.asarray(b, jnp.float32),
            jnp.asarray(lower, jnp.float32),
            5000,
            1e-10,
        )
    )
    for c in range(3):
        np.testing.assert_allclose(out[:, c], box_qp_reference(g, b[:, c], lower[:, c]), rtol=1e-3, atol=1e-4)


# --------------------------------------------------------------------------- #
# As a transform on a Jacobian tree, and over workers


def two_task_problem():
    a = {"w": jnp.array([[1.0, 2.0], [0.0, -1.0]]), "b": jnp.array([3.0])}
    c = {"w": jnp.array([[-2.0, 0.5], [1.0, 1.0]]), "b": jnp.array([-1.0])}

    def losses(p):
        f = lambda t: sum(jnp.sum((p[k] - t[k]) ** 2) for k in p)  # noqa: E731
        return jnp.stack([f(a), f(c)])

    return losses, a, c


def test_aggregate_jacobian_flattens_the_whole_tree():
    losses, _, _ = two_task_problem()
    params = {"w": jnp.zeros((2, 2)), "b": jnp.zeros((1,))}
    jac = jax.jacrev(losses)(params)
    tx = jacobian.aggregate_jacobian(jacobian.upgrad())
    out, _ = tx.update(jac, tx.init(params), params)
    flat = np.concatenate([np.asarray(jac["b"]).reshape(2, -1), np.asarray(jac["w"]).reshape(2, -1)], axis=1)
    ref = upgrad_reference(flat.astype(np.float64))  # dict keys flatten sorted: b, then w
    np.testing.assert_allclose(np.asarray(out["b"]), ref[:1], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out["w"]).ravel(), ref[1:], rtol=1e-4, atol=1e-5)
    assert out["w"].shape == (2, 2) and out["b"].shape == (1,)


def test_jacobian_descent_reaches_the_pareto_set():
    """Two quadratics with minimizers a and c: the Pareto set is the segment [a, c]."""
    losses, a, c = two_task_problem()
    tx = optax.chain(jacobian.aggregate_jacobian(jacobian.upgrad()), optax.sgd(0.1))
    params = {"w": jnp.full((2, 2), 4.0), "b": jnp.array([5.0])}

    @jax.jit
    def step(params, state):
        updates, state = tx.update(jax.jacrev(losses)(params), state, params)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    start = np.asarray(losses(params))
    for _ in range(200):
        params, state = step(params, state)
    flat = lambda t: np.concatenate([np.ravel(t["b"]), np.ravel(t["w"])])  # noqa: E731
    x, pa, pc = flat(params), flat(a), flat(c)
    t = np.clip((x - pa) @ (pc - pa) / np.sum((pc - pa) ** 2), 0, 1)
    assert np.linalg.norm(x - (pa + t * (pc - pa))) < 1e-3  # on the segment
    assert np.all(np.asarray(losses(params)) < start)  # both objectives decreased


def test_aggregate_jacobian_names_bad_input():
    tx = jacobian.aggregate_jacobian(jacobian.upgrad())
    params = {"w": jnp.zeros((2, 2)), "b": jnp.zeros((1,))}
    with pytest.raises(ValueError, match="leading axis"):
        tx.update({"w": jnp.zeros((2, 2, 2)), "b": jnp.zeros((3, 1))}, tx.init(params), params)
    with pytest.raises(ValueError, match="does not match"):
        tx.update({"w": jnp.zeros((2, 2)), "b": jnp.zeros((2, 1))}, tx.init(params), params)
    with pytest.raises(TypeError, match="Rule"):
        jacobian.aggregate_jacobian("upgrad")
    with pytest.raises(ValueError, match="max_iters"):
        jacobian.upgrad(max_iters=0)
    with pytest.raises(ValueError, match="tol"):
        jacobian.mgda(tol=-1.0)


def test_upgrad_over_workers_in_robust_means_slot():
    n, d = 8, 6
    grads = np.random.default_rng(9).normal(size=(n, d)).astype(np.float32)
    tx = optdist.robust_mean(jacobian.upgrad(), "data")
    params = jnp.zeros((d,))

    def step(g, state):
        return tx.update(g, state, params)

    state_w = optdist.replicate(tx.init(params), n)
    out, state_w = optdist.simulate(step, "data")(jnp.asarray(grads), state_w)
    ref = upgrad_reference(grads.astype(np.float64))
    for i in range(n):
        # n > d: G is singular and coordinate descent converges more slowly (default 200 sweeps).
        np.testing.assert_allclose(np.asarray(out[i]), ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(optdist.bytes_sent(state_w), [(n - 1) * d * 4] * n)  # one all-gather
