"""DIFF2 against a float64 NumPy transcription, its gradient-descent degenerate case, its noise, its bytes;
the zCDP accountant against the Renyi conversion and the exact Gaussian-mechanism privacy curve."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optdist
from optdist import privacy
from tests.helpers import linear_loss, linear_problem

WORKERS = 4
LR = 0.1


def np_grads(params, batch):
    x, y = batch[:, :-3].astype(np.float64), batch[:, -3:].astype(np.float64)
    r = x @ params["w"] + params["b"] - y
    return {"w": 2.0 * x.T @ r / len(x), "b": 2.0 * r.sum(0) / len(x)}


def clip(tree, c):
    norm = math.sqrt(sum(float(np.sum(v**2)) for v in tree.values()))
    return {k: v * min(1.0, c / norm) if norm > 0 else v for k, v in tree.items()}


def reference(params, batches, steps, c1, c2, refresh):
    """DIFF2 + gradient descent, sigma = 0, float64."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    prev = [{k: np.zeros_like(v) for k, v in p.items()} for _ in batches]
    v = None
    for t in range(steps):
        grads = [np_grads(p, b) for b in batches]
        if t % refresh == 0:
            msgs = [clip(g, c1) for g in grads]
        else:
            msgs = [clip({k: g[k] - q[k] for k in g}, c2) for g, q in zip(grads, prev)]
        mean = {k: np.mean([m[k] for m in msgs], axis=0) for k in p}
        v = mean if t % refresh == 0 else {k: v[k] + mean[k] for k in p}
        prev = grads
        p = {k: p[k] - LR * v[k] for k in p}
    return p


def train(tx, steps, num_examples=8 * WORKERS):
    params, data = linear_problem(num_examples=num_examples)
    batches = optdist.shard_batch(data, WORKERS)

    def run(p, s, batch):
        def body(carry, _):
            p, s = carry
            u, s = tx.update(jax.grad(linear_loss)(p, batch), s, p)
            return (optax.apply_updates(p, u), s), None

        return jax.lax.scan(body, (p, s), None, length=steps)[0]

    p_w, s_w = optdist.replicate((params, tx.init(params)), WORKERS)
    p_w, s_w = jax.jit(optdist.simulate(run, "data"))(p_w, s_w, batches)
    return params, np.asarray(batches), p_w, s_w


def test_sigma_zero_refresh_every_step_is_gradient_descent():
    tx = optax.chain(privacy.dp_diff_mean(1e6, 0.0, 1, "data"), optax.sgd(LR))
    params, batches, p_w, s_w = train(tx, 6)
    want = reference(params, batches, 6, 1e6, 1e6, 1)
    gd = optax.chain(optdist.mean_gradients("data"), optax.sgd(LR))
    _, _, p_gd, _ = train(gd, 6)
    for k in want:
        np.testing.assert_allclose(np.asarray(p_w[k][0], np.float64), want[k], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(p_w[k]), np.asarray(p_gd[k]), rtol=1e-6, atol=1e-7)


