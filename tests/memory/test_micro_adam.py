"""MicroAdam against a float64 NumPy transcription of the paper's Algorithm 1, Adam as its degenerate case,
and the optimizer-state bytes measured from the state pytree."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optdist
from optdist.memory import micro_adam, scale_by_micro_adam, state_bytes
from optdist.memory.micro_adam import _dequantize, _quantize


def _grads(shapes, steps, seed=0):
    rng = np.random.default_rng(seed)
    return [{k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()} for _ in range(steps)]


def _run(tx, params, grads):
    state = tx.init(params)
    update = jax.jit(tx.update)
    outs = []
    for g in grads:
        u, state = update(g, state, params)
        outs.append(jax.tree_util.tree_map(np.asarray, u))
    return outs, state


def reference(grads, density, window, b1, b2, eps, bits, bucket):
    """Algorithm 1 of Modoranu et al. (2024) for one flat leaf, float64."""
    d = grads[0].size
    k = max(1, int(np.ceil(density * d - 1e-9)))
    levels = 2**bits - 1 if bits else None
    error = np.zeros(d)
    ring = []  # (step written, indices, values)
    outs = []
    for t, g in enumerate(grads, start=1):
        a = g.astype(np.float64).reshape(-1) + error
        top = np.argsort(-np.abs(a), kind="stable")[:k]
        values = a[top].copy()
        a[top] = 0.0
        if bits is None:
            error = a
        else:  # Q then Q^{-1} per bucket with the bucket's min and max
            error = np.empty(d)
            for s in range(0, d, bucket):
                x = a[s : s + bucket]
                lo, hi = x.min(), x.max()
                q = np.round((x - lo) * levels / (hi - lo)) if hi > lo else np.zeros_like(x)
                error[s : s + bucket] = lo + q * (hi - lo) / levels
        ring.append((t, top, values))
        ring = ring[-window:]
        m = np.zeros(d)
        v = np.zeros(d)
        for written, idx, val in ring:
            np.add.at(m, idx, b1 ** (t - written) * val)
            np.add.at(v, idx, b2 ** (t - written) * val**2)
        m *= (1 - b1) / (1 - b1**t)
        v *= (1 - b2) / (1 - b2**t)
        outs.append(m / (eps + np.sqrt(v)))
    return outs


def test_density_one_no_quantization_window_covering_the_run_equals_adam():
    params = {"w": jnp.zeros((6, 5)), "b": jnp.zeros((3,)), "s": jnp.zeros(())}
    grads = _grads({"w": (6, 5), "b": (3,), "s": ()}, 7)
    tx = micro_adam(0.01, density=1.0, window=7, bits=None, values_dtype=jnp.float32)
    ours, _ = _run(tx, params, grads)
    adam, _ = _run(optax.adam(0.01), params, grads)
    for a, b in zip(ours, adam):
        for key in a:
            np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-9)
    # A window shorter than the run forgets the oldest gradients: no longer Adam.
    short, _ = _run(
        micro_adam(0.01, density=1.0, window=2, bits=None, values_dtype=jnp.float32), params, grads
    )
    assert not np.allclose(short[-1]["w"], adam[-1]["w"], rtol=1e-3)


@pytest.mark.parametrize("bits", [None, 4, 8])
def test_matches_float64_reference_of_algorithm_1(bits):
    d, steps, density, window, bucket = 40, 9, 0.2, 3, 8
    params = {"w": jnp.zeros((d,))}
    grads = _grads({"w": (d,)}, steps, seed=1)
    tx = scale_by_micro_adam(density, window, 0.8, 0.95, 1e-6, bits, bucket, jnp.float32)
    ours, state = _run(tx, params, grads)
    ref = reference([g["w"] for g in grads], density, window, 0.8, 0.95, 1e-6, bits, bucket)
    for t, (a, r) in enumerate(zip(ours, ref)):
        np.testing.assert_allclose(a["w"], r, rtol=2e-4, atol=2e-5, err_msg=f"step {t + 1}")
    assert int(state.count) == steps
    np.testing.assert_array_equal(np.sort(np.asarray(state.written)), [7, 8, 9])


def test_quantizer_round_trip_within_half_a_level():
    x = jnp.asarray(np.random.default_rng(2).normal(size=203), jnp.float32)
    for bits in (4, 8):
        e = _quantize(x, bits, 16)
        back = np.asarray(_dequantize(e, 203, bits, 16))
        span = (np.asarray(e.high) - np.asarray(e.low)).repeat(16)[:203]
        assert np.all(np.abs(back - np.asarray(x)) <= span / (2**bits - 1) / 2 + 1e-6)
        assert e.codes.dtype == jnp.uint8 and e.codes.size == (208 // 2 if bits == 4 else 208)


def test_error_feedback_conserves_the_gradient_mass():
    # Unquantized error feedback loses nothing: what entered the ring buffer plus what is left in the
    # error buffer is the sum of all gradients (window covering the run, one coordinate kept per step).
    d, steps = 5, 8
    tx = scale_by_micro_adam(density=0.2, window=steps, bits=None, values_dtype=jnp.float32)
    grads = _grads({"w": (d,)}, steps, seed=3)
    _, state = _run(tx, {"w": jnp.zeros((d,))}, grads)
    sent = np.zeros(d)
    np.add.at(sent, np.asarray(state.indices[0]).reshape(-1), np.asarray(state.values[0]).reshape(-1))
    total = np.sum([g["w"] for g in grads], axis=0)
    np.testing.assert_allclose(sent + np.asarray(state.error[0].codes), total, rtol=1e-5, atol=1e-5)
    assert len(set(np.asarray(state.indices[0]).reshape(-1).tolist())) > 1  # several coordinates sent


def test_state_bytes_at_one_percent_density():
    params = {"w": jnp.zeros((1000, 1000)), "b": jnp.zeros((1000,))}
    n = 1000 * 1000 + 1000
    adam = state_bytes(optax.adam(1e-3).init(params))
    assert adam == 8 * n + 4  # m and v in float32, plus the int32 count
    ours = state_bytes(micro_adam(1e-3, density=0.01, window=10).init(params))
    # w: 16 blocks of 62,500 (k = 625 each); b: one block (k = 10); uint16 indices + bf16 values.
    ring = 10 * (16 * 625 + 10) * (2 + 2)
    codes = 1000 * 1000 // 2 + 1024 // 2  # 4-bit codes, two per byte, buckets of 64 (b padded to 1024)
    bounds = 8 * (1000 * 1000 // 64 + 1024 // 64)  # float32 min and max per bucket
    counters = 4 + 4 * 10
    assert ours == ring + codes + bounds + counters
    assert ours / n < 1.03  # vs Adam's 8 bytes per parameter


def test_bad_hyperparameters_are_named():
    for make, name in [
        (lambda: micro_adam(1e-3, density=0.0), "density"),
        (lambda: micro_adam(1e-3, window=0), "window"),
        (lambda: micro_adam(1e-3, bits=3), "bits"),
        (lambda: micro_adam(1e-3, bucket_size=0), "bucket_size"),
        (lambda: micro_adam(-1.0), "learning_rate"),
        (lambda: micro_adam(1e-3, b2=1.0), "b2"),
        (lambda: micro_adam(1e-3, values_dtype=jnp.int8), "values_dtype"),
        (lambda: micro_adam(1e-3, weight_decay=-1.0), "weight_decay"),
    ]:
        with pytest.raises((ValueError, TypeError), match=name):
            make()


def test_runs_after_a_mean_on_simulated_workers_with_identical_state():
    params = {"w": jnp.ones((4, 3))}
    tx = optax.chain(optdist.mean_gradients("data"), micro_adam(0.1, density=0.5, window=2))
    grads = jax.random.normal(jax.random.key(0), (4, 4, 3))
    state_w = optdist.replicate(tx.init(params), 4)
    params_w = optdist.replicate(params, 4)
    u, state_w = optdist.simulate(lambda g, s, p: tx.update({"w": g}, s, p), "data")(grads, state_w, params_w)
    assert optdist.is_replicated(u) and optdist.is_replicated(state_w[1])


@pytest.mark.slow  # one tiny digits run through experiments.train (compiles the whole step)
def test_experiment_method_trains():
    from experiments import train
    from tests.experiments.test_experiments import tiny_digits

    result = train.train_and_evaluate(
        tiny_digits("micro_adam", steps=20, learning_rate=0.01), None, verbose=False
    )
    losses = [r["train_loss"] for r in result["history"]]
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
