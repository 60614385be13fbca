"""Extragradient and the single-call family: float64 references, the bilinear game, bytes, modes, errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optdist
from optdist import minmax
from tests.helpers import assert_trees_close, run_in_three_modes
from tests.minmax._games import (
    bilinear_game,
    gap,
    jax_operator,
    operator,
    reference_extragradient,
    reference_single_call,
    saddle,
    stacked,
)

W = 4
SINGLE = ("past_extragradient", "optimistic_gradient", "reflected_gradient")
GAME, WORKER_GAMES = bilinear_game(workers=W)
BATCH = stacked(WORKER_GAMES)
Z0 = (jnp.zeros(3), jnp.zeros(3))
BOX = 0.6  # |z_j| <= BOX: the constrained solution sits on the box (the saddle has larger entries)


def box(tree):
    return jax.tree_util.tree_map(lambda v: jnp.clip(v, -BOX, BOX), tree)


def schedule(t):
    return 0.3 / (1.0 + 0.05 * t)


def mean_op(z):
    return operator(z, *GAME)


def make(kind, lr, axis="data", **kw):
    return getattr(minmax, kind)(lr, axis, **kw)


@functools.cache
def trajectory(kind, lr, steps, projected=False):
    """Per-step parameters [steps, ...] of ``kind`` on W simulated workers (worker 0's copy, float64)."""
    kw = dict(projection=box) if projected else {}
    if kind == "gda":
        tx = optax.chain(optdist.mean_gradients("data"), optax.sgd(lr))
    else:
        tx = make(kind, lr, **kw)

    def run(params, state, batch):
        def body(carry, _):
            p, s = carry
            op = lambda q: jax_operator(q, batch)  # noqa: E731
            extra = dict(operator_fn=op) if kind == "extragradient" else {}
            updates, s = tx.update(op(p), s, p, **extra)
            p = optax.apply_updates(p, updates)
            return (p, s), p

        (p, s), path = jax.lax.scan(body, (params, state), None, length=steps)
        return path, s

    params_w, state_w = optdist.replicate((Z0, tx.init(Z0)), W)
    path, state = optdist.simulate(run, "data")(params_w, state_w, BATCH)
    return tuple(np.asarray(x[0], np.float64) for x in path), state


@pytest.mark.parametrize("kind", SINGLE)
@pytest.mark.parametrize("projected", [False, True], ids=["free", "box"])
def test_single_call_matches_float64_reference(kind, projected):
    steps = 25
    path, _ = trajectory(kind, schedule, steps, projected)
    proj = (lambda v: np.clip(v, -BOX, BOX)) if projected else None
    want = reference_single_call(kind, (np.zeros(3), np.zeros(3)), mean_op, schedule, steps + 1, proj)
    # params after step t are X_{t+3/2}: the reference's half iterate t + 1.
    for i in range(2):
        np.testing.assert_allclose(path[i], np.stack([h[i] for h in want[1:]]), rtol=2e-5, atol=2e-6)


def test_extragradient_matches_float64_reference():
    steps = 25
    for projected in (False, True):
        path, _ = trajectory("extragradient", schedule, steps, projected)
        proj = (lambda v: np.clip(v, -BOX, BOX)) if projected else None
        want = reference_extragradient((np.zeros(3), np.zeros(3)), mean_op, schedule, steps, proj)
        for i in range(2):
            np.testing.assert_allclose(path[i], np.stack([z[i] for z, _ in want]), rtol=2e-5, atol=2e-6)


def test_variants_differ_under_a_projection_and_agree_without():
    free = [trajectory(k, 0.2, 25)[0] for k in SINGLE]
    boxed = [trajectory(k, schedule, 25, True)[0] for k in SINGLE]
    for other in free[1:]:
        np.testing.assert_allclose(other[0], free[0][0], rtol=1e-5, atol=1e-6)
    assert not np.allclose(boxed[0][0], boxed[1][0], atol=1e-4)  # PEG vs OG: where the projection acts
    assert not np.allclose(boxed[0][0], boxed[2][0], atol=1e-4)  # PEG vs RG: unprojected reflection


def test_optimistic_gradient_is_optax_ogda_after_the_first_step():
    """Same operator values in: optax's OGDA update from the second step on (optax starts with
    V_{-1/2} = V_{1/2}, we with V_{-1/2} = 0, so our first step is twice optax's)."""
    grads = [(jax.random.normal(jax.random.key(t), (3,)), jnp.full((3,), float(t))) for t in range(6)]
    ours, theirs = minmax.optimistic_gradient(0.2), optax.optimistic_gradient_descent(0.2)
    s_ours, s_theirs = ours.init(Z0), theirs.init(Z0)
    for t, g in enumerate(grads):
        u_ours, s_ours = ours.update(g, s_ours, Z0)
        u_theirs, s_theirs = theirs.update(g, s_theirs, Z0)
        scale = 2.0 if t == 0 else 1.0
        want = jax.tree_util.tree_map(lambda u, s=scale: s * u, u_theirs)
        assert_trees_close(u_ours, want, rtol=1e-5, atol=1e-6)


def _ergodic_gap(halves, upto):
    avg = tuple(h[:upto].mean(0) for h in halves)
    return gap(avg, *GAME)


@pytest.mark.parametrize("kind", ("extragradient", *SINGLE))
def test_bilinear_game_converges_with_ergodic_rate(kind):
    lr, steps = 0.2, 1000
    path, _ = trajectory(kind, lr, steps)
    if kind == "extragradient":  # the half iterates X_{t+1/2} = X_t - g V(X_t), X_0 first
        xs = [np.concatenate([np.zeros((1, 3)), p[:-1]]) for p in path]
        v = jax.vmap(lambda x, y: mean_op((x, y)))(*xs)
        halves = tuple(x - lr * np.asarray(vi) for x, vi in zip(xs, v))
    else:  # params are X_{t+3/2}; X_{1/2} = X_0
        halves = tuple(np.concatenate([np.zeros((1, 3)), p[:-1]]) for p in path)
    g100, g1000 = _ergodic_gap(halves, 100), _ergodic_gap(halves, 1000)
    assert 0 < g1000 < g100 / 8, (g100, g1000)  # O(1/t): ~10x smaller for 10x the steps
    assert 1000 * g1000 < 1.2 * 100 * g100  # t * gap(t) does not grow
    xs, ys = saddle(*GAME)
    last = np.sqrt(np.sum((path[0][-1] - xs) ** 2) + np.sum((path[1][-1] - ys) ** 2))
    assert last < 1e-2


def test_simultaneous_gda_diverges_on_the_bilinear_game():
    path, _ = trajectory("gda", 0.2, 1000)
    norms = np.sqrt(np.sum(path[0] ** 2, 1) + np.sum(path[1] ** 2, 1))
    assert norms[-1] > 1e6 * max(norms[0], 1.0)
    assert np.all(np.diff(norms[100:]) > 0)  # it spirals out, every step


def test_bytes_two_aggregations_for_extragradient_one_for_single_call():
    steps = 25
    _, mean_state = trajectory("gda", 0.2, steps)
    per_step = int(optdist.bytes_sent(mean_state)[0]) // steps
    assert per_step > 0
    _, state = trajectory("extragradient", schedule, steps)
    np.testing.assert_array_equal(optdist.bytes_sent(state), 2 * per_step * steps)
    for kind in SINGLE:
        _, state = trajectory(kind, schedule, steps, True)
        np.testing.assert_array_equal(optdist.bytes_sent(state), per_step * steps)


def test_extragradient_three_execution_modes_agree():
    tx = minmax.extragradient(0.2, "data")
    _, games = bilinear_game(workers=8, seed=1)
    batch = stacked(games)

    def step(params, state, batch):
        op = lambda q: jax_operator(q, batch)  # noqa: E731
        updates, state = tx.update(op(params), state, params, operator_fn=op)
        return optax.apply_updates(params, updates), state

    results = run_in_three_modes(step, optdist.replicate((Z0, tx.init(Z0)), 8), batch, steps=3)
    for mode in ("data_parallel", "pmap"):
        assert_trees_close(results[mode][0], results["simulate"][0])
        np.testing.assert_array_equal(
            optdist.bytes_sent(results[mode][1]), optdist.bytes_sent(results["simulate"][1])
        )


def test_minmax_operator_is_grad_x_and_minus_grad_y():
    a, b, c = (jnp.asarray(v, jnp.float32) for v in GAME)
    f = lambda x, y: x @ a @ y + b @ x + c @ y  # noqa: E731
    z = (jnp.arange(3.0), jnp.ones(3))
    got = minmax.minmax_operator(f)(z)
    assert_trees_close(got, operator(tuple(np.asarray(v, np.float64) for v in z), *GAME))
    with pytest.raises(ValueError, match="params"):
        minmax.minmax_operator(f)({"x": z[0], "y": z[1]})
    with pytest.raises(TypeError, match="loss_fn"):
        minmax.minmax_operator(3)


def test_input_errors_name_the_parameter():
    with pytest.raises(ValueError, match="learning_rate"):
        minmax.extragradient(-0.1)
    with pytest.raises(TypeError, match="projection"):
        minmax.past_extragradient(0.1, projection=3)
    with pytest.raises((ValueError, TypeError), match="axis_name"):
        minmax.reflected_gradient(0.1, 3)
    tx = minmax.extragradient(0.1)
    with pytest.raises(ValueError, match="operator_fn"):
        tx.update(Z0, tx.init(Z0), Z0)
    tx = minmax.optimistic_gradient(0.1)
    with pytest.raises(TypeError, match="floating"):
        tx.update((jnp.zeros(3, jnp.int32), Z0[1]), tx.init(Z0), Z0)
