"""seeded_spsa on a tree with zero-element leaves: they pass through, the rest follows the documented keys."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optdist
from optdist.zeroth_order import seeded_spsa
from tests.helpers import linear_loss, linear_problem

N = 4


def loss64(params, batch):
    x, y = batch[:, :-3], batch[:, -3:]
    return np.mean(np.sum((x @ params["w"] + params["b"] - y) ** 2, axis=-1))


def test_zero_element_leaves_pass_through_and_keep_the_documented_directions():
    params, data = linear_problem(num_examples=16)
    params = {**params, "e": jnp.zeros((0, 3))}  # leaf order: b, e, w
    batches = optdist.shard_batch(data, N)
    eps, seed = 0.1, 5
    tx = optax.chain(
        seeded_spsa("data", perturbation_scale=eps, payload="float32", seed=seed), optax.sgd(1.0)
    )

    def step(params, state, batch):
        updates, state = tx.update(None, state, params, loss_fn=lambda p: linear_loss(p, batch))
        return updates, state

    updates, state = optdist.simulate(step, "data")(*optdist.replicate((params, tx.init(params)), N), batches)
    assert updates["e"].shape == (N, 0, 3)
    # float64 reference: z_m leaf l from fold_in(fold_in(fold_in(key(seed), 0), m), l), l counting the
    # empty leaf (index 1), so b and w keep the keys the documented scheme gives them.
    leaves, treedef = jax.tree_util.tree_flatten(params)
    theta = [np.asarray(x, np.float64) for x in leaves]
    estimate = [np.zeros_like(t) for t in theta]
    for m in range(N):
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 0), m)
        z = [
            np.asarray(jax.random.normal(jax.random.fold_in(key, i), x.shape), np.float64)
            for i, x in enumerate(leaves)
        ]
        batch = np.asarray(batches[m], np.float64)
        plus = jax.tree_util.tree_unflatten(treedef, [t + eps * d for t, d in zip(theta, z)])
        minus = jax.tree_util.tree_unflatten(treedef, [t - eps * d for t, d in zip(theta, z)])
        p = (loss64(plus, batch) - loss64(minus, batch)) / (2 * eps)
        estimate = [g + p * d / N for g, d in zip(estimate, z)]
    expected = jax.tree_util.tree_unflatten(treedef, estimate)
    for k in ("b", "w"):
        for w in range(N):  # sgd(1.0): the update is minus the estimate, identical on every worker
            np.testing.assert_allclose(np.asarray(updates[k][w]), -expected[k], rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(optdist.bytes_sent(state), [(N - 1) * 4] * N)
