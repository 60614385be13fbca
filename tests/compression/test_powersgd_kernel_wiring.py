"""PowerSGD's fused error feedback (``aggregate_ef`` on the PowerSGD kernels), 4 simulated workers.

The fused path equals the unfused add / aggregate / subtract path (warm start on and off, rank
1/2/4, start_step, leaves that skip compression, a non-finite step); impl="pallas" (interpret mode
on CPU) equals impl="xla"; bytes are exact; error feedback loses nothing; impl="auto" is XLA on CPU
and falls back for groups the kernels cannot take, which impl="pallas" rejects by name.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optdist
from optdist import compressors
from optdist.comm import Channel
from optdist.comm.accounting import all_reduce_bytes
from tests.helpers import assert_trees_close

N, T = 4, 4
BAD_STEP, BAD_WORKER = 2, 1  # a NaN in "a" there: the step is skipped by compressed_mean's policy
# "a", "b": one batched group of 24x16 matrices; "c": (2, 8, 20) -> 16x20; "d" (compression rate
# 12 / (r * 7) < 2), "v" and "s" skip compression and travel in the P all-reduce.
SHAPES = {"a": (24, 16), "b": (24, 16), "c": (2, 8, 20), "d": (4, 3), "v": (6,), "s": ()}
PARAMS = {k: jnp.zeros(s) for k, s in SHAPES.items()}
# (rank, warm_start, start_step)
CONFIGS = [
    (1, True, 0),
    (1, False, 0),
    (2, True, 0),
    (2, False, 0),
    (4, True, 0),
    (4, False, 0),
    (2, True, 2),
]
PALLAS_CONFIGS = [(1, True, 0), (2, False, 0), (4, True, 0)]


def _grads():
    """Per worker and step (worker i scaled by i + 1: heterogeneous workers), with one NaN."""
    key = jax.random.key(11)
    scale = jnp.arange(1.0, N + 1.0)
    grads = {
        k: jax.random.normal(jax.random.fold_in(key, i), (N, T, *s))
        * scale.reshape((N,) + (1,) * (1 + len(s)))
        for i, (k, s) in enumerate(SHAPES.items())
    }
    grads["a"] = grads["a"].at[BAD_WORKER, BAD_STEP, 3, 5].set(jnp.nan)
    return grads


GRADS = _grads()


def _run(compressor):
    """``T`` steps in one ``lax.scan``: outputs and residuals per step ``[N, T, ...]``, final state."""
    tx = optdist.compressed_mean(compressor, "data", feedback="ef")

    def worker(g_seq, state):
        def body(s, g):
            out, s = tx.update(g, s, PARAMS)
            return s, (out, s.aggregator.error)

        state, (outs, errors) = jax.lax.scan(body, state, g_seq)
        return outs, errors, state

    return optdist.simulate(worker)(GRADS, optdist.replicate(tx.init(PARAMS), N))


def _compressor(config, impl):
    rank, warm_start, start_step = config
    return compressors.powersgd(rank, warm_start=warm_start, start_step=start_step, impl=impl)


@functools.cache
def _result(config, impl, fused=True):
    compressor = _compressor(config, impl)
    assert compressor.aggregate_ef is not None
    return _run(compressor if fused else compressor._replace(aggregate_ef=None))


def _expected_bytes(config):
    rank, _, start_step = config
    plain = [PARAMS[k] for k in ("d", "v", "s")]
    p_tree = [jnp.zeros((2, 24, rank)), jnp.zeros((1, 16, rank)), *plain]
    q_tree = [jnp.zeros((2, 16, rank)), jnp.zeros((1, 20, rank))]
    compressed = all_reduce_bytes(p_tree, N) + all_reduce_bytes(q_tree, N)
    exact = all_reduce_bytes(PARAMS, N)
    return sum(exact if t < start_step else compressed for t in range(T))


def _finite(tree):
    return all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(tree))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"r{c[0]}-warm{int(c[1])}-start{c[2]}")
def test_fused_xla_equals_the_unfused_path_and_bytes_are_exact(config):
    outs, errors, state = _result(config, "xla")
    ref_outs, ref_errors, ref_state = _result(config, "xla", fused=False)
    assert_trees_close(outs, ref_outs, rtol=1e-6, atol=1e-6)  # NaN where the reference has NaN
    assert_trees_close(errors, ref_errors, rtol=1e-6, atol=1e-6)
    assert_trees_close(state.aggregator.compressor, ref_state.aggregator.compressor, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(optdist.bytes_sent(state), optdist.bytes_sent(ref_state))
    np.testing.assert_array_equal(optdist.bytes_sent(state), [_expected_bytes(config)] * N)
    assert _finite((errors, state))  # the NaN never enters a state


@pytest.mark.parametrize("config", PALLAS_CONFIGS, ids=lambda c: f"r{c[0]}-warm{int(c[1])}")
def test_pallas_equals_xla(config):
    outs, errors, state = _result(config, "pallas")
    ref_outs, ref_errors, ref_state = _result(config, "xla")
    assert_trees_close(outs, ref_outs, rtol=1e-5, atol=1e-5)
    assert_trees_close(errors, ref_errors, rtol=1e-5, atol=1e-5)
    assert_trees_close(state.aggregator.compressor, ref_state.aggregator.compressor, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(optdist.bytes_sent(state), optdist.bytes_sent(ref_state))


def test_error_feedback_loses_nothing_and_the_non_finite_step_is_skipped():
    """sum_t mean_i sent_t + mean_i e_i,T = sum_t mean_i g_i,t over the finite steps (float64)."""
    outs, errors, _ = _result((2, True, 0), "pallas")
    ok = [t for t in range(T) if t != BAD_STEP]
    assert not np.isfinite(np.asarray(outs["a"][:, BAD_STEP])).all()
    assert _finite(jax.tree_util.tree_map(lambda o: o[:, ok], outs))
    # The skipped step keeps every worker's residual (the whole state) as it was.
    jax.tree_util.tree_map(
        lambda e: np.testing.assert_array_equal(e[:, BAD_STEP], e[:, BAD_STEP - 1]), errors
    )
    for k in SHAPES:
        sent = np.asarray(outs[k], np.float64)[:, ok]
        assert np.all(sent == sent[:1])  # every worker decodes the same mean
        fed = np.asarray(GRADS[k], np.float64)[:, ok].sum(1).mean(0)
        residual = np.asarray(errors[k][:, -1], np.float64).mean(0)
        np.testing.assert_allclose(sent[0].sum(0) + residual, fed, rtol=0, atol=5e-5)
    for k in ("d", "v", "s"):  # sent exactly: residual 0
        np.testing.assert_array_equal(errors[k], 0.0)
    for k in ("a", "b", "c"):  # compressed: per-worker residuals, not zero
        assert np.abs(np.asarray(errors[k][:, -1])).max() > 1e-2
        assert not optdist.is_replicated(errors[k][:, -1])


def test_auto_is_the_xla_path_on_cpu():
    from optdist_kernels import AUTO_BACKENDS

    assert jax.default_backend() == "cpu" and not any("cpu" in b for b in AUTO_BACKENDS.values())
    config = (2, False, 0)
    jax.tree_util.tree_map(np.testing.assert_array_equal, _result(config, "auto"), _result(config, "xla"))


def _count_kernels(compressor, tree, fused=True):
    state = compressor.init(tree)

    def step(x):
        args = (state, jax.random.key(0), jnp.int32(0), Channel(None))
        if fused:
            return compressor.aggregate_ef(x, x, *args)
        return compressor.aggregate(x, *args)

    return str(jax.make_jaxpr(step)(tree)).count("pallas_call")


@pytest.mark.parametrize(
    "orthogonalization, impl, fused, kernels",
    [
        ("auto", "pallas", True, 6),  # per group: ef_project, gram_schmidt, decode_residual
        ("qr", "pallas", True, 4),  # QR stays XLA
        ("auto", "pallas", False, 2),  # without EF only Gram-Schmidt is a kernel
        ("auto", "auto", True, 0),  # XLA on CPU
        ("auto", "xla", True, 0),
    ],
)
def test_which_steps_run_as_kernels(orthogonalization, impl, fused, kernels):
    compressor = compressors.powersgd(2, orthogonalization=orthogonalization, impl=impl)
    assert _count_kernels(compressor, PARAMS, fused) == kernels


def test_groups_the_kernels_cannot_take_fall_back_under_auto_and_raise_under_pallas():
    # Rank 9 > 8 (the kernels' limit): a 20x20 group, compressed with min_compression_rate=1.
    tree = {"m": jnp.zeros((20, 20)), "v": jnp.zeros(3)}
    key = jax.random.key(5)
    grads = {
        k: jax.random.normal(jax.random.fold_in(key, i), (N, *v.shape))
        for i, (k, v) in enumerate(tree.items())
    }

    def run(compressor):
        tx = optdist.compressed_mean(compressor, "data", feedback="ef")
        step = optdist.simulate(lambda g, s: tx.update(g, s, tree))
        state = optdist.replicate(tx.init(tree), N)
        for _ in range(2):
            out, state = step(grads, state)
        return out, state

    make = functools.partial(compressors.powersgd, 9, min_compression_rate=1.0)
    fused_out, fused = run(make(impl="auto"))
    plain_out, plain = run(make(impl="auto")._replace(aggregate_ef=None))
    assert_trees_close(fused_out, plain_out, rtol=1e-6, atol=1e-6)
    assert_trees_close(fused.aggregator.error, plain.aggregator.error, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(optdist.bytes_sent(fused), optdist.bytes_sent(plain))
    assert np.abs(np.asarray(fused.aggregator.error["m"])).max() > 1e-3  # it was compressed (rank 9 of 20)
    with pytest.raises(ValueError, match=r"impl='pallas'.*rank <= 8"):
        _count_kernels(make(impl="pallas"), tree)
    # Gram-Schmidt of a 16385 x 4 factor does not fit on chip (32768 * 4 > 2**16): "auto" runs XLA.
    big = {"m": jax.random.normal(key, (16385, 4))}
    gs = functools.partial(
        compressors.powersgd, 4, orthogonalization="gram_schmidt", min_compression_rate=0.5
    )
    assert _count_kernels(gs(impl="pallas"), {"m": jnp.zeros((8, 4))}) == 3  # a small factor: kernel
    with pytest.raises(ValueError, match=r"impl='pallas'.*Gram-Schmidt.*16385"):
        _count_kernels(gs(impl="pallas"), big)
    comp = gs(impl="auto")
    args = (comp.init(big), jax.random.key(0), jnp.int32(0), Channel(None))
    run = jax.jit(lambda x, e: comp.aggregate_ef(x, e, *args))  # the Channel is static (closed over)
    agg, new_error = run(big, jax.tree_util.tree_map(jnp.zeros_like, big))
    # Rank 4 of a 4-column matrix: exact recovery, residual ~ 0.
    np.testing.assert_allclose(agg.mean["m"], big["m"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(new_error["m"], 0.0, atol=1e-4)


def test_bad_impl_is_named():
    with pytest.raises(ValueError, match="impl"):
        compressors.powersgd(2, impl="triton")
    with pytest.raises(ValueError, match="impl"):
        optdist.powersgd(2, "data", impl="cuda")
