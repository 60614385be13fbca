"""FISH masks: the top-k empirical-Fisher mask, masked training against a float64 NumPy reference,
off-mask parameters bit-identical, and k values (no indices) on the wire."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optdist
from optdist.memory import fish_mask, fisher_diagonal, fisher_mask
from tests.helpers import linear_loss, linear_problem

WORKERS = 4


def np_grads(params, batch):
    """Least-squares gradients of tests.helpers.linear_loss, float64."""
    x, y = batch[:, :-3].astype(np.float64), batch[:, -3:].astype(np.float64)
    r = x @ params["w"] + params["b"] - y
    return {"w": 2.0 * x.T @ r / len(x), "b": 2.0 * r.sum(0) / len(x)}


def test_fisher_diagonal_and_mask_match_numpy():
    params, data = linear_problem(num_examples=12)
    batches = [data[i : i + 1] for i in range(12)]  # per-example empirical Fisher
    fisher = fisher_diagonal(jax.grad(linear_loss), params, batches)
    p64 = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), params)
    ref = {k: np.mean([np_grads(p64, np.asarray(b))[k] ** 2 for b in batches], axis=0) for k in params}
    for k in params:
        np.testing.assert_allclose(np.asarray(fisher[k]), ref[k], rtol=1e-4)
    mask = fisher_mask(fisher, 0.3)
    scores = np.concatenate([ref["b"].ravel(), ref["w"].ravel()])  # leaf order: b, w
    k = int(np.ceil(0.3 * scores.size))
    expected = np.zeros(scores.size, bool)
    expected[np.argsort(-scores)[:k]] = True
    got = np.concatenate([mask["b"].ravel(), mask["w"].ravel()])
    np.testing.assert_array_equal(got, expected)
    assert got.sum() == k == 6


@pytest.fixture(scope="module")
def trained():
    params, data = linear_problem(num_examples=8 * WORKERS)
    rng = np.random.default_rng(0)
    mask = {"w": rng.random((5, 3)) < 0.4, "b": np.array([True, False, False])}
    k = int(mask["w"].sum() + mask["b"].sum())
    tx = optax.chain(fish_mask(mask, "data"), optax.sgd(0.1))
    steps = 5

    def step(p, s, batch):
        u, s = tx.update(jax.grad(linear_loss)(p, batch), s, p)
        return optax.apply_updates(p, u), s

    batches = optdist.shard_batch(data, WORKERS)
    p_w, s_w = optdist.replicate((params, tx.init(params)), WORKERS)
    run = optdist.simulate(step, "data")
    for _ in range(steps):
        p_w, s_w = run(p_w, s_w, batches)
    return dict(params=params, batches=np.asarray(batches), mask=mask, k=k, steps=steps, p_w=p_w, s_w=s_w)


def test_masked_training_matches_float64_reference(trained):
    p = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), trained["params"])
    for _ in range(trained["steps"]):
        grads = [np_grads(p, b) for b in trained["batches"]]
        mean = {k: np.mean([g[k] for g in grads], axis=0) for k in p}
        p = {k: p[k] - 0.1 * np.where(trained["mask"][k], mean[k], 0.0) for k in p}
    for k in p:
        np.testing.assert_allclose(np.asarray(trained["p_w"][k][0], np.float64), p[k], rtol=1e-5, atol=1e-6)


def test_off_mask_parameters_are_bit_identical(trained):
    for k, m in trained["mask"].items():
        before = np.asarray(trained["params"][k])
        for w in range(WORKERS):
            after = np.asarray(trained["p_w"][k][w])
            np.testing.assert_array_equal(after[~m].view(np.uint32), before[~m].view(np.uint32))
            assert np.all(after[m] != before[m])  # the masked ones did move


def test_sends_k_values_per_step_and_no_indices(trained):
    n, k = WORKERS, trained["k"]
    per_step = 2 * (n - 1) * -(-k // n) * 4  # one float32 all-reduce of k values
    np.testing.assert_array_equal(optdist.bytes_sent(trained["s_w"]), [trained["steps"] * per_step] * n)


def test_off_mask_bit_identical_under_adam_and_mask_function():
    params, data = linear_problem(num_examples=4 * WORKERS)
    make_mask = lambda p: fisher_mask(
        jax.tree_util.tree_map(lambda x: np.arange(x.size).reshape(x.shape), p), 0.5
    )
    tx = optax.chain(fish_mask(make_mask, "data"), optax.adam(0.05))
    p_w, s_w = optdist.replicate((params, tx.init(params)), WORKERS)

    def step(p, s, batch):
        u, s = tx.update(jax.grad(linear_loss)(p, batch), s, p)
        return optax.apply_updates(p, u), s

    p_w, s_w = optdist.simulate(step, "data")(p_w, s_w, optdist.shard_batch(data, WORKERS))
    mask = make_mask(params)
    for key in params:
        np.testing.assert_array_equal(
            np.asarray(p_w[key][0])[~mask[key]], np.asarray(params[key])[~mask[key]]
        )


def test_bad_masks_are_named():
    params = {"w": jnp.zeros((2, 2))}
    with pytest.raises(TypeError, match="booleans"):
        fish_mask({"w": np.ones((2, 2))}, "data")
    with pytest.raises(ValueError, match="params"):
        fish_mask({"w": np.ones((3,), bool)}, "data").init(params)
    with pytest.raises(ValueError, match="density"):
        fisher_mask(params, 0.0)
    with pytest.raises(ValueError, match="batches"):
        fisher_diagonal(jax.grad(lambda p, b: 0.0), params, [])