def test_matches_float64_reference_with_active_clips_and_periodic_refresh():
    c1, c2, refresh, steps = 2.0, 0.3, 3, 8
    tx = optax.chain(privacy.dp_diff_mean(c1, 0.0, refresh, "data", diff_clip_norm=c2), optax.sgd(LR))
    params, batches, p_w, s_w = train(tx, steps)
    want = reference(params, batches, steps, c1, c2, refresh)
    for k in want:
        for w in range(WORKERS):
            np.testing.assert_allclose(np.asarray(p_w[k][w], np.float64), want[k], rtol=1e-5, atol=1e-6)
    # the clips were active (the problem's gradient norms exceed them), so this is not plain GD
    g0 = np_grads({k: np.asarray(v, np.float64) for k, v in params.items()}, batches[0])
    assert math.sqrt(sum(np.sum(v**2) for v in g0.values())) > c1
    # one all-reduce of the 18 gradient entries per step, float32 (packed: both leaves are small)
    per_step = 2 * (WORKERS - 1) * -(-18 // WORKERS) * 4
    np.testing.assert_array_equal(optdist.bytes_sent(s_w), [steps * per_step] * WORKERS)


def test_noise_is_per_worker_and_accumulates_between_refreshes():
    # Zero gradients: the estimate is the noise alone; refresh noise has std sigma C1 / sqrt(n), each
    # difference step adds an independent sigma C2 / sqrt(n) per coordinate.
    sigma, c1, c2, d = 0.5, 1.0, 0.2, 4000
    agg = privacy.dp_diff(c1, sigma, 3, diff_clip_norm=c2, seed=3)
    zeros = {"x": jnp.zeros((WORKERS, d))}

    def steps(tree, state):
        outs = []
        for _ in range(4):
            out, state = agg.aggregate(tree, state, optdist.comm.Channel("data"))
            outs.append(out["x"])
        return outs, state

    state_w = optdist.replicate(agg.init({"x": jnp.zeros((d,))}), WORKERS)
    outs, state_w = jax.jit(optdist.simulate(steps, "data"))(zeros, state_w)
    outs = [np.asarray(o, np.float64) for o in outs]
    for o in outs:
        np.testing.assert_array_equal(o, np.broadcast_to(o[0], o.shape))  # identical on every worker
    stds = [o[0].std() for o in outs]
    want = [sigma * math.sqrt(c1**2 + k * c2**2) / math.sqrt(WORKERS) for k in (0, 1, 2)]
    np.testing.assert_allclose(stds[:3], want, rtol=0.05)
    np.testing.assert_allclose(stds[3], want[0], rtol=0.05)  # step 3 refreshes
    assert abs(np.corrcoef(outs[3][0], outs[0][0])[0, 1]) < 0.1  # fresh noise at the refresh


def test_refuses_weights():
    agg = privacy.dp_diff(1.0, 0.0, 2)
    state = agg.init({"x": jnp.zeros(3)})
    with pytest.raises(ValueError, match="weights"):
        agg.aggregate({"x": jnp.zeros(3)}, state, optdist.comm.Channel(None), weights=jnp.float32(1))


def _gaussian_delta(eps, mu):
    """Exact delta(eps) of a Gaussian mechanism with sensitivity / std = mu (Balle & Wang 2018)."""
    phi = lambda z: 0.5 * math.erfc(-z / math.sqrt(2))  # noqa: E731
    return phi(mu / 2 - eps / mu) - math.exp(eps) * phi(-mu / 2 - eps / mu)


@pytest.mark.parametrize("eps,delta,steps", [(1.0, 1e-5, 1), (8.0, 1e-5, 1000), (3.0, 1e-6, 50)])
def test_accountant_calibration_is_consistent_and_sound(eps, delta, steps):
    sigma = privacy.noise_multiplier_for(eps, delta, steps)
    assert privacy.epsilon(sigma, steps, delta) == pytest.approx(eps, rel=1e-9)
    rho = privacy.zcdp_rho(sigma, steps)
    assert rho == pytest.approx(steps * 4 / (2 * sigma**2))
    # the closed form is the minimum over Renyi orders of alpha rho + log(1/delta) / (alpha - 1)
    alphas = 1 + np.logspace(-4, 4, 200001)
    assert np.min(alphas * rho + math.log(1 / delta) / (alphas - 1)) == pytest.approx(eps, rel=1e-6)
    # T Gaussian releases of sensitivity 2C and std sigma C are one Gaussian mechanism of
    # mu = 2 sqrt(T) / sigma: its exact delta at our epsilon is below the promised delta.
    exact = _gaussian_delta(eps, 2 * math.sqrt(steps) / sigma)
    assert 0 < exact <= delta
    assert privacy.noise_multiplier_for(eps / 2, delta, steps) > sigma  # more privacy, more noise


@pytest.mark.parametrize(
    "make,name",
    [
        (lambda: privacy.dp_diff_mean(0.0, 1.0, 2, "data"), "clip_norm"),
        (lambda: privacy.dp_diff_mean(1.0, -1.0, 2, "data"), "noise_multiplier"),
        (lambda: privacy.dp_diff_mean(1.0, 1.0, 0, "data"), "refresh_every"),
        (lambda: privacy.dp_diff_mean(1.0, 1.0, 2, "data", diff_clip_norm=-1.0), "diff_clip_norm"),
        (lambda: privacy.noise_multiplier_for(1.0, 1.5, 10), "delta"),
        (lambda: privacy.noise_multiplier_for(0.0, 1e-5, 10), "epsilon"),
        (lambda: privacy.epsilon(1.0, 0, 1e-5), "steps"),
    ],
)
def test_bad_arguments_are_named(make, name):
    with pytest.raises((ValueError, TypeError), match=name):
        make()
