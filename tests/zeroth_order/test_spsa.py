"""seeded_spsa: float64 reference, replicated parameters, unbiasedness, int8 payload, modes, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optdist
from optdist.zeroth_order import seeded_spsa
from tests.helpers import assert_trees_close, linear_loss, linear_problem, run_in_three_modes

N = 8


def make_step(tx):
    def step(params, state, batch):
        updates, state = tx.update(None, state, params, loss_fn=lambda p: linear_loss(p, batch))
        return optax.apply_updates(params, updates), state

    return step


def direction(seed, t, m, params):
    """The documented key scheme: z_m at step t, leaf l from fold_in(fold_in(fold_in(key(seed), t), m), l)."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), t), m)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    z = [jax.random.normal(jax.random.fold_in(key, i), x.shape, jnp.float32) for i, x in enumerate(leaves)]
    return jax.tree_util.tree_unflatten(treedef, z)


def loss64(params, batch):
    batch = np.asarray(batch, np.float64)
    x, y = batch[:, :-3], batch[:, -3:]
    return np.mean(np.sum((x @ params["w"] + params["b"] - y) ** 2, axis=-1))


def reference_sgd(params, batches, steps, *, seed, eps, lr, num_directions):
    """Seeded SPSA + SGD in float64 NumPy, from the equations (only z comes from JAX's generator)."""
    theta = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), params)
    n, k = len(batches), num_directions
    for t in range(steps):
        g = jax.tree_util.tree_map(np.zeros_like, theta)
        for m in range(n * k):
            z = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), direction(seed, t, m, params))
            plus = jax.tree_util.tree_map(lambda a, b: a + eps * b, theta, z)
            minus = jax.tree_util.tree_map(lambda a, b: a - eps * b, theta, z)
            batch = batches[m // k]
            p = (loss64(plus, batch) - loss64(minus, batch)) / (2 * eps)
            g = jax.tree_util.tree_map(lambda a, b, p=p: a + p * b / (n * k), g, z)
        theta = jax.tree_util.tree_map(lambda a, b: a - lr * b, theta, g)
    return theta


@pytest.fixture(scope="module")
def problem():
    params, data = linear_problem(num_examples=64)
    return params, optdist.shard_batch(data, N)


@pytest.fixture(scope="module")
def int8_modes(problem):
    """4 steps of int8 seeded SPSA + SGD in the three execution modes (shared by several tests)."""
    params, batches = problem
    tx = optax.chain(seeded_spsa("data", clip=60.0, seed=3), optax.sgd(0.01))
    init = optdist.replicate((params, tx.init(params)), N)
    return run_in_three_modes(make_step(tx), init, batches, steps=4)


@pytest.mark.parametrize("num_directions", [1, 2])
def test_float32_payload_matches_float64_reference(problem, num_directions):
    params, batches = problem
    # eps = 0.1: the central difference is exact for this quadratic loss, and a larger eps keeps
    # float32 cancellation in l(theta + eps z) - l(theta - eps z) far below the tolerance.
    eps, lr, steps = 0.1, 0.01, 3
    tx = optax.chain(
        seeded_spsa("data", perturbation_scale=eps, payload="float32", seed=7, num_directions=num_directions),
        optax.sgd(lr),
    )
    params_w, state_w = optdist.replicate((params, tx.init(params)), N)
    run = optdist.simulate(make_step(tx), "data")
    for _ in range(steps):
        params_w, state_w = run(params_w, state_w, batches)
    ref = reference_sgd(
        params, np.asarray(batches), steps, seed=7, eps=eps, lr=lr, num_directions=num_directions
    )
    moved = jax.tree_util.tree_map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b), ref, params)
    assert min(float(np.abs(x).max()) for x in jax.tree_util.tree_leaves(moved)) > 0.05  # a real step
    for w in range(N):
        assert_trees_close(optdist.unreplicate(params_w, w), ref, rtol=1e-5, atol=1e-5)
    assert all(jax.tree_util.tree_leaves(optdist.is_replicated(params_w)))  # bit-identical
    np.testing.assert_array_equal(optdist.bytes_sent(state_w), [steps * 7 * 4 * num_directions] * N)


def test_parameters_stay_bit_identical_across_workers(int8_modes):
    for name, (params_w, state_w) in int8_modes.items():
        assert all(jax.tree_util.tree_leaves(optdist.is_replicated(params_w))), name
        assert all(jax.tree_util.tree_leaves(optdist.is_replicated(state_w))), name
        # Different batches per worker, so identical parameters come from the shared estimate.
        assert not np.allclose(np.asarray(params_w["w"])[0], linear_problem(64)[0]["w"])


