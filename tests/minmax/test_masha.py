"""MASHA1 / MASHA2: float64 references (rand-k, top-k + error feedback), the refresh bits, exact bytes,
convergence to the saddle of a strongly monotone game."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optdist
from optdist import compressors, minmax
from tests.minmax._games import bilinear_game, reference_masha, stacked

W, DIM, LAM, SEED = 4, 8, 0.3, 0
GAME, WORKER_GAMES = bilinear_game(dim=DIM, workers=W, seed=3, spread=0.1)
BATCH = stacked(WORKER_GAMES)
Z0 = (jnp.zeros(DIM), jnp.zeros(DIM))


def jax_op(params, batch):
    """Worker m's operator of f_m + (LAM/2)|x|^2 - (LAM/2)|y|^2 (strongly monotone)."""
    a, b, c = batch
    x, y = params
    return (a @ y + b + LAM * x, -(a.T @ x + c) + LAM * y)


def np_op(m):
    a, b, c = (v[m] for v in WORKER_GAMES)
    return lambda z: (a @ z[1] + b + LAM * z[0], -(a.T @ z[0] + c) + LAM * z[1])


def saddle_point():
    a, b, c = GAME
    mat = np.block([[LAM * np.eye(DIM), a], [-a.T, LAM * np.eye(DIM)]])
    z = np.linalg.solve(mat, -np.concatenate([b, -c]))
    return z[:DIM], z[DIM:]


def make(kind, lr, ratio, tau):
    if kind == "masha1":
        return minmax.masha1(lr, compressors.rand_k(ratio), "data", tau=tau, seed=SEED)
    return minmax.masha2(lr, compressors.top_k(ratio), "data", tau=tau, seed=SEED)


@functools.cache
def run(kind, lr, ratio, tau, calls):
    """(points [calls, ...] of worker 0 in float64, refresh flags per call, bytes per call)."""
    tx = make(kind, lr, ratio, tau)

    def chunk(params, state, batch):
        def body(carry, _):
            p, s = carry
            refresh = s.refresh
            updates, s = tx.update(jax_op(p, batch), s, p)
            p = optax.apply_updates(p, updates)
            return (p, s), (p, refresh, s.bytes_sent)

        return jax.lax.scan(body, (params, state), None, length=calls)[1]

    params_w, state_w = optdist.replicate((Z0, tx.init(Z0)), W)
    path, refresh, counters = optdist.simulate(chunk, "data")(params_w, state_w, BATCH)
    nbytes = np.asarray(counters.lo, np.float64) + 2.0**32 * np.asarray(counters.hi, np.float64)
    return tuple(np.asarray(p[0], np.float64) for p in path), np.asarray(refresh), nbytes


def bits(tau, count):
    """The documented refresh bits: b_k = [uniform(fold_in(key(seed), k)) >= tau]."""
    key = jax.random.key(SEED)
    return [bool(jax.random.uniform(jax.random.fold_in(key, k)) >= tau) for k in range(count)]


def np_rand_k(count, ratio):
    """rand_k's documented stratified coordinates for message ``count`` (key of compressed(): seed,
    count; leaf i; rand_k's own seed 0), as a float64 operator on one leaf."""

    def compress(i, v):
        d = v.shape[0]
        k = max(1, int(np.ceil(ratio * d - 1e-9)))
        key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(jax.random.key(SEED), count), i), 0)
        bounds = (np.arange(k + 1) * d) // k
        start, length = bounds[:-1], np.diff(bounds)
        offset = np.minimum(np.floor(np.asarray(jax.random.uniform(key, (k,))) * length), length - 1)
        idx = (start + offset).astype(int)
        out = np.zeros(d)
        out[idx] = v[idx] * length
        return out

    return compress


def np_top_k(v, ratio):
    k = max(1, int(np.ceil(ratio * v.shape[0] - 1e-9)))
    out = np.zeros_like(v)
    keep = np.argsort(-np.abs(v), kind="stable")[:k]
    out[keep] = v[keep]
    return out


