"""mean_gradients: exact mean, byte counts, and the three execution modes agree."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optdist
from tests.helpers import assert_trees_close, linear_loss, linear_problem, make_train_step, run_in_three_modes

NUM_WORKERS = 8


@pytest.fixture(scope="module")
def problem():
    params, data = linear_problem(num_examples=64)
    return params, data


@pytest.mark.parametrize("mode", ["simulate", "data_parallel", "pmap"])
def test_mean_equals_full_batch_gradient(problem, mode):
    params, data = problem
    tx = optdist.mean_gradients("data")

    def grad_step(params, state, batch):
        grads = jax.grad(linear_loss)(params, batch)
        return tx.update(grads, state, params)

    params_w, state_w = optdist.replicate((params, tx.init(params)), NUM_WORKERS)
    batches = optdist.shard_batch(data, NUM_WORKERS)
    if mode == "simulate":
        run = optdist.simulate(grad_step, "data")
    elif mode == "data_parallel":
        run = optdist.data_parallel(grad_step, jax.make_mesh((8,), ("data",)), "data")
    else:
        run = jax.pmap(grad_step, axis_name="data")
    mean_grads, state_w = run(params_w, state_w, batches)
    full = jax.grad(linear_loss)(params, data)
    for w in range(NUM_WORKERS):
        assert_trees_close(optdist.unreplicate(mean_grads, w), full, rtol=1e-5, atol=1e-6)
    elems = 5 * 3 + 3
    np.testing.assert_array_equal(optdist.bytes_sent(state_w), [2 * 7 * -(-elems // 8) * 4] * NUM_WORKERS)


@pytest.mark.parametrize("n", [1, 2, 8])
def test_byte_count_matches_ring_formula(problem, n):
    params, data = problem
    tx = optax.chain(optdist.mean_gradients("data"), optax.sgd(0.1))
    params_w, state_w = optdist.replicate((params, tx.init(params)), n)
    step = optdist.simulate(make_train_step(tx))
    for _ in range(3):
        params_w, state_w = step(params_w, state_w, optdist.shard_batch(data, n))
    elems = 5 * 3 + 3  # small leaves: packed into one float32 buffer
    expected = 3 * 2 * (n - 1) * -(-elems // n) * 4
    np.testing.assert_array_equal(optdist.bytes_sent(state_w), [expected] * n)
    if n == 8:  # divisible case: exactly 2 (n-1)/n B per step
        assert expected == 3 * 2 * (n - 1) * (elems * 4 + 6 * 4) // n


def test_three_modes_agree_after_several_adam_steps(problem):
    params, data = problem
    tx = optax.chain(optdist.mean_gradients("data"), optax.adam(0.05))
    step = make_train_step(tx)
    init = optdist.replicate((params, tx.init(params)), NUM_WORKERS)
    batches = optdist.shard_batch(data, NUM_WORKERS)
    results = run_in_three_modes(step, init, batches, steps=5)
    # Single-worker full-batch reference: the same optimizer on the full gradient.
    ref_tx = optax.adam(0.05)
    p_ref, s_ref = params, ref_tx.init(params)
    for _ in range(5):
        u, s_ref = ref_tx.update(jax.grad(linear_loss)(p_ref, data), s_ref, p_ref)
        p_ref = optax.apply_updates(p_ref, u)
    for name, (p, _) in results.items():
        assert_trees_close(p, results["simulate"][0], rtol=1e-5, atol=1e-5)
        assert_trees_close(optdist.unreplicate(p, 3), p_ref, rtol=1e-4, atol=1e-5)
        assert all(jax.tree_util.tree_leaves(optdist.is_replicated(p))), name


def test_single_worker_outside_any_mapping(problem):
    params, data = problem
    tx = optax.chain(optdist.mean_gradients(None), optax.sgd(0.1))
    state = tx.init(params)
    grads = jax.grad(linear_loss)(params, data)
    updates, state = jax.jit(tx.update)(grads, state, params)
    assert_trees_close(updates, jax.tree_util.tree_map(lambda g: -0.1 * g, grads))
    assert int(optdist.bytes_sent(state)) == 0


def test_unbound_axis_name_is_named(problem):
    params, data = problem
    tx = optdist.mean_gradients("workers")
    grads = jax.grad(linear_loss)(params, data)
    with pytest.raises(optdist.UnboundAxisError, match="axis_name='workers' is not bound"):
        jax.jit(tx.update)(grads, tx.init(params), params)
    # Bound under a different name: still named.
    step = optdist.simulate(lambda g, s: tx.update(g, s), "data")
    with pytest.raises(optdist.UnboundAxisError, match="workers"):
        step(*optdist.replicate((grads, tx.init(params)), 2))


def test_mismatched_trees_are_named(problem):
    params, data = problem
    tx = optdist.mean_gradients(None)
    grads = jax.grad(linear_loss)(params, data)
    with pytest.raises(ValueError, match="does not match params"):
        tx.update({"w": grads["w"]}, tx.init(params), params)
    with pytest.raises(ValueError, match="shapes of the parameters"):
        tx.update({"w": grads["w"][:2], "b": grads["b"]}, tx.init(params), params)


def test_bad_axis_name_type():
    with pytest.raises(TypeError, match="axis_name"):
        optdist.mean_gradients(3)
    with pytest.raises(ValueError, match="twice"):
        optdist.mean_gradients(("a", "a"))


def test_nonfinite_on_one_worker_skips_the_step_on_every_worker(problem):
    params, data = problem
    # optax.apply_if_finite checks each worker's input alone: the healthy workers
    # then apply the NaN mean. skip_nonfinite agrees across workers instead.
    naive = optax.apply_if_finite(optax.chain(optdist.mean_gradients("data"), optax.adam(0.1)), 3)
    safe = optdist.skip_nonfinite(
        optax.chain(optdist.mean_gradients("data"), optax.adam(0.1)), axis_name="data"
    )

    def run(tx):
        def step(params, state, batch, poison):
            grads = jax.grad(linear_loss)(params, batch)
            grads = jax.tree_util.tree_map(lambda g: jnp.where(poison, jnp.nan, g), grads)
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        params_w, state_w = optdist.replicate((params, tx.init(params)), 4)
        poison = jnp.array([False, False, True, False])
        return (
            params_w,
            state_w,
            optdist.simulate(step)(params_w, state_w, optdist.shard_batch(data, 4), poison),
        )

    p0, _, (p1, _) = run(naive)
    assert np.isnan(np.asarray(p1["w"])[0]).all()  # the failure mode this guards against
    p0, s0, (p1, s1) = run(safe)
    assert_trees_close(p1, p0, rtol=0, atol=0)
    np.testing.assert_array_equal(s1.skipped, [1, 1, 1, 1])
    inner_old, inner_new = s0.inner_state[1], s1.inner_state[1]
    assert_trees_close(inner_new, inner_old, rtol=0, atol=0)  # adam moments untouched
    # The mean was really sent: its bytes stay counted; plus the 4-byte flag all-reduce.
    expected = 2 * 3 * -(-18 // 4) * 4 + 2 * 3 * 1 * 4
    np.testing.assert_array_equal(optdist.bytes_sent(s1), [expected] * 4)
