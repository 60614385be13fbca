"""Compressors on the fused kernels, through compressed_mean(feedback="ef") with 4 simulated workers.

impl="pallas" (interpret mode on CPU) equals impl="xla"; bytes are exact; error feedback loses
nothing (sum of what was sent + residual = sum of the gradients fed); the fused path equals the
generic add / aggregate / subtract path; impl="auto" runs the XLA reference on CPU.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optdist
from optdist import compressors
from tests.helpers import assert_trees_close

N, T = 4, 3
# "w": 600 entries = 3 buckets of 256 (the last one ragged); "b": 2 entries, smaller than any
# payload, so it goes through the plain all-reduce mean.
SHAPES = {"w": (12, 50), "b": (2,)}
PARAMS = {k: jnp.zeros(s) for k, s in SHAPES.items()}

# The fused-kernel encodings, by their unified names (formerly int8, ternary, scaled_sign and
# threshold_top_k, now deprecated aliases of exactly these).
CASES = {
    "int8-nearest": lambda impl: compressors.qsgd(
        127, 256, scale="max", rounding="nearest", fused=True, impl=impl
    ),
    "int8-stochastic": lambda impl: compressors.qsgd(127, 256, scale="max", fused=True, impl=impl),
    "ternary": lambda impl: compressors.terngrad(None, bucket_size=256, impl=impl),
    "scaled_sign": lambda impl: compressors.sign(bucket_size=256, impl=impl),
    "threshold_top_k": lambda impl: compressors.top_k(0.05, "fused_threshold", 256, impl=impl),
}
# Payload bytes of "w" per worker, from the documented formats: 3 buckets (codes + a float32 scale
# each); top-k: k = ceil(0.05 * 600) = 30, capacity floor(1.1 k) = 33 values + 33 indices + a count.
PAYLOAD = {
    "int8-nearest": 3 * 256 + 3 * 4,
    "int8-stochastic": 3 * 256 + 3 * 4,
    "ternary": 3 * 256 // 4 + 3 * 4,
    "scaled_sign": 3 * 256 // 8 + 3 * 4,
    "threshold_top_k": 33 * 4 + 33 * 4 + 4,
}
PLAIN = 2 * (N - 1) * 1 * 4  # ring all-reduce of "b": 2 float32 in chunks of ceil(2 / N) = 1 entry


def _grads():
    """Per worker and step; worker i's gradients are scaled by i + 1 (heterogeneous workers)."""
    key = jax.random.key(42)
    scale = jnp.arange(1.0, N + 1.0)
    return {
        k: jax.random.normal(jax.random.fold_in(key, i), (N, T, *s))
        * scale.reshape((N,) + (1,) * (1 + len(s)))
        for i, (k, s) in enumerate(SHAPES.items())
    }


GRADS = _grads()


def _run(compressor, feedback="ef"):
    """``T`` steps (one ``lax.scan``) on every worker: outputs ``[N, T, ...]`` and the final state."""
    tx = optdist.compressed_mean(compressor, "data", feedback=feedback)

    def worker(g_seq, state):
        def body(s, g):
            out, s = tx.update(g, s, PARAMS)
            return s, out

        state, outs = jax.lax.scan(body, state, g_seq)
        return outs, state

    return optdist.simulate(worker)(GRADS, optdist.replicate(tx.init(PARAMS), N))


@functools.cache
def _result(case, impl):
    return _run(CASES[case](impl))


@pytest.mark.parametrize("case", sorted(CASES))
def test_pallas_equals_xla_and_bytes_are_exact(case):
    (out_x, st_x), (out_p, st_p) = _result(case, "xla"), _result(case, "pallas")
    assert_trees_close(out_p, out_x, rtol=1e-6, atol=1e-5)
    assert_trees_close(st_p.aggregator.error, st_x.aggregator.error, rtol=1e-6, atol=1e-5)
    assert all(
        np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves((out_p, st_p.aggregator.error))
    )
    want = T * ((N - 1) * PAYLOAD[case] + PLAIN)  # all-gather of the payload + the plain mean
    np.testing.assert_array_equal(optdist.bytes_sent(st_x), [want] * N)
    np.testing.assert_array_equal(optdist.bytes_sent(st_p), [want] * N)


