"""backup_mean and DBW: masked means against NumPy, the simulated wall time, bytes, and time-to-target."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optdist
from optdist.comm import as_transform
from optdist.comm.aggregation import exact_mean
from optdist.comm.channel import Channel
from optdist.stragglers import backup_mean, clock, dbw_choice, dynamic_backup_mean

N, D, STEPS = 8, 5, 3
DELAYS = clock.shifted_exponential(1.0, 1.0)


def run_backup(agg, grads, weights=None):
    """STEPS aggregations of grads[t] ([STEPS, N, D]) simulated; returns estimates, final state, bytes."""

    def one(g_seq, w):
        state = agg.init(g_seq[0])
        ch = Channel("data")
        outs = []
        for t in range(STEPS):
            est, state = agg.aggregate(g_seq[t], state, ch, weights=w)
            outs.append(est)
        # reference bytes: the weighted exact mean of the same tree, issued STEPS times
        ref = Channel("data")
        for t in range(STEPS):
            exact_mean().aggregate(g_seq[t], (), ref, weights=jnp.float32(1.0))
        return jnp.stack(outs), state, ch.counter, ref.counter

    w = jnp.ones(N) if weights is None else weights
    return optdist.simulate(one, "data")(jnp.swapaxes(grads, 0, 1), w)


@pytest.fixture(scope="module")
def grads():
    return jnp.asarray(np.random.default_rng(0).normal(size=(STEPS, N, D)), jnp.float32)


@pytest.mark.parametrize("b", [0, 3, 7])
def test_backup_mean_is_the_masked_mean_of_the_fastest(grads, b):
    out, state, counter, ref_counter = run_backup(backup_mean(b, DELAYS, seed=4), grads)
    g = np.asarray(grads, np.float64)
    wall = 0.0
    for t in range(STEPS):
        times = np.asarray(clock.compute_times(DELAYS, 4, t, N), np.float64)
        fastest = np.argsort(times, kind="stable")[: N - b]
        ref = g[t, fastest].mean(axis=0)
        wall += np.sort(times)[N - b - 1]
        for i in range(N):  # identical on every worker
            np.testing.assert_allclose(np.asarray(out[i, t]), ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(state.wall_time), [wall] * N, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(state.num_backup), [b] * N)
    # Bytes: every worker, backup or not, sends the full masked all-reduce (its zeros included).
    np.testing.assert_array_equal(optdist.bytes_sent(counter), optdist.bytes_sent(ref_counter))
    assert int(optdist.bytes_sent(counter)[0]) > 0


def test_backup_mean_with_participation_weights(grads):
    part = jnp.asarray([1, 1, 0, 1, 1, 1, 0, 1], jnp.float32)
    out, *_ = run_backup(backup_mean(2, DELAYS, seed=1), grads, weights=part)
    g = np.asarray(grads, np.float64)
    for t in range(STEPS):
        times = np.asarray(clock.compute_times(DELAYS, 1, t, N))
        keep = np.zeros(N, bool)
        keep[np.argsort(times, kind="stable")[: N - 2]] = True
        keep &= np.asarray(part, bool)
        np.testing.assert_allclose(np.asarray(out[0, t]), g[t, keep].mean(axis=0), rtol=1e-5, atol=1e-6)


def test_backup_mean_names_bad_input(grads):
    with pytest.raises(ValueError, match="b "):
        backup_mean(-1, DELAYS)
    with pytest.raises(TypeError, match="DelayModel"):
        backup_mean(1, "exponential")
    with pytest.raises(ValueError, match="b < n"):
        run_backup(backup_mean(N, DELAYS), grads)
    with pytest.raises(ValueError, match="num_workers=8"):
        run_backup(dynamic_backup_mean(4, DELAYS, 0.1), grads)
    with pytest.raises(ValueError, match="initial_backup"):
        dynamic_backup_mean(4, DELAYS, 0.1, initial_backup=3)
    with pytest.raises(ValueError, match="learning_rate"):
        dynamic_backup_mean(4, DELAYS, 0.0)


def test_dbw_choice_maximises_gain_per_second():
    times = np.array([1.0, 1.2, 1.5, 2.0, 3.0])
    eta, lsm = 0.1, 2.0
    for gsq, var in [(10.0, 1.0), (0.01, 5.0), (1.0, 20.0)]:
        k = np.arange(1, 6)
        gain = eta * gsq - 0.5 * lsm * eta**2 * (gsq + var / k)
        speed = np.where(k >= 2, gain / times, -np.inf)
        ref = int(np.argmax(speed) + 1) if gain.max() > 0 else 5
        assert int(dbw_choice(jnp.asarray(times), gsq, var, lsm, eta)) == ref


def test_dbw_first_step_estimates_match_numpy(grads):
    agg = dynamic_backup_mean(N, DELAYS, 0.1, seed=2, initial_backup=3)

    def one(g):
        est, state = agg.aggregate(g, agg.init(g), Channel("data"))
        return est, state

    est, state = optdist.simulate(one, "data")(grads[0])
    g = np.asarray(grads[0], np.float64)
    times = np.asarray(clock.compute_times(DELAYS, 2, 0, N))
    rows = g[np.argsort(times, kind="stable")[: N - 3]]
    k = len(rows)
    var = np.sum(rows.var(axis=0, ddof=1))
    np.testing.assert_allclose(np.asarray(est[0]), rows.mean(0), rtol=1e-5, atol=1e-6)
    s = jax.tree_util.tree_map(lambda x: np.asarray(x[0], np.float64), state)
    np.testing.assert_allclose(s.variance / s.debias, var, rtol=1e-4)
    np.testing.assert_allclose(
        s.grad_sq / s.debias, np.sum(rows.mean(0) ** 2) - var / k, rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(s.times / s.debias, np.sort(times), rtol=1e-5)
    assert int(s.num_backup) == 3


# --------------------------------------------------------------------------- #
# Time to target on a noisy least-squares problem (simulated seconds)


def _time_to_target_runs(aggs, steps=300, d=10, lr=0.05, batch=4):
    w_true = jnp.asarray(np.random.default_rng(0).normal(size=d), jnp.float32)
    out = {}
    for name, agg in aggs.items():
        tx = optax.chain(as_transform(agg, "data"), optax.sgd(lr))

        def step(w, s, key, tx=tx):
            x = jax.random.normal(key, (batch, d))
            y = x @ w_true + jax.random.normal(jax.random.fold_in(key, 1), (batch,))
            g = jax.grad(lambda w: jnp.mean((x @ w - y) ** 2) / 2)(w)
            u, s = tx.update(g, s, w)
            w = optax.apply_updates(w, u)
            return w, s, jnp.sum((w - w_true) ** 2)

        sim = optdist.simulate(step, "data")

        def body(c, key, sim=sim):
            w, s, err = sim(*c, jax.random.split(key, N))
            return (w, s), (err[0], s[0].aggregator.wall_time[0], s[0].aggregator.num_backup[0])

        init = optdist.replicate((jnp.zeros(d), tx.init(jnp.zeros(d))), N)
        keys = jax.random.split(jax.random.key(1), steps)
        _, (err, wall, b) = jax.jit(lambda c, keys=keys, body=body: jax.lax.scan(body, c, keys))(init)
        out[name] = (np.asarray(err), np.asarray(wall), np.asarray(b))
    return out


def _time_to(err, wall, target, window=10):
    smooth = np.convolve(err, np.ones(window) / window, mode="valid")
    hit = np.flatnonzero(smooth <= target)
    return wall[hit[0] + window - 1] if hit.size else np.inf


@pytest.mark.slow
def test_dbw_time_to_target_is_within_6_percent_of_the_best_static_b():
    """Shifted-exponential clock, 8 workers, SGD on noisy least squares (L = 1 known). Measured (2-core
    CPU, jax 0.10.2, this seed): DBW starts at b = 6 and moves down to b = 0 as the gradient/noise
    ratio falls; the best static b changes with the target (6 for 0.3-0.05, 5 for 0.03). DBW's
    simulated time to target / the best static b's: 1.00 (0.3), 1.00 (0.1), 1.01 (0.05), 1.06 (0.03):
    not strictly "no worse" at 0.03 (its EMA estimates, decay 0.98, lag the switch to b = 5), hence
    the 6% bound."""
    aggs = {b: backup_mean(b, DELAYS) for b in range(N)}
    aggs["dbw"] = dynamic_backup_mean(N, DELAYS, 0.05, smoothness=1.0, decay=0.98, initial_backup=4)
    runs = _time_to_target_runs(aggs)
    for target in (0.3, 0.1, 0.05, 0.03):
        static = min(_time_to(*runs[b][:2], target) for b in range(N))
        dbw = _time_to(*runs["dbw"][:2], target)
        assert np.isfinite(static)
        assert dbw <= 1.06 * static, (target, dbw, static)
    b = runs["dbw"][2]
    assert b[1] == 6 and b[-20:].max() < b[1]  # it adapts: fewer backups late in training
