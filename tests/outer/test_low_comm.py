"""SparseLoCo and MuLoCo: float64 references of the published updates on a small problem."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optdist
import optdist.outer as outer
from tests.outer._problem import flat, init_params, make_data, np_grad, run
from tests.outer.test_references import np_adamw_step

N = 4


@pytest.fixture(scope="module")
def data():
    return make_data(N, seed=7)


def np_uniform2(p, s):
    """Nearest level of {-s, -s/3, s/3, s}."""
    levels = np.array([-1.0, -1 / 3, 1 / 3, 1.0]) * s
    return levels[np.abs(p[..., None] - levels).argmin(-1)]


def np_sparseloco(data, rounds, h, lr, density_k, beta, alpha):
    """arXiv:2508.15706: e <- βe + Δ_r; Δ̂_r = Q(TopK(e)); e <- e - Δ̂_r; θ <- θ - α mean Δ̂_r.

    Leaf b (a scalar) is sent exactly (it is not compressed); leaf w (3 entries) is one chunk.
    """
    n = data.shape[0]
    theta = flat(init_params())
    states = [{"t": 0, "m": np.zeros_like(theta), "v": np.zeros_like(theta)} for _ in range(n)]
    err = np.zeros((n, 3))
    for _ in range(rounds):
        local = np.tile(theta, (n, 1))
        for i in range(n):
            for _ in range(h):
                local[i] = local[i] + np_adamw_step(local[i], np_grad(local[i], data[i]), states[i], lr)
        deltas = theta - local
        p = beta * err + deltas[:, 1:]
        sent = np.zeros_like(p)
        for i in range(n):
            keep = np.argsort(-np.abs(p[i]), kind="stable")[:density_k]
            sent[i, keep] = np_uniform2(p[i, keep], np.abs(p[i, keep]).max())
        err = p - sent
        theta = theta - alpha * np.concatenate([[deltas[:, 0].mean()], sent.mean(0)])
    return theta, err


def test_sparseloco_matches_reference(data):
    h, rounds, lr, beta, alpha = 3, 4, 0.05, 0.9, 0.8
    tx = outer.sparseloco(lr, h, "data", density=0.5, error_decay=beta, outer_lr=alpha)
    p, s, _ = run(tx, h * rounds, data)
    theta, err = np_sparseloco(data, rounds, h, lr, 2, beta, alpha)
    np.testing.assert_allclose(flat(s.anchor)[0], theta, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(flat(p)[0], theta, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(np.asarray(s.aggregator_state.error["w"]), err, rtol=2e-4, atol=2e-6)
    assert np.abs(err).max() > 0  # the residual carries what was not sent
    # Bytes per sync: w's payload (2-bit values: 1 byte, 2-bit indices: 1 byte, scale: 4) gathered,
    # plus b exactly (one 4-byte all-reduce).
    per_sync = (N - 1) * (1 + 1 + 4) + 2 * (N - 1) * 1 * 4
    np.testing.assert_array_equal(optdist.bytes_sent(s), [rounds * per_sync] * N)


def test_muloco_is_muon_inside_diloco_with_two_bit_error_feedback(data):
    """MuLoCo = outer_loop(optax.contrib.muon, Nesterov, compressed(quantize(2), "ef")): same numbers."""
    h, rounds, lr = 3, 2, 0.02
    tx = outer.muloco(lr, h, "data", chunk_size=64)
    agg = optdist.aggregation.compressed(optdist.compressors.quantize(2, chunk_size=64), feedback="ef")
    ref = optdist.outer_loop(
        optax.contrib.muon(lr), optax.sgd(0.7, momentum=0.9, nesterov=True), h, "data", aggregator=agg
    )
    p, s, _ = run(tx, h * rounds, data)
    q, r, _ = run(ref, h * rounds, data)
    np.testing.assert_array_equal(flat(p), flat(q))
    np.testing.assert_array_equal(optdist.bytes_sent(s), optdist.bytes_sent(r))
    assert np.abs(np.asarray(s.aggregator_state.error["w"])).max() > 0


def _matrix_run(tx, steps=4, n=2):
    """A few steps of a two-matrix least squares under simulated workers; the final parameters."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(n, 8, 3)), jnp.float32)
    params = {"W": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32), "v": jnp.ones((4, 2), jnp.float32)}

    def step(p, s, xb):
        g = jax.grad(lambda p: jnp.mean((xb @ p["W"] @ p["v"] - 1.0) ** 2))(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    sim = optdist.simulate(step, "data")
    p, s = optdist.replicate((params, tx.init(params)), n)
    for _ in range(steps):
        p, s = sim(p, s, x)
    return np.concatenate([np.asarray(leaf).ravel() for leaf in jax.tree_util.tree_leaves(p)])


def test_muloco_forwards_the_adamw_rate_and_the_muon_leaves():
    """Muon on ``W`` only, AdamW at its own rate on ``v``: the same numbers as optax's muon built with
    those arguments inside the same outer loop, and not those of the default split (Muon on both)."""
    lr, adam_lr, h = 0.02, 0.005, 2
    dims = {"W": optax.contrib.MuonDimensionNumbers(), "v": None}
    tx = outer.muloco(lr, h, "data", chunk_size=64, adam_learning_rate=adam_lr, muon_dimension_numbers=dims)
    agg = optdist.aggregation.compressed(optdist.compressors.quantize(2, chunk_size=64), feedback="ef")
    inner = optax.contrib.muon(lr, adam_learning_rate=adam_lr, muon_weight_dimension_numbers=dims)
    ref = optdist.outer_loop(inner, optax.sgd(0.7, momentum=0.9, nesterov=True), h, "data", aggregator=agg)
    ours = _matrix_run(tx)
    np.testing.assert_array_equal(ours, _matrix_run(ref))
    assert not np.allclose(ours, _matrix_run(outer.muloco(lr, h, "data", chunk_size=64)))


def test_muloco_with_another_sync_is_that_sync_inside_the_same_outer_loop():
    lr, h = 0.02, 2
    agg = optdist.aggregation.compressed(optdist.compressors.quantize(4, "e2m1", chunk_size=8))
    tx = outer.muloco(lr, h, "data", aggregator=agg)
    ref = optdist.outer_loop(
        optax.contrib.muon(lr), optax.sgd(0.7, momentum=0.9, nesterov=True), h, "data", aggregator=agg
    )
    ours = _matrix_run(tx)
    np.testing.assert_array_equal(ours, _matrix_run(ref))
    assert not np.allclose(ours, _matrix_run(outer.muloco(lr, h, "data", chunk_size=8)))


def test_low_comm_bad_inputs():
    with pytest.raises(TypeError, match="aggregator"):
        outer.sparseloco(0.1, 3, aggregator=None)
    with pytest.raises(ValueError, match="density"):
        outer.sparseloco(0.1, 3, density=1.5)
    with pytest.raises(ValueError, match="error_decay"):
        outer.sparseloco(0.1, 3, error_decay=-0.1)
    with pytest.raises(ValueError, match="bits"):
        outer.muloco(0.1, 3, bits=3)
    agg = optdist.aggregation.compressed(optdist.compressors.quantize(4, "e2m1"))
    with pytest.raises(ValueError, match="aggregator"):
        outer.muloco(0.1, 3, bits=4, aggregator=agg)
    with pytest.raises(ValueError, match="adam_learning_rate"):
        outer.muloco(0.1, 3, adam_learning_rate=-1.0)