def test_int8_bytes_are_one_per_worker_and_step(int8_modes):
    for name, (_, state_w) in int8_modes.items():
        np.testing.assert_array_equal(optdist.bytes_sent(state_w), [4 * (N - 1) * 1] * N, err_msg=name)


def test_three_execution_modes_agree(int8_modes):
    for name, (params_w, _) in int8_modes.items():
        assert_trees_close(params_w, int8_modes["simulate"][0], rtol=1e-5, atol=1e-6)
        assert int(np.asarray(int8_modes[name][1][0].count)[0]) == 4


def test_estimate_is_unbiased_for_a_quadratic_loss(problem):
    """E[g_hat] = mean_i grad l_i; per step Var(g_hat_k) = sum_i (|g_i|^2 + g_ik^2 + q) / n^2."""
    params, batches = problem
    steps, clip = 2000, 200.0
    tx = seeded_spsa("data", clip=clip, seed=11)  # int8: the quantized pipeline must stay unbiased

    def many(params, state, batch):
        def body(state, _):
            g, state = tx.update(None, state, params, loss_fn=lambda p: linear_loss(p, batch))
            return state, g

        _, gs = jax.lax.scan(body, state, None, length=steps)
        return jax.tree_util.tree_map(lambda x: x.mean(0), gs), jax.tree_util.tree_map(lambda x: x.var(0), gs)

    params_w, state_w = optdist.replicate((params, tx.init(params)), N)
    mean_w, var_w = optdist.simulate(many, "data")(params_w, state_w, batches)
    grads = [jax.grad(linear_loss)(params, b) for b in batches]  # per-worker exact gradients
    flat = np.stack([np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(g)]) for g in grads])
    flat = flat.astype(np.float64)
    assert clip > 6 * np.linalg.norm(flat, axis=1).max()  # p_i ~ N(0, |g_i|^2): (almost) never clipped
    true = flat.mean(0)
    q = (clip / 127) ** 2 / 4  # bound on the stochastic-rounding variance of one projection
    var_step = ((flat**2).sum(1)[:, None] + flat**2).sum(0) / N**2
    est = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(optdist.unreplicate(mean_w, 0))])
    tol = 5 * np.sqrt((var_step + q / N) / steps)
    np.testing.assert_array_less(np.abs(est - true), tol)
    # The spread is SPSA's (a d-fold variance), not an exact gradient's zero variance.
    var = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(optdist.unreplicate(var_w, 0))])
    np.testing.assert_allclose(var, var_step, rtol=0.3)


def test_int8_stochastic_rounding_within_one_level_and_unbiased():
    """One worker, l(theta) = a . theta at theta = 0: p = a . z exactly; p_hat is read off g_hat = p_hat z."""
    params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros((2,))}
    a_entry = 0.5 / np.sqrt(8)  # |a| = 0.5 over the 8 entries: p ~ N(0, 0.25), |p| > clip ~ 4.6%
    a = jax.tree_util.tree_map(lambda x: a_entry * jnp.ones_like(x), params)
    clip, steps, seed = 1.0, 4000, 5
    tx = seeded_spsa(None, perturbation_scale=1.0, clip=clip, seed=seed)
    loss = lambda p: sum(
        jnp.vdot(x, y) for x, y in zip(jax.tree_util.tree_leaves(p), jax.tree_util.tree_leaves(a))
    )

    @jax.jit
    def run(state):
        def body(state, _):
            g, state = tx.update(params, state, params, loss_fn=loss)
            return state, g

        state, gs = jax.lax.scan(body, state, None, length=steps)
        zs = jax.vmap(lambda t: direction(seed, t, 0, params))(jnp.arange(steps))
        return state, gs, zs

    state, gs, zs = run(tx.init(params))
    assert int(optdist.bytes_sent(state)) == 0  # one worker sends nothing
    flat = lambda t: np.concatenate(
        [np.asarray(x, np.float64).reshape(steps, -1) for x in jax.tree_util.tree_leaves(t)], 1
    )
    g, z, av = flat(gs), flat(zs), np.full(8, a_entry)
    p = z @ av
    p_hat = np.sum(g * z, 1) / np.sum(z * z, 1)
    np.testing.assert_allclose(g, p_hat[:, None] * z, rtol=1e-5, atol=1e-6)  # g_hat is parallel to z_0
    level = clip / 127
    np.testing.assert_allclose(p_hat / level, np.round(p_hat / level), atol=1e-3)  # on the int8 grid
    inside = np.abs(p) < clip
    assert 0.02 < 1 - inside.mean() < 0.1  # some projections are clipped
    np.testing.assert_array_less(np.abs(p_hat - p)[inside], level * (1 + 1e-4))
    np.testing.assert_allclose(p_hat[~inside], np.sign(p[~inside]) * clip, rtol=1e-5)
    # Nearest rounding would err by about -0.27 levels for fractions in [0.1, 0.45] and +0.27 for
    # [0.55, 0.9]; stochastic rounding is unbiased in every bin.
    frac = p / level - np.floor(p / level)
    err = (p_hat - p) / level
    for lo, hi in [(0.1, 0.45), (0.55, 0.9)]:
        sel = inside & (frac >= lo) & (frac < hi)
        assert sel.sum() > 500
        assert abs(err[sel].mean()) < 5 * err[sel].std() / np.sqrt(sel.sum())


