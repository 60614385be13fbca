"""PowerSGD: exact low-rank recovery, monotone subspace iteration, float64 protocol reference, bytes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optdist
from optdist import compression
from optdist.comm import Channel
from optdist.comm.accounting import all_reduce_bytes
from optdist.feedback import compressed_mean


def _low_rank(key, rows, cols, rank):
    a, b = jax.random.split(key)
    return jax.random.normal(a, (rows, rank)) @ jax.random.normal(b, (rank, cols))


@pytest.mark.parametrize(
    "rank, orthogonalization, layout",
    [(2, "auto", "channels_last"), (3, "qr", "channels_first"), (1, "gram_schmidt", "channels_last")],
)
def test_reproduces_a_rank_r_matrix_exactly(rank, orthogonalization, layout):
    comp = compression.powersgd(rank, orthogonalization=orthogonalization, matrix_layout=layout)
    tree = {"m": _low_rank(jax.random.key(0), 24, 16, rank), "t": _low_rank(jax.random.key(1), 12, 10, rank)}
    # > 2-D: (2, 6, 10) is viewed as (12, 10) channels-last, (6, 2, 10) as (6, 20) channels-first;
    # both are rank <= r.
    tree["t"] = tree["t"].reshape(2, 6, 10) if layout == "channels_last" else tree["t"].reshape(6, 2, 10)
    state = comp.init(tree)
    run = jax.jit(lambda x, s: comp.aggregate(x, s, jax.random.key(5), 0, Channel(None)))
    for _ in range(2):  # the first step from the random Q, then warm-started
        mean, local, state = run(tree, state)
        for k in tree:
            np.testing.assert_allclose(mean[k], tree[k], rtol=1e-4, atol=1e-4 * float(jnp.abs(tree[k]).max()))
            np.testing.assert_array_equal(local[k], mean[k])  # EF uses the globally decoded value


def test_error_decreases_monotonically_with_warm_start():
    key = jax.random.key(2)
    m = _low_rank(key, 40, 30, 3) + 0.3 * jax.random.normal(jax.random.fold_in(key, 1), (40, 30))
    comp = compression.powersgd(2)

    @jax.jit
    def errors(m):
        def body(state, _):
            agg = comp.aggregate({"m": m}, state, jax.random.key(0), 0, Channel(None))
            return agg.state, jnp.linalg.norm(agg.mean["m"] - m)

        return jax.lax.scan(body, comp.init({"m": m}), None, length=10)[1]

    err = np.asarray(errors(m))
    assert np.all(np.diff(err) <= 1e-5 * err[0])
    assert err[-1] < 0.9 * err[0]
    # The limit is the best rank-2 approximation error (subspace iteration converges).
    s = np.linalg.svd(np.asarray(m, np.float64), compute_uv=False)
    best = np.sqrt(np.sum(s[2:] ** 2))
    assert err[-1] <= best * 1.01
    # Without warm start every step starts from a fresh random Q: no improvement over steps.
    cold = compression.powersgd(2, warm_start=False)
    agg = cold.aggregate({"m": m}, cold.init({"m": m}), jax.random.key(1), 0, Channel(None))
    assert float(jnp.linalg.norm(agg.mean["m"] - m)) > 1.05 * best


def _orth(p):
    return np.linalg.qr(p)[0]


def test_matches_float64_numpy_reference_of_the_two_allreduce_protocol_with_ef():
    n, steps, rank = 2, 3, 2
    shapes = {"a": (12, 10), "b": (12, 10), "c": (3, 4, 12), "v": (6,)}
    key = jax.random.key(7)
    grads = [
        {
            k: jax.random.normal(jax.random.fold_in(key, 100 * t + i), (n, *s))
            for i, (k, s) in enumerate(shapes.items())
        }
        for t in range(steps)
    ]
    params = {k: jnp.zeros(s) for k, s in shapes.items()}
    tx = optdist.feedback.powersgd(rank, "data")
    state = optdist.replicate(tx.init(params), n)
    step = optdist.simulate(lambda g, s: tx.update(g, s, params))
    outs = []
    for g in grads:
        out, state = step(g, state)
        outs.append(out)
    # Reference (float64): groups {a, b} (12x10, batched) and {c} (10x6); v is averaged exactly.
    q0 = tx.init(params).aggregator.compressor.q
    q = {"ab": np.asarray(q0[0], np.float64), "c": np.asarray(q0[1], np.float64)}
    err = [{k: np.zeros((int(np.prod(shapes[k][:-1])), shapes[k][-1])) for k in "abc"} for _ in range(n)]
    for t in range(steps):
        g = [
            {k: np.asarray(grads[t][k][i], np.float64).reshape(err[i][k].shape) for k in "abc"}
            for i in range(n)
        ]
        ms = [{k: g[i][k] + err[i][k] for k in "abc"} for i in range(n)]
        decoded = {}
        for name, keys in (("ab", "ab"), ("c", "c")):
            stack = [np.stack([ms[i][k] for k in keys]) for i in range(n)]
            p = np.mean([s @ q[name] for s in stack], axis=0)
            p = np.stack([_orth(pb) for pb in p])
            q[name] = np.mean([np.swapaxes(s, 1, 2) @ p for s in stack], axis=0)
            dec = p @ np.swapaxes(q[name], 1, 2)
            decoded.update({k: dec[j] for j, k in enumerate(keys)})
        for i in range(n):
            for k in "abc":
                err[i][k] = ms[i][k] - decoded[k]
        for k in "abc":
            for i in range(n):
                np.testing.assert_allclose(
                    outs[t][k][i].reshape(decoded[k].shape), decoded[k], rtol=1e-4, atol=1e-5
                )
        np.testing.assert_allclose(
            outs[t]["v"][0], np.mean(np.asarray(grads[t]["v"], np.float64), 0), rtol=1e-6
        )
    for i in range(n):
        np.testing.assert_allclose(state.aggregator.error["a"][i], err[i]["a"], rtol=1e-3, atol=1e-4)
    # Bytes: per step one all-reduce of [P_ab, P_c, v] and one of [Q_ab, Q_c] over 2 workers.
    p_tree = [
        np.zeros((2, 12, rank), np.float32),
        np.zeros((1, 12, rank), np.float32),
        np.zeros(6, np.float32),
    ]
    q_tree = [np.zeros((2, 10, rank), np.float32), np.zeros((1, 12, rank), np.float32)]
    per_step = all_reduce_bytes(p_tree, n) + all_reduce_bytes(q_tree, n)
    assert per_step == 2 * (24 * 2 + 12 * 2 + 6) * 4 // 2 + 2 * (20 * 2 + 12 * 2) * 4 // 2
    np.testing.assert_array_equal(optdist.bytes_sent(state), [steps * per_step] * n)


def test_small_matrices_and_start_step_use_the_exact_mean():
    shapes = {"big": (16, 12), "small": (3, 4), "v": (5,)}
    params = {k: jnp.zeros(s) for k, s in shapes.items()}
    tx = compressed_mean(compression.powersgd(1, start_step=2), "data", feedback="ef")
    grads = {k: jax.random.normal(jax.random.key(i), (4, *s)) for i, (k, s) in enumerate(shapes.items())}
    step = optdist.simulate(lambda g, s: tx.update(g, s, params))
    state = optdist.replicate(tx.init(params), 4)
    exact_bytes = all_reduce_bytes(params, 4)
    p_bytes = all_reduce_bytes([np.zeros((1, 16, 1), np.float32), params["small"], params["v"]], 4)
    q_bytes = all_reduce_bytes([np.zeros((1, 12, 1), np.float32)], 4)
    expected = [exact_bytes, 2 * exact_bytes, 2 * exact_bytes + p_bytes + q_bytes]
    for t in range(3):
        out, state = step(grads, state)
        np.testing.assert_array_equal(optdist.bytes_sent(state), [expected[t]] * 4)
        for k in ("small", "v"):  # rate 12 / 7 < 2 and a vector: always exact
            np.testing.assert_allclose(out[k][0], grads[k].mean(0), rtol=1e-5, atol=1e-6)
        exact_big = np.allclose(out["big"][0], grads["big"].mean(0), rtol=1e-4, atol=1e-5)
        assert exact_big == (t < 2)
    assert np.linalg.matrix_rank(np.asarray(out["big"][0]), tol=1e-4) == 1


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="rank"):
        compression.powersgd(0)
    with pytest.raises(ValueError, match="orthogonalization"):
        compression.powersgd(2, orthogonalization="svd")
    with pytest.raises(ValueError, match="start_step"):
        compression.powersgd(2, start_step=-1)
    with pytest.raises(ValueError, match="matrix_layout"):
        compression.powersgd(2, matrix_layout="NCHW")
    with pytest.raises(ValueError, match="min_compression_rate"):
        compression.powersgd(2, min_compression_rate=-1.0)


def test_one_allreduce_per_phase_for_the_whole_tree():
    params = {
        "a": jnp.zeros((16, 12)),
        "b": jnp.zeros((16, 12)),
        "conv": jnp.zeros((3, 3, 8, 16)),
        "v": jnp.zeros(12),
        "s": jnp.zeros(()),
    }
    tx = optdist.feedback.powersgd(2, "data")
    lowered = jax.pmap(lambda g, s: tx.update(g, s, params), "data").lower(
        *optdist.replicate((params, tx.init(params)), 8)
    )
    text = lowered.as_text()
    assert text.count('"stablehlo.all_reduce"') == 2  # P (with the exact leaves), then Q
