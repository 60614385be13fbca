"""Gossip and gradient tracking on edge trees: empty leaves pass through, bfloat16 is sent as bfloat16.

Issue 18 item 3: a zero-element leaf crashed CHOCO gossip (top-k of an empty leaf), and bfloat16 parameters
were sent as float32 (twice the bytes the docstrings state).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optdist
from optdist import decentralized as dec

N, B, D_IN, D_OUT = 8, 6, 4, 3
LR = 0.05
PARAM_ELEMS = D_OUT + D_IN * D_OUT  # b and w


def _problem(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, B, D_IN))
    y = np.einsum("nbi,nio->nbo", x, rng.normal(size=(N, D_IN, D_OUT)))
    params = {"b": rng.normal(size=(N, D_OUT)), "w": rng.normal(size=(N, D_IN, D_OUT))}
    return np.concatenate([x, y], axis=-1), params


BATCHES, PARAMS0 = _problem()


def loss(params, batch):
    x, y = batch[:, :D_IN], batch[:, D_IN:]
    pred = x @ params["w"].astype(jnp.float32) + params["b"].astype(jnp.float32)
    return jnp.mean(jnp.sum((pred - y) ** 2, axis=-1))


def run(tx, params, steps=3):
    def step(params, state, batch):
        grads = jax.grad(loss)(params, batch)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = jax.vmap(tx.init)(params)
    run_step = optdist.simulate(step, "data")
    batches = jnp.asarray(BATCHES, jnp.float32)
    for _ in range(steps):
        params, state = run_step(params, state, batches)
    return params, state


def diging():
    return optax.chain(
        optdist.gradient_tracking("ring", "data"),
        optax.sgd(LR),
        optdist.gossip("ring", "data", order="combine_then_adapt"),
    )


CHAINS = {
    "dsgd": lambda: optax.chain(optax.sgd(LR), optdist.gossip("ring", "data")),
    "choco": lambda: optax.chain(
        optax.sgd(LR),
        optdist.gossip("ring", "data", optdist.compressors.top_k(0.25), consensus_step_size=0.5),
    ),
    "gradient_tracking": diging,
}


@pytest.mark.parametrize("name", sorted(CHAINS))
def test_zero_element_leaves_pass_through_untouched(name):
    """The other leaves evolve bit for bit as without the empty leaf, which sends nothing."""
    tx = CHAINS[name]()
    params = {k: jnp.asarray(v, jnp.float32) for k, v in PARAMS0.items()}
    with_empty = {**params, "e": jnp.zeros((N, 0, 3)), "s": jnp.zeros((N, 0))}
    ref_params, ref_state = run(tx, params)
    got_params, got_state = run(tx, with_empty)
    assert got_params["e"].shape == (N, 0, 3) and got_params["s"].shape == (N, 0)
    for k in params:
        np.testing.assert_array_equal(got_params[k], ref_params[k], err_msg=k)
    np.testing.assert_array_equal(optdist.bytes_sent(got_state), optdist.bytes_sent(ref_state))
    assert int(optdist.bytes_sent(got_state)[0]) > 0


def _mix_np(matrix, xs):
    return np.einsum("ij,j...->i...", matrix, xs)


def _np_grad(b, w, batch):
    x, y = batch[:, :D_IN], batch[:, D_IN:]
    r = x @ w + b - y
    return 2 * r.sum(0) / len(x), 2 * x.T @ r / len(x)


def test_bfloat16_parameters_gossip_as_bfloat16_and_match_the_reference():
    steps = 4
    params = {k: jnp.asarray(v, jnp.bfloat16) for k, v in PARAMS0.items()}
    tx = optax.chain(optax.sgd(LR), optdist.gossip("ring", "data"))
    got, state = run(tx, params, steps)
    assert got["w"].dtype == jnp.bfloat16
    # Two ring neighbours per step, the parameters in bfloat16: 2 bytes per value.
    np.testing.assert_array_equal(optdist.bytes_sent(state), steps * 2 * PARAM_ELEMS * 2)
    # Float64 adapt-then-combine D-SGD, x <- W (x - lr g), from the same bfloat16 start.
    matrix = dec.ring(N).matrix()
    b = np.asarray(params["b"], np.float64)
    w = np.asarray(params["w"], np.float64)
    for _ in range(steps):
        grads = [_np_grad(b[i], w[i], BATCHES[i]) for i in range(N)]
        b = _mix_np(matrix, b - LR * np.stack([g[0] for g in grads]))
        w = _mix_np(matrix, w - LR * np.stack([g[1] for g in grads]))
    # bfloat16 keeps 8 significant bits: each stored value is within 2^-8 of the reference, relative.
    for got_leaf, ref in ((got["b"], b), (got["w"], w)):
        np.testing.assert_allclose(np.asarray(got_leaf, np.float64), ref, rtol=2e-2, atol=2e-2)


def test_bfloat16_gradient_tracking_sends_bfloat16():
    steps = 3
    params = {k: jnp.asarray(v, jnp.bfloat16) for k, v in PARAMS0.items()}
    _, state = run(diging(), params, steps)
    # Tracker and parameters, each to two ring neighbours, in bfloat16.
    np.testing.assert_array_equal(optdist.bytes_sent(state), steps * 2 * 2 * PARAM_ELEMS * 2)
    tracker_state = state[0]
    assert tracker_state.tracker["w"].dtype == jnp.float32  # the tracker itself is kept in float32


@pytest.mark.parametrize(
    "tx",
    [optdist.gossip("ring", "data"), optdist.gradient_tracking("ring", "data")],
    ids=["gossip", "tracking"],
)
def test_compiled_sends_are_bfloat16(tx):
    """The lowered program sends bfloat16 (one packed buffer per term), not float32. (XLA:CPU's float
    normalization later runs collective-permutes in f32; a GPU or TPU sends the 2 bytes.)"""
    params = {"w": jnp.ones((4, 3), jnp.bfloat16), "b": jnp.ones((3,), jnp.bfloat16)}
    text = (
        jax.pmap(lambda g, s: tx.update(g, s, g), "data")
        .lower(*optdist.replicate((params, tx.init(params)), N))
        .as_text()
    )
    sends = [line for line in text.splitlines() if '"stablehlo.collective_permute"' in line]
    assert len(sends) == 2
    assert all("bf16" in line and "f32" not in line for line in sends), sends


def test_bfloat16_tracking_keeps_the_mean_tracker_equal_to_the_mean_gradient():
    """With bfloat16 the rounding of what is sent stays local, so mean_i y_i = mean_i g_i still holds."""
    params = {k: jnp.asarray(v, jnp.bfloat16) for k, v in PARAMS0.items()}
    tx = optdist.gradient_tracking("ring", "data")
    rng = np.random.default_rng(5)
    grads = [
        {k: jnp.asarray(rng.normal(size=v.shape), jnp.bfloat16) for k, v in PARAMS0.items()} for _ in range(4)
    ]
    step = optdist.simulate(lambda g, s: tx.update(g, s, g), "data")
    state = jax.vmap(tx.init)(params)
    for g in grads:
        _, state = step(g, state)
    for k in params:
        mean_tracker = np.asarray(state.tracker[k], np.float64).mean(0)
        mean_grad = np.asarray(grads[-1][k], np.float64).mean(0)
        np.testing.assert_allclose(mean_tracker, mean_grad, rtol=0, atol=1e-5)
