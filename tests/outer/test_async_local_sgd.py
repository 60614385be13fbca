"""Asynchronous Local-SGD simulator: reduces to DiLoCo; stale arrivals match an event-driven reference."""

import numpy as np
import optax
import pytest

import optdist
import optdist.outer as outer
from optdist.comm import payload_bytes
from tests.outer._problem import flat, init_params, make_data, np_delayed_nesterov_arrival, np_grad, run

N = 4


@pytest.fixture(scope="module")
def data():
    return make_data(N, seed=6)


def test_equal_speeds_with_buffer_n_is_nesterov_diloco(data):
    h, rounds = 3, 3
    tx = outer.async_local_sgd(optax.sgd(0.1), h, speeds=(1,) * N, buffer_size=N)
    p, s, _ = run(tx, h * rounds, data)
    ref = outer.outer_loop(optax.sgd(0.1), optax.sgd(0.7, momentum=0.9, nesterov=True), h, "data")
    q, _, _ = run(ref, h * rounds, data)
    np.testing.assert_allclose(flat(p), flat(q), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(s.arrivals, [N * rounds] * N)


def np_async(data, ticks, speeds, steps, lr, outer_lr, mu, n_buf):
    n = data.shape[0]
    server = flat(init_params())
    start = np.tile(server, (n, 1))
    local = start.copy()
    done = np.zeros(n, int)
    m, buf, arrivals = np.zeros_like(server), np.zeros_like(server), 0
    pushes = np.zeros(n, int)
    for tick in range(ticks):
        arrived = []
        for i in range(n):
            if tick % speeds[i] == 0:
                local[i] = local[i] - lr * np_grad(local[i], data[i])
                done[i] += 1
            if done[i] >= steps[i]:
                arrived.append(i)
        for i in arrived:  # worker order within a tick
            arrivals += 1
            server, m, buf = np_delayed_nesterov_arrival(
                server, m, buf, start[i] - local[i], arrivals, outer_lr, mu, n_buf
            )
            pushes[i] += 1
        for i in arrived:
            start[i] = server.copy()
            local[i] = server.copy()
            done[i] = 0
    return local, server, arrivals, pushes


@pytest.mark.parametrize("dynamic", [False, True])
def test_heterogeneous_speeds_match_event_reference(data, dynamic):
    speeds, h, ticks = (1, 2, 3, 1), 4, 17
    tx = outer.async_local_sgd(
        optax.sgd(0.1), h, speeds, outer_lr=0.5, momentum=0.8, buffer_size=2, dynamic_local_steps=dynamic
    )
    p, s, _ = run(tx, ticks, data)
    steps = [max(1, h * 1 // k) for k in speeds] if dynamic else [h] * N
    local, server, arrivals, pushes = np_async(data, ticks, speeds, steps, 0.1, 0.5, 0.8, 2)
    np.testing.assert_allclose(flat(p), local, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(flat(s.server)[0], server, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(s.arrivals, [arrivals] * N)
    np.testing.assert_array_equal(optdist.bytes_sent(s), pushes * payload_bytes(init_params()))
    assert len(set(pushes.tolist())) > 1  # faster workers pushed more often


def test_async_bad_inputs(data):
    with pytest.raises(ValueError, match="speeds"):
        outer.async_local_sgd(optax.sgd(0.1), 2, speeds=(1, 0))
    with pytest.raises(ValueError, match="local_steps has 3 entries"):
        outer.async_local_sgd(optax.sgd(0.1), (1, 2, 3), speeds=(1, 2))
    tx = outer.async_local_sgd(optax.sgd(0.1), 2, speeds=(1, 2))
    with pytest.raises(ValueError, match="speeds has 2 entries but there are 4 workers"):
        run(tx, 1, data)
