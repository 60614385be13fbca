"""skip_nonfinite: no silent desync without an axis (issue 18 item 1); when check_inputs=False is right."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optdist
from optdist import aggregators
from tests.helpers import linear_loss, linear_problem

W = 8


@pytest.fixture(scope="module")
def problem():
    return linear_problem(num_examples=32)


def test_communicating_chain_without_an_axis_is_refused_naming_the_axis(problem):
    params, _ = problem
    tx = optdist.skip_nonfinite(optax.chain(optdist.mean_gradients("data"), optax.sgd(0.1)))
    with pytest.raises(ValueError, match=r"communicates over 'data'.*axis_name='data'"):
        tx.init(params)
    # A state built without skip_nonfinite's init (e.g. restored) is refused at update time too.
    inner = optax.chain(optdist.mean_gradients("data"), optax.sgd(0.1))
    state = optdist.SkipNonFiniteState(
        inner.init(params), jnp.zeros((), jnp.int32), optdist.ByteCounter.zeros()
    )
    with pytest.raises(ValueError, match="axis_name='data'"):
        tx.update(params, state, params)
    hierarchical = optdist.skip_nonfinite(
        optax.chain(optdist.mean_gradients("ici"), optdist.mean_gradients("dcn"), optax.sgd(0.1))
    )
    with pytest.raises(ValueError, match=r"'dcn', 'ici'"):
        hierarchical.init(params)


def test_non_communicating_chain_without_an_axis_still_works(problem):
    params, data = problem
    tx = optdist.skip_nonfinite(optax.adam(0.1))
    grads = jax.grad(linear_loss)(params, data)
    bad = jax.tree_util.tree_map(lambda g: g.at[0].set(jnp.nan), grads)
    state = tx.init(params)
    _, state = tx.update(grads, state, params)
    updates, state = tx.update(bad, state, params)
    assert int(state.skipped) == 1
    assert all(np.all(np.asarray(u) == 0) for u in jax.tree_util.tree_leaves(updates))


def _train(tx, params, data, steps):
    poisoned = jnp.arange(W) == 3  # worker 3 sends NaN gradients on every step

    def step(params, state, batch, bad):
        grads = jax.grad(linear_loss)(params, batch)
        grads = jax.tree_util.tree_map(lambda g: jnp.where(bad, jnp.nan, g), grads)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    p, s = optdist.replicate((params, tx.init(params)), W)
    run = optdist.simulate(step, "data")
    batches = optdist.shard_batch(data, W)
    for _ in range(steps):
        p, s = run(p, s, batches, poisoned)
    return p, s


def test_check_inputs_false_lets_a_robust_aggregator_absorb_a_persistently_faulty_worker(problem):
    params, data = problem
    chain = lambda: optax.chain(optdist.robust_mean(aggregators.trimmed_mean(1), "data"), optax.sgd(0.1))
    steps = 6
    stopped, stopped_state = _train(optdist.skip_nonfinite(chain(), "data"), params, data, steps)
    np.testing.assert_array_equal(stopped_state.skipped, [steps] * W)  # the default stops training
    trained, state = _train(optdist.skip_nonfinite(chain(), "data", check_inputs=False), params, data, steps)
    np.testing.assert_array_equal(state.skipped, [0] * W)
    assert all(jax.tree_util.tree_leaves(optdist.is_replicated(trained)))
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(trained))
    loss0 = float(linear_loss(params, data))
    assert float(linear_loss(optdist.unreplicate(trained), data)) < 0.5 * loss0
    assert float(linear_loss(optdist.unreplicate(stopped), data)) == pytest.approx(loss0)
