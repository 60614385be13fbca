"""Small shared pieces for tests: a linear-regression problem and tree comparisons."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optdist


def linear_problem(num_examples=64, dim=5, seed=0):
    """Params and a batch [B, dim + 1] (features, target) for least squares."""
    key_w, key_x = jax.random.split(jax.random.key(seed))
    params = {"w": jax.random.normal(key_w, (dim, 3)), "b": jnp.zeros((3,))}
    data = jax.random.normal(key_x, (num_examples, dim + 3))
    return params, data


def linear_loss(params, batch):
    x, y = batch[:, :-3], batch[:, -3:]
    return jnp.mean(jnp.sum((x @ params["w"] + params["b"] - y) ** 2, axis=-1))


def make_train_step(tx, loss=linear_loss):
    def train_step(params, opt_state, batch):
        grads = jax.grad(loss)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return train_step


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    jax.tree_util.tree_map(
        lambda x, y: np.testing.assert_allclose(
            np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=rtol, atol=atol
        ),
        a,
        b,
    )


def run_in_three_modes(step, init, batches, steps=3):
    """Runs ``steps`` of ``step(params, state, batch)`` simulated, under shard_map and under pmap.

    ``init`` is the stacked ``(params, state)`` for 8 workers. Returns ``{mode: (params, state)}``.
    """
    runners = {
        "simulate": optdist.simulate(step, "data"),
        "data_parallel": optdist.data_parallel(step, jax.make_mesh((8,), ("data",)), "data"),
        "pmap": jax.pmap(step, axis_name="data"),
    }
    results = {}
    for name, run in runners.items():
        p, s = init
        for _ in range(steps):
            p, s = run(p, s, batches)
        results[name] = (p, s)
    return results
