"""Outer-loop methods against float64 NumPy references written from their papers' update rules."""

import jax
import numpy as np
import optax
import pytest

import optdist.outer as outer
from tests.outer._problem import (
    flat,
    init_params,
    loss,
    make_data,
    np_delayed_nesterov_arrival,
    np_grad,
    np_local_models,
    run,
)

N = 4


@pytest.fixture(scope="module")
def data():
    return make_data(N)


def np_adamw_step(theta, g, st, lr, b1=0.9, b2=0.999, eps=1e-8, wd=0.1):
    """optax.adamw (bias-corrected Adam + decoupled weight decay), one step; returns the update."""
    st["t"] += 1
    st["m"] = b1 * st["m"] + (1 - b1) * g
    st["v"] = b2 * st["v"] + (1 - b2) * g * g
    m_hat = st["m"] / (1 - b1 ** st["t"])
    v_hat = st["v"] / (1 - b2 ** st["t"])
    return -lr * (m_hat / (np.sqrt(v_hat) + eps) + wd * theta)


def np_diloco(data, rounds, h, inner_lr, outer_lr=0.7, mu=0.9):
    """DiLoCo: AdamW inner (state kept across rounds), Nesterov outer on Δ = θ - mean θ_i."""
    n = data.shape[0]
    theta = flat(init_params())
    states = [{"t": 0, "m": np.zeros_like(theta), "v": np.zeros_like(theta)} for _ in range(n)]
    mom = np.zeros_like(theta)
    for _ in range(rounds):
        local = []
        for i in range(n):
            phi = theta.copy()
            for _ in range(h):
                phi = phi + np_adamw_step(phi, np_grad(phi, data[i]), states[i], inner_lr)
            local.append(phi)
        delta = theta - np.mean(local, axis=0)
        mom = mu * mom + delta
        theta = theta - outer_lr * (delta + mu * mom)
    return theta