def test_converges_on_planted_linear_regression():
    kx, kw = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, (64, 4))
    w_true = jax.random.normal(kw, (4, 3))
    data = jnp.concatenate([x, x @ w_true + 0.5], axis=1)  # targets exactly linear: optimum loss 0
    params = {"w": jnp.zeros((4, 3)), "b": jnp.zeros((3,))}
    tx = optax.chain(seeded_spsa("data", clip=30.0), optax.sgd(0.05))
    step = make_step(tx)

    def train(params, state, batch):
        def body(carry, _):
            return step(*carry, batch), None

        return jax.lax.scan(body, (params, state), None, length=300)[0]

    params_w, state_w = optdist.replicate((params, tx.init(params)), N)
    params_w, state_w = optdist.simulate(train, "data")(params_w, state_w, optdist.shard_batch(data, N))
    start, end = float(linear_loss(params, data)), float(linear_loss(optdist.unreplicate(params_w), data))
    assert start > 5.0
    assert end < 1e-3 * start, (start, end)
    np.testing.assert_array_equal(optdist.bytes_sent(state_w), [300 * 7] * N)


def test_nonfinite_loss_on_one_worker_reaches_every_worker_and_skip_nonfinite_skips(problem):
    params, batches = problem
    raw = seeded_spsa("data")
    safe = optdist.skip_nonfinite(optax.chain(seeded_spsa("data"), optax.sgd(0.1)), axis_name="data")

    def step(params, raw_state, safe_state, batch, bad):
        loss_fn = lambda p: jnp.where(bad, jnp.nan, linear_loss(p, batch))
        g, _ = raw.update(None, raw_state, params, loss_fn=loss_fn)
        updates, safe_state = safe.update(None, safe_state, params, loss_fn=loss_fn)
        return g, optax.apply_updates(params, updates), safe_state

    workers = 4
    init = optdist.replicate((params, raw.init(params), safe.init(params)), workers)
    bad = jnp.array([False, False, True, False])
    g, new_params, safe_state = optdist.simulate(step)(*init, batches[:workers], bad)
    assert np.isnan(np.asarray(g["w"])).all()  # the int8 NaN code reaches every worker
    assert_trees_close(new_params, init[0], rtol=0, atol=0)
    np.testing.assert_array_equal(safe_state.skipped, [1] * workers)


def test_errors_name_the_fix(problem):
    params, batches = problem
    tx = seeded_spsa(None)
    state = tx.init(params)
    with pytest.raises(ValueError, match="loss_fn"):
        tx.update(None, state, params)
    with pytest.raises(ValueError, match="needs the current parameters"):
        tx.update(None, state, loss_fn=lambda p: 0.0)
    with pytest.raises(ValueError, match="does not match params"):
        tx.update({"w": params["w"]}, state, params, loss_fn=lambda p: linear_loss(p, batches[0]))
    with pytest.raises(ValueError, match="scalar"):
        tx.update(None, state, params, loss_fn=lambda p: p["b"])
    for bad in (0.0, -1e-3, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="perturbation_scale"):
            seeded_spsa("data", perturbation_scale=bad)
    with pytest.raises(ValueError, match="payload"):
        seeded_spsa("data", payload="int4")
    with pytest.raises(ValueError, match="clip"):
        seeded_spsa("data", clip=0.0)
    with pytest.raises(ValueError, match="num_directions"):
        seeded_spsa("data", num_directions=0)
    with pytest.raises(TypeError, match="seed"):
        seeded_spsa("data", seed=1.5)
    with pytest.raises(TypeError, match="axis_name"):
        seeded_spsa(3)
    unbound = seeded_spsa("workers")
    loss_fn = lambda p: linear_loss(p, batches[0])
    with pytest.raises(optdist.UnboundAxisError, match="axis_name='workers' is not bound"):
        jax.jit(lambda s, p: unbound.update(None, s, p, loss_fn=loss_fn))(unbound.init(params), params)
