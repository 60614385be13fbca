"""Execution helpers: simulated workers, shard_map with k workers per device, hierarchy."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optdist
from tests.helpers import assert_trees_close, linear_problem, make_train_step


def test_data_parallel_runs_two_simulated_workers_per_device():
    params, data = linear_problem(num_examples=64)
    tx = optax.chain(optdist.mean_gradients("data"), optax.adam(0.05))
    step = make_train_step(tx)
    init = optdist.replicate((params, tx.init(params)), 16)
    batches = optdist.shard_batch(data, 16)
    sim = optdist.simulate(step, "data")(*init, batches)
    dp = optdist.data_parallel(step, jax.make_mesh((8,), ("data",)), "data")(*init, batches)
    assert_trees_close(sim, dp, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(optdist.bytes_sent(sim[1]), optdist.bytes_sent(dp[1]))

    def who(x):
        return optdist.worker_index("data") * jnp.ones_like(x), optdist.num_workers("data") + 0 * x

    ids, n = optdist.data_parallel(who, jax.make_mesh((8,), ("data",)), "data")(jnp.zeros(16))
    np.testing.assert_array_equal(ids, np.arange(16))
    np.testing.assert_array_equal(n, 16)


def test_hierarchical_two_axis_chain_on_4x2_mesh():
    params, data = linear_problem(num_examples=64)
    tx = optax.chain(optdist.mean_gradients("ici"), optdist.mean_gradients("dcn"), optax.sgd(0.1))
    flat_tx = optax.chain(optdist.mean_gradients("data"), optax.sgd(0.1))
    init = optdist.replicate((params, tx.init(params)), 8)
    batches = optdist.shard_batch(data, 8)
    step = make_train_step(tx)
    sim = optdist.simulate(step, ("dcn", "ici"), axis_sizes=(4, 2))(*init, batches)
    mesh = jax.make_mesh((4, 2), ("dcn", "ici"))
    dp = optdist.data_parallel(step, mesh, ("dcn", "ici"))(*init, batches)
    flat = optdist.simulate(make_train_step(flat_tx))(
        *optdist.replicate((params, flat_tx.init(params)), 8), batches
    )
    # mean over ici then dcn is the mean over all 8 workers.
    assert_trees_close(sim[0], flat[0], rtol=1e-5, atol=1e-6)
    assert_trees_close(dp[0], flat[0], rtol=1e-5, atol=1e-6)
    # Ring all-reduce counted per array (w: 15 floats, b: 3), each padded to n equal chunks:
    # 2 (n - 1) ceil(E / n) * 4 bytes. (Counted as one 18-float buffer, ici was 2 * 1 * 9 * 4 = 72.)
    ring = lambda n: 2 * (n - 1) * (-(-15 // n) + -(-3 // n)) * 4
    assert ring(2) == 2 * 1 * (8 + 2) * 4 and ring(4) == 2 * 3 * (4 + 1) * 4
    np.testing.assert_array_equal(optdist.bytes_sent(sim[1], "ici"), [ring(2)] * 8)
    np.testing.assert_array_equal(optdist.bytes_sent(dp[1], "dcn"), [ring(4)] * 8)


def test_shard_batch_rejects_indivisible_batch():
    with pytest.raises(ValueError, match="multiple of the worker count"):
        optdist.shard_batch(jnp.zeros((10, 3)), 4)


def test_leading_axes_must_agree():
    step = optdist.simulate(lambda a, b: a + b)
    with pytest.raises(ValueError, match="same leading worker axis"):
        step(jnp.zeros((4, 2)), jnp.zeros((3, 2)))


def test_in_axes_none_broadcasts_shared_arguments():
    step = optdist.simulate(lambda x, scale: x * scale, in_axes=(0, None))
    out = step(jnp.arange(4.0), jnp.array(3.0))
    np.testing.assert_array_equal(out, 3 * np.arange(4.0))
    mesh = jax.make_mesh((4,), ("data",), devices=jax.devices()[:4])
    out = optdist.data_parallel(lambda x, s: x * s, mesh, in_axes=(0, None))(jnp.arange(8.0), jnp.array(2.0))
    np.testing.assert_array_equal(out, 2 * np.arange(8.0))


def test_data_parallel_rejects_bad_worker_count_and_axis():
    mesh = jax.make_mesh((8,), ("data",))
    with pytest.raises(ValueError, match="multiple of the device count"):
        optdist.data_parallel(lambda x: x, mesh)(jnp.zeros(12))
    with pytest.raises(ValueError, match="not among the mesh"):
        optdist.data_parallel(lambda x: x, mesh, "model")


def test_worker_specs_and_is_replicated():
    tree = {"a": jnp.stack([jnp.ones(3), jnp.ones(3)]), "b": jnp.arange(2.0)}
    specs = optdist.worker_specs(tree, "data")
    assert specs["a"] == jax.sharding.PartitionSpec("data")
    assert optdist.is_replicated(tree) == {"a": True, "b": False}


def test_all_gather_order_matches_worker_index_across_devices_and_simulated_workers():
    def gather(x):
        return optdist.Channel("data").all_gather(optdist.worker_index("data")) + 0 * x

    dp = optdist.data_parallel(gather, jax.make_mesh((8,), ("data",)), "data")(jnp.zeros(16))
    np.testing.assert_array_equal(dp, np.tile(np.arange(16), (16, 1)))
    two_axis = optdist.simulate(
        lambda x: optdist.Channel(("a", "b")).all_gather(optdist.worker_index(("a", "b"))) + 0 * x,
        ("a", "b"),
        axis_sizes=(4, 4),
    )(jnp.zeros(16))
    np.testing.assert_array_equal(two_axis, np.tile(np.arange(16), (16, 1)))
