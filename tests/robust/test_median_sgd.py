"""Median-gradient SGD: float64 NumPy references of the running median, clipping as its special case,
the median across workers, and convergence under Cauchy noise where mean-SGD does not converge."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optdist
from optdist.robust import median_gradients, running_median

W, D = 8, 6


def _tree(rng, scale=1.0):
    return {"a": scale * rng.standard_cauchy(size=(3,)), "b": scale * rng.standard_cauchy(size=(2, 2))}


def ref_running_median(grads, tau, norm, center):
    """The paper's SPP step m <- c + clip_tau(g - c), c = m (running) or 0 (clipping), float64."""
    m = np.zeros(7)
    out = []
    for g in grads:
        c = m if center == "previous" else np.zeros(7)
        diff = g - c
        if norm == "l2":
            step = diff * min(1.0, tau / np.linalg.norm(diff))
        else:
            step = np.clip(diff, -tau, tau)
        m = c + step
        out.append(m.copy())
    return np.array(out)


def _flat(tree):
    return np.concatenate([np.ravel(tree["a"]), np.ravel(tree["b"])])


@pytest.mark.parametrize("norm", ["l2", "coordinate"])
@pytest.mark.parametrize("center", ["previous", "zero"])
def test_running_median_matches_float64_reference(norm, center):
    rng = np.random.default_rng(1)
    grads = [_tree(rng) for _ in range(6)]
    want = ref_running_median([_flat(g) for g in grads], 0.7, norm, center)
    with jax.enable_x64(True):
        tx = running_median(0.7, norm, center)
        params = jax.tree_util.tree_map(lambda x: jnp.zeros_like(jnp.asarray(x)), grads[0])
        state = tx.init(params)
        update = jax.jit(tx.update)
        for t, g in enumerate(grads):
            out, state = update(jax.tree_util.tree_map(jnp.asarray, g), state, params)
            assert out["a"].dtype == jnp.float64
            np.testing.assert_allclose(_flat(out), want[t], rtol=1e-12, atol=1e-12)


def test_clipping_is_the_zero_centred_special_case():
    rng = np.random.default_rng(2)
    grads = [jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), _tree(rng)) for _ in range(4)]
    pairs = [
        (running_median(0.5, "l2", "zero"), optax.clip_by_global_norm(0.5)),
        (running_median(0.5, "coordinate", "zero"), optax.clip(0.5)),
    ]
    for ours, theirs in pairs:
        s, r = ours.init(grads[0]), theirs.init(grads[0])
        for g in grads:
            a, s = ours.update(g, s)
            b, r = theirs.update(g, r)
            jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), a, b)


def test_running_median_tracks_the_median_not_the_mean():
    """A constant signal plus skewed outliers: the running median settles on the signal, momentum
    (an online mean) on signal + outlier mean."""
    rng = np.random.default_rng(3)
    signal = np.array([1.0, -2.0, 0.5])
    tx = running_median(0.05)
    state = tx.init({"w": jnp.zeros(3)})
    update = jax.jit(tx.update)
    for _ in range(2000):
        outlier = 50.0 * (rng.random() < 0.2)  # 20% of the steps: +50 on every coordinate
        out, state = update(
            {"w": jnp.asarray(signal + outlier + 0.1 * rng.normal(size=3), jnp.float32)}, state
        )
    np.testing.assert_allclose(np.asarray(out["w"]), signal, atol=0.2)


@pytest.mark.parametrize("kind", ["coordinate", "geometric"])
def test_median_across_workers_matches_float64_reference(kind):
    rng = np.random.default_rng(4)
    g = rng.normal(size=(W, D))
    g[0] = 30.0  # one outlier worker
    with jax.enable_x64(True):
        tx = median_gradients("data", kind, max_iters=1000, tol=0.0)
        params = {"w": jnp.zeros(D, jnp.float64)}
        state_w = optdist.replicate(tx.init(params), W)
        out, state_w = optdist.simulate(lambda u, s: tx.update(u, s))({"w": jnp.asarray(g)}, state_w)
        bytes_w = optdist.bytes_sent(state_w)
    if kind == "coordinate":
        want = np.median(g, axis=0)
    else:  # Weiszfeld to convergence
        want = np.median(g, axis=0)
        for _ in range(5000):
            beta = 1.0 / np.maximum(1e-8, np.linalg.norm(g - want, axis=1))
            want = beta @ g / beta.sum()
    np.testing.assert_allclose(np.asarray(out["w"]), np.broadcast_to(want, (W, D)), rtol=1e-7, atol=1e-8)
    np.testing.assert_array_equal(bytes_w, [(W - 1) * D * 8] * W)


