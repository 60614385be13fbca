"""optax.contrib.schedule_free as the outer or inner optimizer of outer_loop: float64 NumPy references
of the update and of the evaluation parameters, beta = 1 (primal averaging) and beta -> 0 (Polyak
averaging), and the helper's errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax.contrib import schedule_free

import optdist
from optdist.outer import schedule_free_eval_params

W, D, H, ROUNDS = 4, 3, 3, 6
ETA, GAMMA = 0.2, 0.8
CENTERS = np.random.default_rng(0).normal(size=(W, D))  # worker i minimizes 0.5 |theta - c_i|^2
THETA0 = np.array([2.0, -1.0, 0.5])


def _run(tx, evaluate=True):
    """ROUNDS * H steps on the per-worker quadratics (float64); per step: parameters, eval params."""

    def run(params, state, c):
        def body(carry, _):
            p, s = carry
            u, s = tx.update(p - c, s, p)
            p = p + u
            return (p, s), (p, schedule_free_eval_params(s, p) if evaluate else p)

        return jax.lax.scan(body, (params, state), None, length=ROUNDS * H)[1]

    with jax.enable_x64(True):
        params = jnp.asarray(THETA0)
        params_w, state_w = optdist.replicate((params, tx.init(params)), W)
        params_t, eval_t = optdist.simulate(run)(params_w, state_w, jnp.asarray(CENTERS))
    return np.asarray(params_t), np.asarray(eval_t)  # [W, steps, D]


def _local_rounds(y):
    """Every worker starts at y and takes H SGD steps on its quadratic; returns [W, D]."""
    th = np.tile(y, (W, 1))
    for _ in range(H):
        th = th - ETA * (th - CENTERS)
    return th


def ref_outer(beta):
    """Schedule-free SGD(GAMMA) on the pseudo-gradients, one step per round; returns (y, x) per round."""
    y, z, x = THETA0.copy(), THETA0.copy(), THETA0.copy()
    ys, xs = [], []
    for t in range(1, ROUNDS + 1):
        delta = y - _local_rounds(y).mean(axis=0)
        z = z - GAMMA * delta
        x = (1 - 1 / t) * x + z / t
        y = (1 - beta) * z + beta * x
        ys.append(y)
        xs.append(x)
    return np.array(ys), np.array(xs)


def _sync_steps(a):
    return a[:, H - 1 :: H]  # [W, ROUNDS, D]: the state right after each sync


@pytest.mark.parametrize("beta", [0.5, 0.9])
def test_outer_schedule_free_matches_float64_reference(beta):
    params, evals = _run(
        optdist.outer_loop(optax.sgd(ETA), schedule_free(optax.sgd(GAMMA), GAMMA, beta), H, "data")
    )
    ys, xs = ref_outer(beta)
    np.testing.assert_allclose(
        _sync_steps(params), np.broadcast_to(ys, (W, ROUNDS, D)), rtol=1e-12, atol=1e-12
    )
    # the evaluation parameters are x, identical on every worker at every step (not the local iterates)
    np.testing.assert_allclose(
        _sync_steps(evals), np.broadcast_to(xs, (W, ROUNDS, D)), rtol=1e-12, atol=1e-12
    )
    np.testing.assert_array_equal(evals, np.broadcast_to(evals[:1], evals.shape))
    between = evals[:, H : 2 * H - 1]  # steps inside round 2: x of round 1
    np.testing.assert_allclose(between, np.broadcast_to(xs[0], between.shape), rtol=1e-12, atol=1e-12)


def test_beta_one_is_primal_averaging():
    """beta = 1: gradients at the running average, y = x (the anchor is the average)."""
    params, evals = _run(
        optdist.outer_loop(optax.sgd(ETA), schedule_free(optax.sgd(GAMMA), GAMMA, 1.0), H, "data")
    )
    z, x = THETA0.copy(), THETA0.copy()
    want = []
    for t in range(1, ROUNDS + 1):
        z = z - GAMMA * (x - _local_rounds(x).mean(axis=0))  # pseudo-gradient taken at the average
        x = (1 - 1 / t) * x + z / t
        want.append(x)
    np.testing.assert_allclose(
        _sync_steps(evals), np.broadcast_to(want, (W, ROUNDS, D)), rtol=1e-12, atol=1e-12
    )
    np.testing.assert_allclose(_sync_steps(params), _sync_steps(evals), rtol=1e-12, atol=1e-12)


def test_beta_to_zero_is_polyak_averaging():
    """beta -> 0: the anchor follows plain outer SGD (Local SGD with outer step GAMMA) and x is the
    uniform average of its anchors. optax needs beta > 0 (it divides by beta): beta = 1e-7 is within
    O(beta) of the limit, checked against the plain run's anchors averaged."""
    beta = 1e-7
    params, evals = _run(
        optdist.outer_loop(optax.sgd(ETA), schedule_free(optax.sgd(GAMMA), GAMMA, beta), H, "data")
    )
    plain, _ = _run(optdist.outer_loop(optax.sgd(ETA), optax.sgd(GAMMA), H, "data"), evaluate=False)
    anchors = _sync_steps(plain)  # z_1 .. z_R of plain SGD on the pseudo-gradients
    polyak = np.cumsum(anchors, axis=1) / np.arange(1, ROUNDS + 1)[None, :, None]
    np.testing.assert_allclose(_sync_steps(params), anchors, rtol=0, atol=1e-6)
    np.testing.assert_allclose(_sync_steps(evals), polyak, rtol=0, atol=1e-6)
    _, xs = ref_outer(0.0)
    np.testing.assert_allclose(_sync_steps(evals), np.broadcast_to(xs, (W, ROUNDS, D)), rtol=0, atol=1e-6)