@pytest.mark.parametrize("case", sorted(CASES))
def test_error_feedback_loses_nothing(case):
    """sum_t mean_i sent_i,t + mean_i e_i,T = mean_i sum_t g_i,t (float64 check)."""
    outs, state = _result(case, "pallas")
    for k in SHAPES:
        sent = np.asarray(outs[k], np.float64)
        assert np.all(sent == sent[:1])  # every worker gets the same mean
        fed = np.asarray(GRADS[k], np.float64).sum(1).mean(0)
        residual = np.asarray(state.aggregator.error[k], np.float64).mean(0)
        np.testing.assert_allclose(sent[0].sum(0) + residual, fed, rtol=0, atol=2e-5)
    # Residuals are per worker (different data), and the plain leaf's residual is exactly zero.
    assert not optdist.is_replicated(state.aggregator.error)["w"]
    np.testing.assert_array_equal(state.aggregator.error["b"], 0.0)
    # Compression happened: the residual of "w" is not zero.
    assert np.abs(np.asarray(state.aggregator.error["w"])).max() > 1e-3


@pytest.mark.parametrize("case", ["int8-stochastic", "ternary", "threshold_top_k"])
def test_fused_path_equals_the_generic_error_feedback_path(case):
    """Without ``aggregate_ef`` compressed_mean adds, aggregates and subtracts in separate steps."""
    compressor = CASES[case]("xla")
    assert compressor.aggregate_ef is not None
    generic_out, generic = _run(compressor._replace(aggregate_ef=None))
    fused_out, fused = _result(case, "xla")
    assert_trees_close(fused_out, generic_out, rtol=1e-6, atol=1e-5)
    assert_trees_close(fused.aggregator.error, generic.aggregator.error, rtol=1e-6, atol=1e-5)
    np.testing.assert_array_equal(optdist.bytes_sent(fused), optdist.bytes_sent(generic))


def test_auto_runs_the_xla_reference_on_cpu():
    from optdist_kernels import AUTO_BACKENDS

    assert jax.default_backend() == "cpu" and not any("cpu" in b for b in AUTO_BACKENDS.values())
    out_a, st_a = _run(CASES["int8-stochastic"]("auto"))
    out_x, st_x = _result("int8-stochastic", "xla")
    jax.tree_util.tree_map(np.testing.assert_array_equal, (out_a, st_a), (out_x, st_x))


def test_without_feedback_pallas_equals_xla():
    out_p, st_p = _run(CASES["int8-nearest"]("pallas"), feedback=None)
    out_x, st_x = _run(CASES["int8-nearest"]("xla"), feedback=None)
    assert_trees_close(out_p, out_x, rtol=1e-6, atol=1e-5)
    # The mean of nearest-rounded int8 codes is within half a step of the true mean.
    g = np.asarray(GRADS["w"], np.float64)
    step = np.abs(g).max() / 127
    assert np.abs(np.asarray(out_x["w"], np.float64)[0] - g.mean(0)).max() <= 0.5 * step + 1e-6


@pytest.mark.parametrize("scheme", ["int8", "ternary", "sign"])
def test_scanned_and_unrolled_receive_sums_are_bit_identical(scheme):
    """``gathered_ef(receive=...)``: the scan over workers (the bucketed sign's form) and the unrolled
    worker-order sum make the same additions in the same order, so the mean and residual bits agree."""
    from optdist.compression.base import gathered_ef
    from optdist_kernels import decode_accumulate, ef_quantize

    def encode_ef(x, e, key):
        payload, e_new = ef_quantize(x, e, key, scheme=scheme, bucket_size=256, impl="xla")
        buckets = -(-x.shape[0] // 256)
        return {k: v[:buckets] for k, v in payload.items()}, e_new

    decode = lambda payload, acc: decode_accumulate(payload, acc, scheme=scheme, bucket_size=256, impl="xla")
    grads = jax.tree_util.tree_map(lambda g: g[:, 0], GRADS)
    errors = jax.tree_util.tree_map(lambda g: 0.3 * g[:, 1], GRADS)

    def step(receive):
        comp = gathered_ef("q", encode_ef, decode, receive=receive)
        run = lambda g, e: comp.aggregate_ef(g, e, (), jax.random.key(0), jnp.int32(0), optdist.Channel("d"))
        agg, new_error = optdist.simulate(run, "d")(grads, errors)
        return agg.mean, new_error

    scanned, unrolled = step("scan"), step("unrolled")
    jax.tree_util.tree_map(np.testing.assert_array_equal, scanned, unrolled)
    with pytest.raises(ValueError, match="receive"):
        gathered_ef("q", encode_ef, decode, receive="tree")
