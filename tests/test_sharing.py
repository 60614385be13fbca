"""optdist.sharing: worker-independent leaves held once, per-worker leaves stacked, same results."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optdist
from optdist import compressors, sharing
from optdist.execution import leaf_axes

W = 4


def loss(p, x):
    return jnp.sum((x @ p["w"] + p["b"]) ** 2)


def setup(tx):
    params = {"w": jnp.linspace(-1.0, 1.0, 6).reshape(3, 2), "b": jnp.zeros(2)}
    data = jax.random.normal(jax.random.key(0), (W, 5, 3))

    def step(p, s, x):
        updates, s = tx.update(jax.grad(loss)(p, x), s, p)
        return optax.apply_updates(p, updates), s, loss(p, x)

    args = (*optdist.replicate((params, tx.init(params)), W), data)
    return step, args


def run_both(tx, steps=4):
    step, args = setup(tx)
    layout = sharing.shared_layout(step, *args, carry={0: 0, 1: 1})
    shared = optdist.simulate(step, "data", in_axes=layout.in_axes, out_axes=layout.out_axes)
    stacked = optdist.simulate(step, "data")
    p, s = sharing.compact(args[:2], layout.in_axes[:2])
    pr, sr = args[:2]
    for _ in range(steps):
        p, s, _ = shared(p, s, args[2])
        pr, sr, _ = stacked(pr, sr, args[2])
    return layout, sharing.expand((p, s), layout.in_axes[:2], W), (pr, sr)


def flags(axes, tree):
    return leaf_axes(axes, tree)


def assert_close(a, b):
    # Two different programs (one shared copy vs a stacked copy per worker): a few float32 ulps apart
    # (1.7e-6 relative on one entry at the suite's -O0).
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=1e-5, atol=1e-7)


def test_exact_mean_then_adam_holds_everything_once_and_matches_the_stacked_run():
    layout, got, want = run_both(optax.chain(optdist.mean_gradients("data"), optax.adam(1e-2)))
    assert set(flags(layout.in_axes[:2], want)) == {None}  # parameters and Adam moments: one copy
    assert layout.out_axes[2] == 0  # each worker's own loss stays stacked
    assert_close(got, want)


def test_error_feedback_residuals_stay_per_worker_the_rest_is_shared():
    tx = optax.chain(optdist.compressed_mean(compressors.top_k(0.5), "data", feedback="ef"), optax.sgd(0.1))
    layout, got, want = run_both(tx)
    assert flags(layout.in_axes[0], want[0]) == [None, None]
    state_axes = flags(layout.in_axes[1], want[1])
    assert 0 in state_axes and None in state_axes  # residuals per worker, counters / sgd state shared
    assert_close(got, want)
    residuals = [x for x, ax in zip(jax.tree_util.tree_leaves(got[1]), state_axes) if ax == 0]
    assert any(not np.allclose(r[0], r[1]) for r in residuals)  # they do differ across workers


def test_diverging_parameters_fall_back_to_per_worker():
    layout, got, want = run_both(optdist.local_sgd(optax.sgd(0.1), 3, "data"), steps=5)
    assert flags(layout.in_axes[0], want[0]) == [0, 0]
    np.testing.assert_array_equal(np.asarray(got[0]["w"]), np.asarray(want[0]["w"]))


def test_compact_expand_round_trip_and_workers_that_start_apart_stay_stacked():
    step, args = setup(optax.chain(optdist.mean_gradients("data"), optax.sgd(0.1)))
    params = jax.tree_util.tree_map(
        lambda x: x + jnp.arange(W, dtype=x.dtype).reshape(-1, *[1] * (x.ndim - 1)), args[0]
    )
    layout = sharing.shared_layout(step, params, args[1], args[2], carry={0: 0, 1: 1})
    assert flags(layout.in_axes[0], params) == [0, 0]
    tree = {"a": jnp.ones((W, 2)), "b": jnp.arange(W * 3.0).reshape(W, 3)}
    axes = {"a": None, "b": 0}
    np.testing.assert_array_equal(sharing.expand(sharing.compact(tree, axes), axes, W)["a"], tree["a"])


def test_bad_carry_is_named():
    step, args = setup(optax.chain(optdist.mean_gradients("data"), optax.sgd(0.1)))
    with pytest.raises(ValueError, match="carry"):
        sharing.shared_layout(step, *args, carry={0: 0, 1: 0})
    with pytest.raises(ValueError, match="carry: output 1"):
        sharing.shared_layout(step, *args, carry={1: 0})