def test_inner_schedule_free_eval_params_per_worker():
    """Inner schedule-free: per-worker x_i = (theta_i - (1 - beta) z_i) / beta; the sync averages the
    y_i, keeps the z_i, and leaves the workers' mean of x_i unchanged."""
    beta = 0.8
    params, evals = _run(
        optdist.outer_loop(schedule_free(optax.sgd(ETA), ETA, beta), optax.sgd(1.0), H, "data")
    )
    y, z, x = (np.tile(THETA0, (W, 1)) for _ in range(3))
    for step in range(ROUNDS * H):
        t = step + 1
        z = z - ETA * (y - CENTERS)
        x = (1 - 1 / t) * x + z / t
        y = (1 - beta) * z + beta * x
        if t % H == 0:  # sync: every y_i becomes the mean, z_i stays, x_i is recomputed from them
            mean_x_before = x.mean(axis=0)
            y = np.tile(y.mean(axis=0), (W, 1))
            x = (y - (1 - beta) * z) / beta
            np.testing.assert_allclose(x.mean(axis=0), mean_x_before, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(params[:, step], y, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(evals[:, step], x, rtol=1e-11, atol=1e-12)


def test_helper_errors_are_named():
    params = {"w": jnp.zeros(2)}
    plain = optdist.outer_loop(optax.sgd(0.1), optax.sgd(1.0), 2, None)
    with pytest.raises(ValueError, match="neither as its outer nor as its inner"):
        schedule_free_eval_params(plain.init(params))
    inner = optdist.outer_loop(schedule_free(optax.sgd(0.1), 0.1), optax.sgd(1.0), 2, None)
    with pytest.raises(ValueError, match="pass params"):
        schedule_free_eval_params(inner.init(params))
    with pytest.raises(ValueError, match="none found"):
        schedule_free_eval_params(optax.sgd(0.1).init(params))
    # a plain ScheduleFreeState, and an outer loop inside skip_nonfinite, are found
    sf = schedule_free(optax.sgd(0.1), 0.1, 0.9)
    np.testing.assert_array_equal(schedule_free_eval_params(sf.init(params), params)["w"], params["w"])
    wrapped = optdist.skip_nonfinite(
        optdist.outer_loop(optax.sgd(0.1), schedule_free(optax.sgd(1.0), 1.0), 2, None), None
    )
    np.testing.assert_array_equal(schedule_free_eval_params(wrapped.init(params))["w"], params["w"])
