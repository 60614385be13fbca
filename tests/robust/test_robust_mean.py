"""robust_mean and attacks: equality to the aggregator on stacked flat updates, exact bytes,
three execution modes, attack vectors, and end-to-end robustness on least squares."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import optdist
from optdist.robust import aggregators as agg
from optdist.robust import attacks, robust_mean
from tests.helpers import assert_trees_close, linear_loss, linear_problem, make_train_step, run_in_three_modes

W = 8
ELEMS = 5 * 3 + 3  # linear_problem parameters


@pytest.fixture(scope="module")
def problem():
    return linear_problem(num_examples=64)


def per_worker_grads(params, data, n=W):
    return jax.vmap(jax.grad(linear_loss), in_axes=(None, 0))(params, optdist.shard_batch(data, n))


def test_equals_aggregator_on_stacked_flat_updates_and_counts_all_gather_bytes(problem):
    params, data = problem
    rule = agg.trimmed_mean(2)
    tx = robust_mean(rule, "data", pre_aggregation=agg.nnm(2))

    def step(params, state, batch):
        return tx.update(jax.grad(linear_loss)(params, batch), state, params)

    params_w, state_w = optdist.replicate((params, tx.init(params)), W)
    run = optdist.simulate(step, "data")
    out, state_w = run(params_w, state_w, optdist.shard_batch(data, W))
    out, state_w = run(params_w, state_w, optdist.shard_batch(data, W))
    grads = per_worker_grads(params, data)
    flat = jax.vmap(lambda g: ravel_pytree(g)[0])(grads)
    expected, _ = rule.aggregate(agg.nnm(2)(flat), None)
    unravel = ravel_pytree(params)[1]
    for w in range(W):
        assert_trees_close(optdist.unreplicate(out, w), unravel(expected), rtol=1e-5, atol=1e-6)
    # Two steps, each one all-gather of 18 float32: (n - 1) * 18 * 4 bytes.
    np.testing.assert_array_equal(optdist.bytes_sent(state_w), [2 * (W - 1) * ELEMS * 4] * W)


def test_three_execution_modes_agree_under_attack(problem):
    params, data = problem
    tx = optax.chain(
        optax.ema(0.9, debias=False),  # worker momentum (per-worker state)
        attacks.byzantine(attacks.alie(), num_byzantine=2, axis_name="data"),
        robust_mean(agg.centered_clip(tau=1.0, iters=2), "data", pre_aggregation=agg.nnm(2)),
        optax.sgd(0.05),
    )
    step = make_train_step(tx)
    init = optdist.replicate((params, tx.init(params)), W)
    batches = optdist.shard_batch(data, W)
    results = run_in_three_modes(step, init, batches, steps=3)
    for name, (p, s) in results.items():
        assert all(jax.tree_util.tree_leaves(optdist.is_replicated(p))), name
        # Only the honest protocol's all-gather is counted (ALIE's omniscient gather is not).
        np.testing.assert_array_equal(optdist.bytes_sent(s), [3 * (W - 1) * ELEMS * 4] * W)
    for p, s in results.values():
        assert_trees_close(p, results["simulate"][0], rtol=1e-5, atol=1e-6)
        center = s[2].aggregator.center
        assert_trees_close(center, results["simulate"][1][2].aggregator.center, rtol=1e-5, atol=1e-6)


def test_single_worker_outside_any_mapping(problem):
    params, data = problem
    tx = robust_mean(agg.median(), None)
    grads = jax.grad(linear_loss)(params, data)
    out, state = jax.jit(tx.update)(grads, tx.init(params), params)
    assert_trees_close(out, grads, rtol=0, atol=0)
    assert int(optdist.bytes_sent(state)) == 0


# ----------------------------------------------------------------------------- attacks


@pytest.fixture(scope="module")
def updates():
    rng = np.random.default_rng(0)
    return {"a": jnp.asarray(rng.normal(size=(W, 3)), jnp.float32), "b": jnp.ones((W, 2, 2))}


def attacked(attack, updates, steps=1, **kwargs):
    tx = attacks.byzantine(attack, axis_name="data", **kwargs)
    template = jax.tree_util.tree_map(lambda u: u[0], updates)
    state = optdist.replicate(tx.init(template), W)
    run = optdist.simulate(lambda u, s: tx.update(u, s))
    outs = []
    for _ in range(steps):
        out, state = run(updates, state)
        outs.append(np.asarray(jax.vmap(lambda u: ravel_pytree(u)[0])(out)))
    assert int(np.max(optdist.bytes_sent(state))) == 0
    return outs if steps > 1 else outs[0]


def test_attack_vectors(updates):
    flat = np.asarray(jax.vmap(lambda u: ravel_pytree(u)[0])(updates), np.float64)
    honest = flat[2:]
    mu, sigma = honest.mean(0), honest.std(0)
    cases = {
        "sign_flip": (attacks.sign_flip(2.0), -2.0 * flat[:2]),
        "ipm": (attacks.ipm(0.5), np.broadcast_to(-0.5 * mu, (2, flat.shape[1]))),
        "alie": (attacks.alie(1.5), np.broadcast_to(mu - 1.5 * sigma, (2, flat.shape[1]))),
        "mimic": (attacks.mimic(), np.broadcast_to(flat[2], (2, flat.shape[1]))),
    }
    for name, (attack, expected) in cases.items():
        out = attacked(attack, updates, num_byzantine=2)
        np.testing.assert_allclose(out[:2], expected, rtol=1e-5, atol=1e-6, err_msg=name)
        np.testing.assert_array_equal(out[2:], flat[2:].astype(np.float32), err_msg=name)
    out = attacked(attacks.nan_inf(), updates, mask=[False] * 5 + [True] * 3)
    assert np.isnan(out[5:]).all() and np.isfinite(out[:5]).all()
    out = attacked(attacks.nan_inf(float("inf")), updates, num_byzantine=1)
    assert np.isposinf(out[0]).all()


def test_alie_default_z_follows_the_paper():
    # n = 10, f = 2: s = floor(10/2 + 1) - 2 = 4, z = Phi^-1((10 - 4)/10) = Phi^-1(0.6).
    assert attacks.alie_z(10, 2) == pytest.approx(0.2533471, abs=1e-6)
    assert attacks.alie_z(50, 12) == pytest.approx(0.5828415, abs=1e-6)  # s = 14: Phi^-1(0.72)


def test_gaussian_noise_differs_across_workers_and_steps(updates):
    first, second = attacked(attacks.gaussian(3.0), updates, steps=2, num_byzantine=4)
    noise = first[:4]
    assert len({tuple(r) for r in noise}) == 4
    assert not np.allclose(first[:4], second[:4])
    assert 2.0 < noise.std() < 4.0


def test_label_flip():
    y = jnp.array([0, 3, 9])
    np.testing.assert_array_equal(attacks.label_flip(y, 10), [9, 6, 0])


@pytest.mark.parametrize(
    ("aggregator", "robust"),
    [(agg.mean(), False), (agg.median(), True), (agg.trimmed_mean(2), True), (agg.krum(2), True)],
)
def test_sign_flip_breaks_the_mean_but_not_robust_rules(problem, aggregator, robust):
    params, data = problem
    tx = optax.chain(
        attacks.byzantine(attacks.sign_flip(10.0), num_byzantine=2, axis_name="data"),
        robust_mean(aggregator, "data"),
        optax.sgd(0.05),
    )
    step = optdist.simulate(make_train_step(tx))
    p, s = optdist.replicate((params, tx.init(params)), W)
    batches = optdist.shard_batch(data, W)
    for _ in range(30):
        p, s = step(p, s, batches)
    loss0 = float(linear_loss(params, data))
    loss = float(linear_loss(optdist.unreplicate(p), data))
    if robust:
        assert loss < 0.5 * loss0
    else:
        assert not loss < loss0  # pushed uphill (or to inf/nan)


def test_bad_inputs(problem, updates):
    params, _ = problem
    with pytest.raises(TypeError, match="aggregator"):
        robust_mean(lambda x, s: x, "data")
    with pytest.raises(TypeError, match="pre_aggregation"):
        robust_mean(agg.median(), "data", pre_aggregation=3)
    with pytest.raises(ValueError, match="exactly one of num_byzantine"):
        attacks.byzantine(attacks.sign_flip())
    with pytest.raises(ValueError, match="exactly one of num_byzantine"):
        attacks.byzantine(attacks.sign_flip(), num_byzantine=1, mask=[True])
    with pytest.raises(ValueError, match="mask must have one entry per worker"):
        attacked(attacks.sign_flip(), updates, mask=[True, False])
    with pytest.raises(ValueError, match="num_byzantine=9 exceeds"):
        attacked(attacks.sign_flip(), updates, num_byzantine=9)
    with pytest.raises(ValueError, match="at least one honest"):
        attacked(attacks.alie(), updates, num_byzantine=8)
    with pytest.raises(ValueError, match="value must be NaN"):
        attacks.nan_inf(1.0)
    with pytest.raises(ValueError, match="eps"):
        attacks.ipm(0.0)
    # The aggregator's limit surfaces when the worker count is known (trace time).
    tx = robust_mean(agg.krum(3), "data")
    step = optdist.simulate(lambda g, s: tx.update(g, s))
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    with pytest.raises(ValueError, match=r"n > 2f \+ 2"):
        step(*optdist.replicate((grads, tx.init(params)), W))


# ----------------------------------------------------------------------------- MoNNA (decentralized)


def test_monna_sgd_matches_the_paper_step_by_step(problem):
    params, data = problem
    lr, beta, f = 0.1, 0.8, 2
    tx = optdist.robust.monna_sgd(lr, f=f, axis_name="data", beta=beta)
    rng = np.random.default_rng(1)
    # Models differ per worker (decentralized); worker 7 is Byzantine and sends NaN gradients.
    params_w = jax.tree_util.tree_map(
        lambda p: jnp.asarray(p + 0.3 * rng.normal(size=(W, *p.shape)), jnp.float32), params
    )
    poison = jnp.arange(W) == W - 1

    def step(params, state, batch, poison):
        grads = jax.grad(linear_loss)(params, batch)
        grads = jax.tree_util.tree_map(lambda g: jnp.where(poison, jnp.nan, g), grads)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    run = optdist.simulate(step)
    state_w = jax.vmap(tx.init)(params_w)
    batches = optdist.shard_batch(data, W)
    flat = lambda t: np.asarray(jax.vmap(lambda u: ravel_pytree(u)[0])(t), np.float64)
    theta, m = flat(params_w), np.zeros((W, ELEMS))
    for _ in range(2):
        grads = flat(jax.vmap(jax.grad(linear_loss))(jax.tree_util.tree_map(jnp.asarray, params_w), batches))
        grads[W - 1] = np.nan
        m = beta * m + (1 - beta) * grads
        half = theta - lr * m
        ok = np.isfinite(half).all(axis=1)
        new = np.empty_like(theta)
        for i in range(W - 1):
            dist = np.where(ok, np.sum((np.where(ok[:, None], half, 0) - half[i]) ** 2, axis=1), np.inf)
            new[i] = half[np.argsort(dist, kind="stable")[: W - f]].mean(axis=0)
        params_w, state_w = run(params_w, state_w, batches, poison)
        got = flat(params_w)
        np.testing.assert_allclose(got[: W - 1], new[: W - 1], rtol=1e-5, atol=1e-5)
        theta = got
    assert np.isfinite(flat(params_w)[: W - 1]).all()
    np.testing.assert_array_equal(optdist.bytes_sent(state_w), [2 * (W - 1) * ELEMS * 4] * W)
    with pytest.raises(ValueError, match="learning_rate"):
        optdist.robust.monna_sgd(0.0, f=1, axis_name="data")
    with pytest.raises(ValueError, match="beta"):
        optdist.robust.monna_sgd(0.1, f=1, axis_name="data", beta=1.0)


def test_data_parallel_with_two_simulated_workers_per_device(problem):
    params, data = problem
    tx = optax.chain(
        attacks.byzantine(attacks.mimic(), num_byzantine=3, axis_name="data"),
        robust_mean(agg.multi_krum(3, 5), "data", pre_aggregation=agg.nnm(3)),
        optax.sgd(0.1),
    )
    step = make_train_step(tx)
    init = optdist.replicate((params, tx.init(params)), 16)
    batches = optdist.shard_batch(data, 16)
    sim = optdist.simulate(step)(*init, batches)
    dp = optdist.data_parallel(step, jax.make_mesh((8,), ("data",)), "data")(*init, batches)
    assert_trees_close(dp, sim, rtol=1e-5, atol=1e-6)