def test_diloco_one_worker_equals_lookahead_with_nesterov_outer_step():
    """One worker, no axis: fast weights run H AdamW steps, slow weights take a Nesterov step."""
    data1 = make_data(1, seed=3)
    h, rounds, lr = 4, 3, 0.05
    tx = outer.diloco(inner_lr=lr, sync_every=h, axis_name=None)
    params = init_params()
    state = tx.init(params)

    @jax.jit
    def step(p, s):
        u, s = tx.update(jax.grad(loss)(p, data1[0]), s, p)
        return optax.apply_updates(p, u), s

    for _ in range(h * rounds):
        params, state = step(params, state)
    ref = np_diloco(data1, rounds, h, lr)
    np.testing.assert_allclose(flat(params), ref, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(flat(state.anchor), ref, rtol=2e-5, atol=2e-6)


def test_diloco_four_workers_matches_reference(data):
    h, rounds, lr = 3, 3, 0.05
    p, s, _ = run(outer.diloco(inner_lr=lr, sync_every=h, axis_name="data"), h * rounds, data)
    ref = np_diloco(data, rounds, h, lr)
    for i in range(N):
        np.testing.assert_allclose(flat(p)[i], ref, rtol=2e-5, atol=2e-6)
    # Inner AdamW state was kept: its step count is the total number of inner steps.
    assert np.all(np.asarray(s.inner_state[0].count) == h * rounds)


def np_fedopt(data, rounds, k, client_lr, server_lr, kind, b1=0.9, b2=0.99, tau=1e-3):
    """Reddi et al. Algorithm 2 (FedAdam / FedYogi / FedAdagrad), client SGD."""
    x = flat(init_params())
    m, v = np.zeros_like(x), np.full_like(x, tau * tau)
    for _ in range(rounds):
        d = (
            np.mean(np_local_models(x, data, k, client_lr), axis=0) - x
        )  # Δ_t = mean(y_i - x): the paper's sign
        m = b1 * m + (1 - b1) * d
        if kind == "adam":
            v = b2 * v + (1 - b2) * d * d
        elif kind == "yogi":
            v = v - (1 - b2) * d * d * np.sign(v - d * d)
        else:
            v = v + d * d
        x = x + server_lr * m / (np.sqrt(v) + tau)
    return x


@pytest.mark.parametrize("kind", ["adam", "yogi", "adagrad"])
def test_fedopt_matches_reddi_algorithm_2(data, kind):
    make = {"adam": outer.fedadam, "yogi": outer.fedyogi, "adagrad": outer.fedadagrad}[kind]
    k, rounds, client_lr, server_lr = 3, 4, 0.1, 0.05
    p, _, _ = run(make(client_lr, server_lr, k, "data"), k * rounds, data)
    ref = np_fedopt(data, rounds, k, client_lr, server_lr, kind)
    np.testing.assert_allclose(flat(p), np.broadcast_to(ref, (N, ref.size)), rtol=1e-4, atol=1e-5)
    # The server moved: this is not a trivially small step that any rule would match.
    assert np.max(np.abs(ref - flat(init_params()))) > 0.02


def test_fedavg_with_server_lr(data):
    k, rounds = 2, 3
    p, _, _ = run(outer.fedavg(0.1, 0.5, k, "data"), k * rounds, data)
    x = flat(init_params())
    for _ in range(rounds):
        x = x + 0.5 * (np.mean(np_local_models(x, data, k, 0.1), axis=0) - x)
    np.testing.assert_allclose(flat(p)[0], x, rtol=1e-5, atol=1e-6)


def np_scaffold(data, rounds, k, lr, server_lr, participants=None):
    n = data.shape[0]
    x = flat(init_params())
    c, ci = np.zeros_like(x), np.zeros((n, x.size))
    for r in range(rounds):
        s = range(n) if participants is None else participants[r]
        dy, dc = [], []
        for i in s:
            y = x.copy()
            for _ in range(k):
                y = y - lr * (np_grad(y, data[i]) - ci[i] + c)
            c_plus = ci[i] - c + (x - y) / (k * lr)
            dy.append(y - x)
            dc.append(c_plus - ci[i])
            ci[i] = c_plus
        x = x + server_lr * np.mean(dy, axis=0)
        c = c + len(s) / n * np.mean(dc, axis=0)
    return x, c, ci


def test_scaffold_matches_option_ii(data):
    k, rounds, lr, server_lr = 3, 4, 0.1, 0.8
    p, s, _ = run(outer.scaffold(lr, k, "data", server_lr=server_lr), k * rounds, data)
    x, c, ci = np_scaffold(data, rounds, k, lr, server_lr)
    np.testing.assert_allclose(flat(p), np.broadcast_to(x, (N, x.size)), rtol=1e-4, atol=1e-5)
    cv = s.inner_state[0]
    np.testing.assert_allclose(flat(cv.c_global), np.broadcast_to(c, (N, c.size)), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(flat(cv.c_local), ci, rtol=1e-4, atol=1e-5)
    assert np.max(np.abs(ci)) > 0.05  # control variates are far from their zero init


def test_scaffold_partial_participation(data):
    table = np.array([[True, True, False, False], [False, True, True, True], [True, False, False, True]])
    k, lr = 2, 0.1
    p, s, _ = run(outer.scaffold(lr, k, "data", participation=table), k * 3, data)
    parts = [np.flatnonzero(row) for row in table]
    x, c, ci = np_scaffold(data, 3, k, lr, 1.0, participants=parts)
    np.testing.assert_allclose(flat(p)[0], x, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(flat(s.inner_state[0].c_local), ci, rtol=1e-4, atol=1e-5)


def np_delayed_nesterov(data, rounds, k, lr, outer_lr, mu, n_buf):
    """Our reading of Algorithm 3: plain step Δ/N per arrival, momentum every N arrivals."""
    x = flat(init_params())
    m, buf = np.zeros_like(x), np.zeros_like(x)
    for t in range(1, rounds + 1):
        d = x - np.mean(np_local_models(x, data, k, lr), axis=0)
        x, m, buf = np_delayed_nesterov_arrival(x, m, buf, d, t, outer_lr, mu, n_buf)
    return x


@pytest.mark.parametrize("n_buf", [1, 3])
def test_delayed_nesterov_matches_reference(data, n_buf):
    k, rounds, lr = 2, 7, 0.1
    tx = outer.delayed_nesterov(optax.sgd(lr), k, "data", outer_lr=0.7, momentum=0.9, buffer_size=n_buf)
    p, _, _ = run(tx, k * rounds, data)
    ref = np_delayed_nesterov(data, rounds, k, lr, 0.7, 0.9, n_buf)
    np.testing.assert_allclose(flat(p)[0], ref, rtol=1e-4, atol=1e-5)


def test_delayed_nesterov_with_one_arrival_per_update_is_nesterov():
    g = {"a": np.array([1.0, -2.0], np.float32)}
    tx_a, tx_b = outer.delayed_nesterov_outer(0.3, 0.8, 1), optax.sgd(0.3, momentum=0.8, nesterov=True)
    sa, sb = tx_a.init(g), tx_b.init(g)
    for t in range(4):
        gt = {"a": g["a"] * (t + 1) - t}
        ua, sa = tx_a.update(gt, sa)
        ub, sb = tx_b.update(gt, sb)
        np.testing.assert_allclose(ua["a"], ub["a"], rtol=1e-6)


def test_local_adaptive_matches_reference(data):
    k, rounds, lr, b2, eps = 3, 3, 0.05, 0.9, 1e-8
    for scaling in ("adam", "rmsprop"):
        tx = outer.local_adaptive(lr, k, "data", scaling=scaling, b2=b2, eps=eps)
        p, _, _ = run(tx, k * rounds, data)
        x = flat(init_params())
        d, v = np.ones_like(x), np.zeros_like(x)
        for r in range(1, rounds + 1):
            ys, sq = [], []
            for i in range(N):
                y, acc = x.copy(), np.zeros_like(x)
                for _ in range(k):
                    g = np_grad(y, data[i])
                    acc += g * g
                    y = y - lr * g / d
                ys.append(y)
                sq.append(acc / k)
            x = np.mean(ys, axis=0)
            v = b2 * v + (1 - b2) * np.mean(sq, axis=0)
            d = np.sqrt(v / (1 - b2**r) if scaling == "adam" else v) + eps
        np.testing.assert_allclose(flat(p)[0], x, rtol=1e-4, atol=1e-5, err_msg=scaling)