def test_proximal_median_across_workers_reaches_the_geometric_median():
    """kind="proximal": one SPP (clipping) step per call from the previous estimate; repeated on fixed
    inputs it stops where sum_i (g_i - v)/|g_i - v| = 0 (tau below every distance): the geometric median."""
    rng = np.random.default_rng(6)
    g = rng.normal(size=(W, D))
    g[0] = 30.0
    with jax.enable_x64(True):
        tx = median_gradients("data", "proximal", tau=0.02)
        state_w = optdist.replicate(tx.init({"w": jnp.zeros(D, jnp.float64)}), W)

        def run(u, s):
            return jax.lax.scan(lambda s, _: (tx.update(u, s)[1], None), s, None, length=3000)[0]

        state_w = optdist.simulate(run)({"w": jnp.asarray(g)}, state_w)
        out, _ = optdist.simulate(lambda u, s: tx.update(u, s))({"w": jnp.asarray(g)}, state_w)
    want = np.median(g, axis=0)
    for _ in range(5000):
        beta = 1.0 / np.linalg.norm(g - want, axis=1)
        want = beta @ g / beta.sum()
    assert np.min(np.linalg.norm(g - want, axis=1)) > 0.02  # every input is farther than tau
    # clipped_mean keeps its estimate in float32: the iteration stalls once a step is below its ulp
    # (measured 6e-6 from the median here, which starts 3.6 away from the mean).
    np.testing.assert_allclose(np.asarray(out["w"]), np.broadcast_to(want, (W, D)), atol=2e-5)
    assert np.linalg.norm(g.mean(axis=0) - want) > 3.0


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="tau"):
        running_median(0.0)
    with pytest.raises(ValueError, match="norm"):
        running_median(1.0, norm="l1")
    with pytest.raises(ValueError, match="center"):
        running_median(1.0, center="mean")
    with pytest.raises(ValueError, match="kind"):
        median_gradients("data", "trimmed")
    with pytest.raises(ValueError, match="tau"):
        median_gradients("data", "proximal", tau=0.0)


# ---------------------------------------------------------------------------------- Cauchy noise

STEPS, LR = 400, 0.05
TARGET = np.linspace(-1.0, 1.0, D)


def _cauchy_run(tx):
    """SGD on 0.5 |w - w*|^2 with i.i.d. standard Cauchy noise on every worker's gradient (fixed seed,
    the same noise for every method); returns |w_t - w*| per step (worker 0)."""
    noise = np.random.default_rng(5).standard_cauchy(size=(STEPS, W, D)).astype(np.float32)
    noise = jnp.asarray(np.swapaxes(noise, 0, 1))  # [W, T, D]

    def run(params, state, noise):
        def body(carry, xi):
            p, s = carry
            g = {"w": p["w"] - jnp.asarray(TARGET, jnp.float32) + xi}
            u, s = tx.update(g, s, p)
            p = optax.apply_updates(p, u)
            return (p, s), jnp.linalg.norm(p["w"] - jnp.asarray(TARGET, jnp.float32))

        return jax.lax.scan(body, (params, state), noise)[1]

    params = {"w": jnp.zeros(D)}
    params_w, state_w = optdist.replicate((params, tx.init(params)), W)
    return np.asarray(optdist.simulate(run)(params_w, state_w, noise))[0]


@pytest.fixture(scope="module")
def cauchy_errors():
    return {
        "mean": _cauchy_run(optax.chain(optdist.mean_gradients("data"), optax.sgd(LR))),
        "median": _cauchy_run(optax.chain(median_gradients("data"), optax.sgd(LR))),
        "geometric": _cauchy_run(optax.chain(median_gradients("data", "geometric"), optax.sgd(LR))),
        # per-worker running median across iterations, then the mean over workers
        "running": _cauchy_run(
            optax.chain(running_median(1.0), optdist.mean_gradients("data"), optax.sgd(LR))
        ),
    }


def test_median_sgd_converges_under_cauchy_noise_where_mean_sgd_does_not(cauchy_errors):
    tail = {k: float(np.mean(v[STEPS // 2 :])) for k, v in cauchy_errors.items()}
    start = float(np.linalg.norm(TARGET))
    # The median of 8 Cauchy draws has a finite variance: SGD settles near w*.
    for k in ("median", "geometric", "running"):
        assert tail[k] < 0.35 * start, (k, tail)
    # The mean of 8 Cauchy draws is Cauchy again: mean-SGD keeps jumping away.
    assert tail["mean"] > 3 * max(tail["median"], tail["geometric"], tail["running"]), tail
    assert float(np.max(cauchy_errors["mean"][STEPS // 2 :])) > 2 * start, tail
