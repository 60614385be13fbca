"""compressed_mean: error feedback convergence, state placement, modes, hierarchy, non-finite policy."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optdist
from optdist import compression
from optdist.comm.accounting import all_reduce_bytes
from optdist.feedback import compressed_mean, powersgd
from tests.helpers import assert_trees_close, linear_loss, linear_problem, make_train_step, run_in_three_modes

# Top-1 of 3 coordinates stalls here: each worker's largest coordinate is +-10
# (they cancel in the mean), so coordinate 2's gradient is never sent.
CENTERS = jnp.array([[10.0, 0, 0], [-10.0, 0, 0], [0, 10.0, 0], [0, -10.0, 0]]) + 1.0


def _quadratic(params, center):
    return 0.5 * jnp.sum((params["w"] - center) ** 2)


def _run_scan(tx, params, data, steps, loss):
    step = optdist.simulate(make_train_step(tx, loss), jit=False)

    @jax.jit
    def many(p, s):
        return jax.lax.scan(lambda c, _: (step(*c, data), None), (p, s), None, length=steps)[0]

    return many(*optdist.replicate((params, tx.init(params)), data.shape[0]))


@pytest.mark.parametrize("feedback", [None, "ef", "ef21", "econtrol"])
def test_top1_stalls_without_feedback_and_converges_with_it(feedback):
    tx = optax.chain(compressed_mean(compression.top_k(0.3), "data", feedback=feedback), optax.sgd(0.1))
    params, _ = _run_scan(tx, {"w": jnp.zeros(3)}, CENTERS, 300, _quadratic)
    w = np.asarray(params["w"])
    optimum = np.asarray(CENTERS.mean(0))
    assert np.all(w == w[:1])  # every worker applies the same update
    if feedback is None:
        assert w[0, 2] == 0.0  # never sent
        assert np.linalg.norm(w[0] - optimum) >= 1.0
    else:
        assert np.linalg.norm(w[0] - optimum) < 0.05


def _heterogeneous_grads(n=4, seed=0):
    key = jax.random.key(seed)
    return {
        "w": jax.random.normal(key, (n, 12, 10)) * jnp.arange(1, n + 1)[:, None, None],
        "b": jax.random.normal(jax.random.fold_in(key, 1), (n, 10)),
    }


def _grad_steps(tx, grads_w, steps):
    params = jax.tree_util.tree_map(lambda g: g[0] * 0, grads_w)
    step = optdist.simulate(lambda g, s: tx.update(g, s, params))
    state = optdist.replicate(tx.init(params), grads_w["w"].shape[0])
    outs = []
    for _ in range(steps):
        out, state = step(grads_w, state)
        outs.append(out)
    return outs, state


def test_state_placement_per_worker_and_shared():
    grads = _heterogeneous_grads()
    _, state = _grad_steps(compressed_mean(compression.top_k(0.1), "data", feedback="econtrol"), grads, 3)
    placed = optdist.is_replicated(state)
    assert not any(jax.tree_util.tree_leaves(placed.aggregator.error))
    assert not any(jax.tree_util.tree_leaves(placed.aggregator.local_h))
    assert all(jax.tree_util.tree_leaves(placed.aggregator.shared_h))
    assert placed.aggregator.count and all(jax.tree_util.tree_leaves(placed.bytes_sent))
    # h = mean_i h_i is maintained without communicating h_i.
    assert_trees_close(
        jax.tree_util.tree_map(lambda h: h[0], state.aggregator.shared_h),
        jax.tree_util.tree_map(lambda h: h.mean(0), state.aggregator.local_h),
        rtol=1e-5,
        atol=1e-6,
    )
    _, state = _grad_steps(powersgd(2, "data"), grads, 3)
    placed = optdist.is_replicated(state)
    assert all(jax.tree_util.tree_leaves(placed.aggregator.compressor))  # PowerSGD's Q
    assert not placed.aggregator.error["w"]


def test_replicated_residual_is_not_the_algorithm():
    grads = _heterogeneous_grads()
    tx = compressed_mean(compression.top_k(0.1), "data", feedback="ef")
    params = jax.tree_util.tree_map(lambda g: g[0] * 0, grads)
    step = optdist.simulate(lambda g, s: tx.update(g, s, params))
    state = optdist.replicate(tx.init(params), 4)
    for _ in range(2):
        _, state = step(grads, state)
    averaged = state._replace(
        aggregator=state.aggregator._replace(
            error=jax.tree_util.tree_map(
                lambda e: jnp.broadcast_to(e.mean(0), e.shape), state.aggregator.error
            )
        )
    )
    right, _ = step(grads, state)
    wrong, _ = step(grads, averaged)
    assert not np.allclose(right["w"], wrong["w"], atol=1e-3)


def test_three_execution_modes_agree_with_ef_and_stochastic_compressor():
    params, data = linear_problem(num_examples=64, dim=6)
    params = {"w": jnp.tile(params["w"], (1, 4)), "b": jnp.zeros((12,))}
    loss = lambda p, batch: jnp.mean((batch[:, :6] @ p["w"] + p["b"] - batch[:, 6:7]) ** 2)
    tx = optax.chain(compressed_mean(compression.qsgd(15, 16), "data", feedback="ef"), optax.sgd(0.1))
    step = make_train_step(tx, loss)
    init = optdist.replicate((params, tx.init(params)), 8)
    batches = optdist.shard_batch(data, 8)
    results = run_in_three_modes(step, init, batches, steps=3)
    for name, (p, s) in results.items():
        assert_trees_close(p, results["simulate"][0], rtol=1e-5, atol=1e-6)
        assert_trees_close(
            s[0].aggregator.error, results["simulate"][1][0].aggregator.error, rtol=1e-4, atol=1e-6
        )
        assert all(jax.tree_util.tree_leaves(optdist.is_replicated(p))), name
    # qsgd's rounding noise differs per worker: the residuals do too.
    assert not optdist.is_replicated(results["simulate"][1][0].aggregator.error)["w"]


def _hier_loss(params, batch):
    return jnp.mean((batch[:, :16] @ params["w"] + params["b"] - batch[:, 16:]) ** 2)


def test_hierarchical_chain_on_4x2_mesh():
    key = jax.random.key(3)
    params = {"w": jax.random.normal(key, (16, 12)) * 0.1, "b": jnp.zeros((12,))}
    data = jax.random.normal(jax.random.fold_in(key, 1), (64, 28))
    tx = optax.chain(
        optdist.mean_gradients("ici"),
        compressed_mean(compression.powersgd(2), "dcn", feedback="ef"),
        optax.sgd(0.05),
    )
    step = make_train_step(tx, _hier_loss)
    init = optdist.replicate((params, tx.init(params)), 8)
    batches = optdist.shard_batch(data, 8)
    mesh = jax.make_mesh((4, 2), ("dcn", "ici"))
    runs = {
        "mesh": optdist.data_parallel(step, mesh, ("dcn", "ici")),
        "sim": optdist.simulate(step, ("dcn", "ici"), axis_sizes=(4, 2)),
    }
    out = {}
    for name, run in runs.items():
        p, s = init
        for _ in range(3):
            p, s = run(p, s, batches)
        out[name] = (p, s)
    assert_trees_close(out["mesh"][0], out["sim"][0], rtol=1e-5, atol=1e-6)
    p, s = out["sim"]
    # Reference for one step by hand: exact mean over ici, PowerSGD over dcn.
    p_sh = jax.ShapeDtypeStruct((1, 16, 2), jnp.float32)
    q_sh = jax.ShapeDtypeStruct((1, 12, 2), jnp.float32)
    b_sh = jax.ShapeDtypeStruct((12,), jnp.float32)
    per_step = all_reduce_bytes([p_sh, b_sh], 4) + all_reduce_bytes([q_sh], 4)
    assert per_step == 2 * 3 * -(-(32 + 12) // 4) * 4 + 2 * 3 * 24 // 4 * 4
    np.testing.assert_array_equal(optdist.bytes_sent(s, "dcn"), [3 * per_step] * 8)
    np.testing.assert_array_equal(optdist.bytes_sent(s, "ici"), [3 * all_reduce_bytes(params, 2)] * 8)
    assert all(jax.tree_util.tree_leaves(optdist.is_replicated(p)))


def test_nonfinite_aggregate_keeps_every_state_and_skip_nonfinite_composes():
    grads = _heterogeneous_grads()
    tx = compressed_mean(compression.top_k(0.1), "data", feedback="ef21")
    params = jax.tree_util.tree_map(lambda g: g[0] * 0, grads)
    step = optdist.simulate(lambda g, s: tx.update(g, s, params))
    _, state = step(grads, optdist.replicate(tx.init(params), 4))
    poisoned = {"w": grads["w"].at[2, 0, 0].set(jnp.nan), "b": grads["b"]}
    out, new = step(poisoned, state)
    assert not np.isfinite(np.asarray(out["w"])).all()  # visible downstream
    for old_leaf, new_leaf in zip(
        jax.tree_util.tree_leaves((state.aggregator.local_h, state.aggregator.shared_h)),
        jax.tree_util.tree_leaves((new.aggregator.local_h, new.aggregator.shared_h)),
    ):
        np.testing.assert_array_equal(old_leaf, new_leaf)
    np.testing.assert_array_equal(new.aggregator.count, state.aggregator.count + 1)

    # Composition: skip_nonfinite around the chain skips the step on every worker.
    safe = optdist.skip_nonfinite(
        optax.chain(compressed_mean(compression.top_k(0.1), "data", feedback="ef"), optax.sgd(0.1)), "data"
    )

    def train(p, s, g):
        u, s = safe.update(g, s, p)
        return optax.apply_updates(p, u), s

    run = optdist.simulate(train)
    p0, s0 = optdist.replicate((params, safe.init(params)), 4)
    p1, s1 = run(p0, s0, grads)
    p2, s2 = run(p1, s1, poisoned)
    assert_trees_close(p2, p1, rtol=0, atol=0)
    np.testing.assert_array_equal(s2.skipped, [1] * 4)
    assert_trees_close(s2.inner_state[0].aggregator.error, s1.inner_state[0].aggregator.error, rtol=0, atol=0)
    assert np.isfinite(np.asarray(p2["w"])).all()


def test_hidden_nonfinite_entry_stays_out_of_the_residual():
    # Unscaled sign sends NaN as a -1 bit, so the aggregate is finite; the NaN
    # would enter this worker's EF residual, and must not.
    grads = _heterogeneous_grads()
    tx = compressed_mean(compression.sign(scaled=False), "data", feedback="ef")
    params = jax.tree_util.tree_map(lambda g: g[0] * 0, grads)
    step = optdist.simulate(lambda g, s: tx.update(g, s, params))
    _, state = step(grads, optdist.replicate(tx.init(params), 4))
    out, new = step({"w": grads["w"].at[1, 3, 4].set(jnp.nan), "b": grads["b"]}, state)
    assert np.isfinite(np.asarray(out["w"])).all()
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(new))
    assert new.aggregator.error["w"][1, 3, 4] == state.aggregator.error["w"][1, 3, 4]
    assert not np.array_equal(
        new.aggregator.error["w"][0], state.aggregator.error["w"][0]
    )  # the rest moved on


def test_bad_arguments_are_named():
    comp = compression.top_k(0.1)
    with pytest.raises(ValueError, match="feedback"):
        compressed_mean(comp, "data", feedback="ef22")
    with pytest.raises(ValueError, match="econtrol_eta"):
        compressed_mean(comp, "data", feedback="econtrol", econtrol_eta=2.0)
    with pytest.raises(TypeError, match="compressor"):
        compressed_mean(optax.sgd(0.1), "data")
    with pytest.raises(TypeError, match="axis_name"):
        compressed_mean(comp, 3)
    tx = compressed_mean(comp, None)
    ints = {"w": jnp.ones((4, 4), jnp.int32)}
    with pytest.raises(TypeError, match="floating"):
        tx.update(ints, tx.init(ints))
    with pytest.raises(ValueError, match="rank"):
        powersgd(0, "data")


def test_single_worker_none_axis_sends_nothing():
    params, data = linear_problem()
    tx = optax.chain(compressed_mean(compression.sign(), None, feedback="ef"), optax.sgd(0.1))
    state = tx.init(params)
    grads = jax.grad(linear_loss)(params, data)
    updates, state = jax.jit(tx.update)(grads, state, params)
    scale = jnp.mean(jnp.abs(grads["w"]))
    np.testing.assert_allclose(updates["w"], -0.1 * scale * jnp.where(grads["w"] >= 0, 1.0, -1.0), rtol=1e-6)
    assert int(optdist.bytes_sent(state)) == 0
