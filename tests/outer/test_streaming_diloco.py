"""Streaming DiLoCo: reduces to DiLoCo; staggered fragments, delayed merge; bytes; bad input."""

import jax.numpy as jnp
import numpy as np
import pytest

import optdist
import optdist.outer as outer
from optdist.comm import all_reduce_bytes
from tests.outer._problem import flat, init_params, make_data, np_grad, run
from tests.outer.test_references import np_adamw_step

N = 4


@pytest.fixture(scope="module")
def data():
    return make_data(N, seed=4)


def test_one_fragment_no_delay_is_diloco(data):
    steps = 9
    a, sa, _ = run(outer.streaming_diloco(0.05, 3, "data"), steps, data)
    b, sb, _ = run(outer.diloco(0.05, sync_every=3, axis_name="data"), steps, data)
    np.testing.assert_allclose(flat(a), flat(b), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(optdist.bytes_sent(sa), optdist.bytes_sent(sb))


def np_streaming(data, steps, h, frags, delay, alpha, lr, outer_lr=0.7, mu=0.9, aggregate=None):
    """float64 Streaming DiLoCo; ``aggregate(p, deltas [n, k]) -> mean`` (default: the exact mean)."""
    n = data.shape[0]
    theta = flat(init_params())
    local = np.tile(theta, (n, 1))
    states = [{"t": 0, "m": np.zeros_like(theta), "v": np.zeros_like(theta)} for _ in range(n)]
    mom = np.zeros_like(theta)
    stride = h // len(frags)
    for t in range(1, steps + 1):
        for i in range(n):
            local[i] = local[i] + np_adamw_step(local[i], np_grad(local[i], data[i]), states[i], lr)
        for p, idx in enumerate(frags):
            phase = ((p + 1) * stride) % h
            if t % h == phase:
                deltas = theta[idx] - local[:, idx]
                delta = deltas.mean(axis=0) if aggregate is None else aggregate(p, deltas)
                mom[idx] = mu * mom[idx] + delta
                theta[idx] = theta[idx] - outer_lr * (delta + mu * mom[idx])
            if t > delay and t % h == (phase + delay) % h:
                local[:, idx] = alpha * local[:, idx] + (1 - alpha) * theta[idx]
    return local, theta


def test_two_fragments_delay_and_merge_match_reference(data):
    h, delay, alpha, steps = 4, 1, 0.5, 13
    tx = outer.streaming_diloco(0.05, h, "data", num_fragments=2, delay=delay, alpha=alpha)
    p, s, (_, states) = run(tx, steps, data, record=True)
    # Leaves in tree order: "b" (fragment 0), "w" (fragment 1).
    local, theta = np_streaming(data, steps, h, [np.array([0]), np.array([1, 2, 3])], delay, alpha, 0.05)
    np.testing.assert_allclose(flat(p), local, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(flat(s.anchor)[0], theta, rtol=2e-5, atol=2e-6)
    assert not all(optdist.is_replicated(p).values())  # α = 0.5 keeps workers apart
    # Bytes: fragment "b" (1 f32) at t = 2, 6, 10; fragment "w" (3 f32) at t = 4, 8, 12.
    per_step = np.asarray(optdist.bytes_sent(states))[0]
    b_bytes = all_reduce_bytes(jnp.zeros(1), N)
    w_bytes = all_reduce_bytes(jnp.zeros(3), N)
    increments = np.diff(np.concatenate([[0], per_step]))
    expected = np.zeros(steps, np.int64)
    expected[[1, 5, 9]] = b_bytes
    expected[[3, 7, 11]] = w_bytes
    np.testing.assert_array_equal(increments, expected)


def test_low_bit_outer_gradients_are_counted_in_their_dtype(data):
    tx = outer.streaming_diloco(0.05, 2, "data", outer_dtype=jnp.bfloat16)
    p, s, _ = run(tx, 4, data)
    np.testing.assert_array_equal(
        optdist.bytes_sent(s), [2 * all_reduce_bytes(jnp.zeros(4, jnp.bfloat16), N)] * N
    )
    ref, _, _ = run(outer.streaming_diloco(0.05, 2, "data"), 4, data)
    np.testing.assert_allclose(flat(p), flat(ref), rtol=0, atol=2e-2)  # bf16 rounding only


def test_streaming_bad_inputs():
    with pytest.raises(ValueError, match="num_fragments=3 does not divide sync_every=8"):
        outer.streaming_diloco(0.1, 8, num_fragments=3)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="alpha"):
            outer.streaming_diloco(0.1, 8, alpha=bad)
    with pytest.raises(ValueError, match="delay"):
        outer.streaming_diloco(0.1, 8, delay=8)
    with pytest.raises(ValueError, match="sync_every"):
        outer.streaming_diloco(0.1, 0)
    tx = outer.streaming_diloco(0.1, 8, num_fragments=4)
    with pytest.raises(ValueError, match="num_fragments=4 exceeds the 2 parameter leaves"):
        tx.init(init_params())


def np_top1_ef(frags):
    """Per-fragment, per-worker EF residuals of top-1-of-3 (a scalar fragment is sent exactly)."""
    errors = {}

    def aggregate(p, deltas):
        if deltas.shape[1] == 1:
            return deltas.mean(axis=0)
        pw = deltas + errors.get(p, np.zeros_like(deltas))
        keep = np.abs(pw) >= np.sort(np.abs(pw), axis=1)[:, -1:]
        sent = np.where(keep, pw, 0.0)
        errors[p] = pw - sent
        return sent.mean(axis=0)

    return aggregate, errors


def test_fragments_with_error_feedback_aggregator_match_reference(data):
    """Each fragment keeps its own EF state; the compressed sync matches a float64 reference."""
    h, delay, alpha, steps = 4, 1, 0.5, 13
    agg = optdist.aggregation.compressed(optdist.compressors.top_k(0.3), feedback="ef")
    tx = outer.streaming_diloco(0.05, h, "data", num_fragments=2, delay=delay, alpha=alpha, aggregator=agg)
    p, s, _ = run(tx, steps, data)
    frags = [np.array([0]), np.array([1, 2, 3])]
    aggregate, errors = np_top1_ef(frags)
    local, theta = np_streaming(data, steps, h, frags, delay, alpha, 0.05, aggregate=aggregate)
    np.testing.assert_allclose(flat(p), local, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(flat(s.anchor)[0], theta, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(np.asarray(s.aggregator_states[1].error[0]), errors[1], rtol=2e-5, atol=2e-6)
    assert np.abs(errors[1]).max() > 0 and not np.allclose(errors[1][0], errors[1][1])  # per worker


def test_fragments_with_robust_aggregator_match_reference(data):
    h, steps = 4, 9
    rule = optdist.aggregators.median()
    tx = outer.streaming_diloco(0.05, h, "data", num_fragments=2, aggregator=rule)
    p, s, _ = run(tx, steps, data)
    frags = [np.array([0]), np.array([1, 2, 3])]
    local, theta = np_streaming(data, steps, h, frags, 0, 0.0, 0.05, aggregate=lambda _, d: np.median(d, 0))
    np.testing.assert_allclose(flat(s.anchor)[0], theta, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(flat(p), local, rtol=2e-5, atol=2e-6)
    # Bytes: one all-gather of the fragment per sync (b: 1 f32 at t = 2, 6; w: 3 f32 at t = 4, 8).
    np.testing.assert_array_equal(optdist.bytes_sent(s), [(N - 1) * 4 * (2 * 1 + 2 * 3)] * N)


def np_e2m1_nearest(x):
    """FP4 E2M1 nearest rounding with the chunk's max magnitude as scale (one chunk per row)."""
    mags = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]) / 6.0
    levels = np.concatenate([-mags[:0:-1], mags])
    s = np.abs(x).max(axis=-1, keepdims=True)
    y = x / np.where(s > 0, s, 1.0)
    return levels[np.abs(y[..., None] - levels).argmin(-1)] * s


def test_four_bit_fragments_match_reference(data):
    """Streaming DiLoCo with 4-bit (E2M1) fragment syncs, as in the paper, against float64."""
    h, delay, alpha, steps = 4, 1, 0.5, 13
    fp4 = optdist.compressors.quantize(4, "e2m1", rounding="nearest")
    tx = outer.streaming_diloco(0.05, h, "data", num_fragments=2, delay=delay, alpha=alpha, aggregator=fp4)
    p, s, _ = run(tx, steps, data)
    frags = [np.array([0]), np.array([1, 2, 3])]

    def aggregate(_, deltas):  # a scalar fragment is sent exactly (nothing to save)
        return deltas.mean(0) if deltas.shape[1] == 1 else np_e2m1_nearest(deltas).mean(0)

    local, theta = np_streaming(data, steps, h, frags, delay, alpha, 0.05, aggregate=aggregate)
    np.testing.assert_allclose(flat(p), local, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(flat(s.anchor)[0], theta, rtol=2e-5, atol=2e-6)
    # w's payload: 3 codes of 4 bits (2 bytes) + a float32 scale, all-gathered, at t = 4, 8, 12.
    b_bytes = all_reduce_bytes(jnp.zeros(1), N)
    np.testing.assert_array_equal(optdist.bytes_sent(s), [3 * b_bytes + 3 * (N - 1) * (2 + 4)] * N)
