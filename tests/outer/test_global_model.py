"""optdist.outer.global_params: the anchor of an outer loop, found anywhere in a state, against float64."""

import jax
import numpy as np
import optax
import pytest

import optdist
import optdist.outer as outer
from tests.outer._problem import flat, init_params, make_data, np_local_models, run
from tests.outer.test_streaming_diloco import np_streaming

N, H, LR = 4, 3, 0.1


@pytest.fixture(scope="module")
def data():
    return make_data(N, seed=7)


def test_local_sgd_global_model_is_the_last_rounds_mean_between_syncs(data):
    # One full round and two steps into the next: the global model stays the first round's mean
    # while every worker has moved on (and the workers differ: non-IID data).
    tx = optdist.skip_nonfinite(outer.local_sgd(optax.sgd(LR), H, "data"), "data")
    p, s, (trace, states) = run(tx, H + 2, data, record=True)
    first_round = np.mean(np_local_models(flat(init_params()), data, H, LR), axis=0)
    model = flat(outer.global_params(s))  # [workers, 1 + DIM]
    np.testing.assert_allclose(model, np.tile(first_round, (N, 1)), rtol=1e-5, atol=1e-6)
    assert not np.allclose(flat(p)[0], first_round, atol=1e-3)
    assert not np.allclose(flat(p)[0], flat(p)[1], atol=1e-3)
    # At the sync step itself the workers' parameters are the global model.
    at_sync = jax.tree_util.tree_map(lambda x: x[:, H - 1], trace)
    sync_state = jax.tree_util.tree_map(lambda x: x[:, H - 1], states)
    np.testing.assert_allclose(flat(at_sync), flat(outer.global_params(sync_state)), rtol=1e-6, atol=1e-7)


def test_streaming_global_model_matches_reference_theta(data):
    h, delay, alpha, steps = 4, 1, 0.5, 13
    tx = optax.chain(outer.streaming_diloco(0.05, h, "data", num_fragments=2, delay=delay, alpha=alpha))
    p, s, _ = run(tx, steps, data)
    local, theta = np_streaming(data, steps, h, [np.array([0]), np.array([1, 2, 3])], delay, alpha, 0.05)
    model = flat(outer.global_params(s))
    # float32 AdamW against float64: Adam's m / sqrt(v) amplifies rounding where a gradient is tiny.
    np.testing.assert_allclose(model, np.tile(theta, (N, 1)), rtol=2e-5, atol=1e-5)
    assert not np.allclose(model, flat(p), atol=1e-3)  # not the workers' parameters


def test_a_state_without_an_outer_loop_is_refused(data):
    tx = optax.chain(optdist.mean_gradients("data"), optax.sgd(0.1))
    with pytest.raises(ValueError, match="workers' parameters are the model"):
        outer.global_params(tx.init(init_params()))


def test_async_local_sgd_global_model_is_the_server_and_matches_diloco_mid_round(data):
    # Equal speeds and a buffer of N: the server is Nesterov DiLoCo's anchor (tests/outer/
    # test_async_local_sgd.py), also one step into the next round, where the workers have moved on.
    steps = H * 2 + 1
    tx = outer.async_local_sgd(optax.sgd(LR), H, speeds=(1,) * N, buffer_size=N)
    p, s, _ = run(tx, steps, data)
    ref = outer.outer_loop(optax.sgd(LR), optax.sgd(0.7, momentum=0.9, nesterov=True), H, "data")
    _, r, _ = run(ref, steps, data)
    np.testing.assert_allclose(
        flat(outer.global_params(s)), flat(outer.global_params(r)), rtol=1e-5, atol=1e-6
    )
    assert not np.allclose(flat(outer.global_params(s)), flat(p), atol=1e-3)