def test_masha1_rand_k_matches_float64_reference():
    lr, ratio, tau, calls = 0.2, 0.25, 0.7, 30
    path, refresh, _ = run("masha1", lr, ratio, tau, calls)

    def messages(k, deltas):
        comp = np_rand_k(k, ratio)
        return tuple(np.mean([comp(i, d[i]) for d in deltas], 0) for i in range(2))

    b = bits(tau, calls)
    want = reference_masha((np.zeros(DIM),) * 2, [np_op(m) for m in range(W)], lr, tau, b, messages)
    for i in range(2):
        np.testing.assert_allclose(path[i], np.stack([p[i] for p in want[:calls]]), rtol=1e-4, atol=1e-5)
    # call t refreshes exactly after the iterations whose bit was 1 (call 0 is the first refresh).
    expected_refresh = [1]
    for bit in b:
        expected_refresh += [0, 1] if bit else [0]
    np.testing.assert_array_equal(refresh[0], expected_refresh[:calls])


def test_masha2_top_k_error_feedback_matches_float64_reference():
    lr, ratio, tau, calls = 0.2, 0.25, 0.7, 30
    path, _, _ = run("masha2", lr, ratio, tau, calls)
    errors = [(np.zeros(DIM), np.zeros(DIM)) for _ in range(W)]

    def messages(k, deltas):
        sent = []
        for m, d in enumerate(deltas):
            p = tuple(di + ei for di, ei in zip(d, errors[m]))
            c = tuple(np_top_k(v, ratio) for v in p)
            errors[m] = tuple(pi - ci for pi, ci in zip(p, c))
            sent.append(c)
        return tuple(np.mean([s[i] for s in sent], 0) for i in range(2))

    want = reference_masha(
        (np.zeros(DIM),) * 2, [np_op(m) for m in range(W)], lr, tau, bits(tau, calls), messages
    )
    for i in range(2):
        np.testing.assert_allclose(path[i], np.stack([p[i] for p in want[:calls]]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["masha1", "masha2"])
def test_reaches_the_saddle_and_counts_bytes_exactly(kind):
    lr, ratio, tau, calls = 0.2, 0.25, 0.75, 800
    path, refresh, nbytes = run(kind, lr, ratio, tau, calls)
    xs, ys = saddle_point()
    dist = np.sqrt(np.sum((path[0] - xs) ** 2, 1) + np.sum((path[1] - ys) ** 2, 1))
    d0 = np.sqrt(np.sum(xs**2) + np.sum(ys**2))
    assert dist[-1] < 1e-4 * d0, dist[-1] / d0  # linear convergence to the exact saddle
    assert dist[calls // 2] > 10 * dist[-1]
    # Bytes: a refresh call costs one exact-mean all-reduce, an iteration call one compressed exchange.
    per_call = np.diff(np.concatenate([np.zeros((W, 1)), nbytes], 1), axis=1)
    mean_step = _bytes_of(optdist.mean_gradients("data"))
    cmp = compressors.rand_k(ratio) if kind == "masha1" else compressors.top_k(ratio)
    compressed_step = _bytes_of(
        optdist.compressed_mean(cmp, "data", feedback="ef" if kind == "masha2" else None)
    )
    expected = np.where(refresh == 1, mean_step, compressed_step)
    np.testing.assert_array_equal(per_call, expected)
    # The refresh frequency is 1 - tau per iteration (seeded, so this is a fixed number).
    iterations = int((refresh[0] == 0).sum())
    assert abs((refresh[0][1:] == 1).sum() / iterations - (1 - tau)) < 0.06


def _bytes_of(tx):
    def step(p, s, batch):
        return tx.update(jax_op(p, batch), s, p)[1]

    params_w, state_w = optdist.replicate((Z0, tx.init(Z0)), W)
    return int(optdist.bytes_sent(optdist.simulate(step, "data")(params_w, state_w, BATCH))[0])


def test_input_errors_name_the_parameter():
    with pytest.raises(ValueError, match="tau"):
        minmax.masha1(0.1, compressors.rand_k(0.1), "data", tau=1.0)
    with pytest.raises(ValueError, match="learning_rate"):
        minmax.masha2(0.0, compressors.top_k(0.1), "data", tau=0.5)
    with pytest.raises(TypeError, match="compressor"):
        minmax.masha1(0.1, "rand_k", "data", tau=0.5)
    with pytest.raises(TypeError, match="seed"):
        minmax.masha2(0.1, compressors.top_k(0.1), "data", tau=0.5, seed=1.5)
