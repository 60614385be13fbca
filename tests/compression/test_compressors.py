"""Element-wise compressors: unbiasedness, contraction, exact bytes, structure, bad input."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optdist
from optdist import compression
from optdist.comm import Channel
from optdist.compression.demo import dct_matrix
from optdist.feedback import compressed_mean


def _aggregate(comp, x, key=None, state=None, step=0):
    """One worker (axis None), jitted: returns (mean, local, state)."""
    key = jax.random.key(0) if key is None else key
    state = comp.init(x) if state is None else state
    run = lambda x, s, k: comp.aggregate(x, s, k, jnp.int32(step), Channel(None))
    return jax.jit(run)(x, state, key)


@pytest.mark.parametrize(
    "comp",
    [
        compression.rand_k(0.25),
        compression.rand_k(0.3, sampling="uniform"),
        compression.qsgd(3, 8),
        compression.terngrad(None),
    ],
    ids=lambda c: c.name,
)
def test_unbiased(comp):
    x = {"v": jax.random.normal(jax.random.key(1), (40,)) * jnp.linspace(0.1, 3.0, 40)}
    keys = jax.random.split(jax.random.key(2), 4000)
    samples = jax.jit(jax.vmap(lambda k: _aggregate(comp, x, k).mean["v"]))(keys)
    samples = np.asarray(samples, np.float64)
    mean, std = samples.mean(0), samples.std(0)
    bound = 5.0 * std / np.sqrt(len(keys)) + 1e-6
    assert np.all(np.abs(mean - np.asarray(x["v"])) <= bound)
    assert np.any(std > 0.1)  # it is really random (a zero-variance bug would pass trivially)


def test_rand_k_stratified_keeps_one_per_stratum_scaled_by_its_size():
    x = {"v": jnp.arange(1.0, 11.0)}  # d = 10, k = 3: strata [0, 3), [3, 6), [6, 10)
    keys = jax.random.split(jax.random.key(5), 3000)
    cs = np.asarray(jax.jit(jax.vmap(lambda k: _aggregate(compression.rand_k(0.3), x, k).mean["v"]))(keys))
    strata = [(0, 3), (3, 6), (6, 10)]
    for lo, hi in strata:
        kept = cs[:, lo:hi] != 0
        np.testing.assert_array_equal(kept.sum(1), 1)  # exactly one coordinate per stratum
        rows, cols = np.nonzero(kept)
        np.testing.assert_allclose(cs[rows, lo + cols], (hi - lo) * np.arange(1.0, 11.0)[lo + cols])
        freq, p = kept.mean(0), 1.0 / (hi - lo)  # each coordinate kept with probability 1/|B|
        assert np.all(np.abs(freq - p) <= 5 * np.sqrt(p * (1 - p) / len(keys)))


def test_rand_k_independent_draws_average_over_workers():
    """shared=False: unbiased, with the variance (d/k - 1)/n^2 sum_i |x_i|^2 of n independent draws
    (the shared draw: (d/k - 1)|mean x|^2), and the same under simulate and data_parallel."""
    n, d, steps = 4, 40, 3000
    x = jax.random.normal(jax.random.key(0), (n, d)) + 2.0  # the workers agree on a common part
    xs = np.asarray(x, np.float64)

    def draws(comp, runner):
        tx = compressed_mean(comp, "data")

        def run(g, state):
            state, outs = jax.lax.scan(lambda s, _: tx.update(g, s)[::-1], state, None, length=steps)
            return outs

        return np.asarray(runner(run)(x, optdist.replicate(tx.init(jnp.zeros(d)), n)), np.float64)

    mesh = jax.make_mesh((n,), ("data",), devices=jax.devices()[:n])
    expected = {
        True: (d / 10 - 1) * np.sum(xs.mean(0) ** 2),
        False: (d / 10 - 1) * np.sum(xs**2) / n**2,
    }
    for shared in (True, False):
        comp = compression.rand_k(0.25, shared=shared)
        out = draws(comp, optdist.simulate)
        np.testing.assert_array_equal(out, out[:1].repeat(n, 0))  # every worker gets the same mean
        dev = out[0] - xs.mean(0)
        assert np.all(np.abs(dev.mean(0)) <= 5 * dev.std(0) / np.sqrt(steps)), shared
        np.testing.assert_allclose(np.sum(dev**2, 1).mean(), expected[shared], rtol=0.1)
        if not shared:
            dp = draws(comp, lambda f: optdist.data_parallel(f, mesh, "data"))
            np.testing.assert_allclose(dp, out, rtol=1e-6, atol=1e-6)
    assert expected[False] < 0.5 * expected[True]  # the regime where independent draws pay


def test_placing_decode_applies_the_mean_to_the_payload_bit_for_bit():
    """``summable(..., placing=True)`` (rand-k) divides the summed payload by ``n`` before a decode
    that only places entries: the same mean, bit for bit, as dividing the decoded vector."""
    from optdist.compression.base import summable

    idx = jnp.array([7, 2, 30, 11, 19])
    encode = lambda x, key, aux: {"values": x[idx] * 2.7}
    decode = lambda payload, size, key, aux: jnp.zeros((size,)).at[idx].set(payload["values"])
    x = jax.random.normal(jax.random.key(4), (3, 32)) * 1e3  # n = 3: 1/n is inexact
    key = jax.random.key(0)

    def mean(placing):
        comp = summable("placed", encode, decode, placing=placing)
        run = lambda g: comp.aggregate({"v": g}, (), key, jnp.int32(0), Channel("data")).mean["v"]
        return np.asarray(optdist.simulate(run, "data")(x))

    placed, divided = mean(True), mean(False)
    np.testing.assert_array_equal(placed, divided)
    assert np.count_nonzero(placed[0]) == len(idx)


def test_terngrad_clipping_is_biased_toward_zero():
    x = {"v": jnp.concatenate([jnp.full((1,), 50.0), jnp.ones((63,))])}
    keys = jax.random.split(jax.random.key(3), 512)
    samples = jax.jit(jax.vmap(lambda k: _aggregate(compression.terngrad(2.5), x, k).mean["v"]))(keys)
    assert float(samples[:, 0].mean()) < 0.5 * 50.0  # the outlier is clipped at 2.5 sigma


@pytest.mark.parametrize("ratio", [0.05, 0.3, 0.45])  # (beyond 0.5 the payload is larger: sent plain)
def test_top_k_contraction(ratio):
    xs = jax.random.normal(jax.random.key(4), (6, 50)) ** 3
    cs = jax.jit(jax.vmap(lambda x: _aggregate(compression.top_k(ratio), {"v": x}).mean["v"]))(xs)
    k = math.ceil(ratio * 50)
    np.testing.assert_array_equal(jnp.sum(cs != 0, axis=1), [k] * 6)
    err = jnp.sum((cs - xs) ** 2, axis=1)
    np.testing.assert_array_less(err, (1 - k / 50) * jnp.sum(xs**2, axis=1) * (1 + 1e-6))
    # The bound is attained when all |x_j| are equal.
    flat = jnp.where(jnp.arange(50) % 3 == 0, -2.0, 2.0)
    c = _aggregate(compression.top_k(ratio), {"v": flat}).mean["v"]
    np.testing.assert_allclose(jnp.sum((c - flat) ** 2), (1 - k / 50) * 200.0, rtol=1e-6)


def test_scaled_sign_contraction_is_tight():
    xs = jax.random.normal(jax.random.key(5), (5, 37)) ** 3
    cs = jax.jit(jax.vmap(lambda x: _aggregate(compression.sign(), {"v": x}).mean["v"]))(xs)
    x64, c64 = np.asarray(xs, np.float64), np.asarray(cs, np.float64)
    delta = np.sum(np.abs(x64), 1) ** 2 / (37 * np.sum(x64**2, 1))
    np.testing.assert_allclose(np.sum((c64 - x64) ** 2, 1), (1 - delta) * np.sum(x64**2, 1), rtol=1e-5)


def test_threshold_top_k_finds_clear_top_k_without_sorting():
    key = jax.random.key(6)
    x = jax.random.normal(key, (1000,))
    big = jax.random.choice(jax.random.fold_in(key, 1), 1000, (50,), replace=False)
    x = x.at[big].set(20.0 + jnp.arange(50.0))
    exact = _aggregate(compression.top_k(0.05), {"v": x}).mean["v"]
    approx = _aggregate(compression.top_k(0.05, "threshold"), {"v": x}).mean["v"]
    np.testing.assert_array_equal(approx, exact)


def test_majority_vote():
    comp = compression.sign(scaled=False)
    x = jnp.array([[1.0, -2, 3, -0.5], [2.0, 1, -1, -1], [-3.0, -1, 2, -2]])
    step = optdist.simulate(lambda v: comp.aggregate({"v": v}, (), jax.random.key(0), 0, Channel("data"))[0])
    np.testing.assert_array_equal(step(jnp.tile(x, (1, 8)))["v"][0], jnp.tile(jnp.array([1.0, -1, 1, -1]), 8))


def test_cast_fp8_scales_into_range():
    x = {"v": jax.random.normal(jax.random.key(7), (64, 8)) * 1e4}
    for dtype, rel in [(jnp.float8_e4m3fn, 0.07), (jnp.float8_e5m2, 0.13), (jnp.float16, 1e-3)]:
        mean = _aggregate(compression.cast(dtype), x).mean["v"]
        assert np.isfinite(np.asarray(mean)).all()
        np.testing.assert_allclose(mean, x["v"], rtol=rel, atol=0)


def _np_demo_reference(m, chunk, topk):
    """float64 DeMo step on a matrix: tiles of the largest divisors <= chunk, 2-D DCT, top-k per tile."""
    rows, cols = m.shape
    h = max(c for c in range(1, min(rows, chunk) + 1) if rows % c == 0)
    w = max(c for c in range(1, min(cols, chunk) + 1) if cols % c == 0)
    dh, dw = dct_matrix(h), dct_matrix(w)
    sent = np.zeros_like(m)
    for i in range(0, rows, h):
        for j in range(0, cols, w):
            coef = dh @ m[i : i + h, j : j + w] @ dw.T
            keep = np.zeros(coef.size, bool)
            keep[np.argsort(-np.abs(coef).ravel(), kind="stable")[: min(topk, h * w)]] = True
            sent[i : i + h, j : j + w] = dh.T @ np.where(keep.reshape(coef.shape), coef, 0.0) @ dw
    return sent


def test_demo_matches_float64_reference_of_2d_tiles_and_conserves_momentum():
    basis = dct_matrix(8)
    np.testing.assert_allclose(basis @ basis.T, np.eye(8), atol=1e-12)
    comp = compression.demo(chunk=8, topk=3, beta=0.9)
    # A 12 x 10 leaf: tiles of 6 x 5 (largest divisors <= 8), 2-D DCT, top-3 of 30 per tile.
    x = {"v": jax.random.normal(jax.random.key(8), (12, 10))}
    m_old = jax.random.normal(jax.random.key(9), (12, 10))
    mean, local, new = _aggregate(comp, x, state=(m_old,))
    m = 0.9 * np.asarray(m_old, np.float64) + np.asarray(x["v"], np.float64)
    want = _np_demo_reference(m, 8, 3)
    np.testing.assert_allclose(local["v"], want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(mean["v"], want, rtol=1e-4, atol=1e-5)  # one worker: mean = own
    np.testing.assert_allclose(new[0] + local["v"], m, atol=1e-5)  # what stays + what was sent
    # Tiles whose spectrum has <= 3 coefficients are sent exactly; a vector is one row of tiles.
    coef = np.zeros((4, 8))
    coef[:, [0, 3, 6]] = np.random.default_rng(0).normal(size=(4, 3))
    v = {"v": jnp.asarray((coef @ basis).reshape(32), jnp.float32)}
    mean, _, state = _aggregate(comp, v)
    np.testing.assert_allclose(mean["v"], v["v"], atol=1e-5)
    np.testing.assert_allclose(state[0], 0.0, atol=1e-5)


N = 4
D = 200  # leaf "w" (20, 10); "s" a scalar (stays uncompressed)


def _expected_bytes(name):
    """Hand-computed payload sizes x collective factor: checks the payloads really are encoded so."""
    gather = lambda b: (N - 1) * b
    ring = lambda elems, size: 2 * (N - 1) * -(-elems // N) * size
    plain = ring(1, 4)  # the scalar leaf's own all-reduce (gathered protocols)
    return {
        "top_k": gather(20 * 4 + 20 * 4) + plain,
        "top_k_threshold": gather(20 * 4 + 20 * 4 + 4) + plain,
        "rand_k": ring(20 + 1, 4),  # summed values + the scalar, one buffer
        "rand_k_independent": gather(20 * 4 + 8) + plain,  # own values + own 8-byte key
        "qsgd": gather(4 * 64 * 1 + 4 * 4) + plain,  # int8 levels (s=7), 4 buckets of 64, f32 norms
        "qsgd_int16": gather(4 * 64 * 2 + 4 * 4) + plain,
        "terngrad": gather(2 * 25 + 4) + plain,
        "sign": gather(25 + 4) + plain,
        "sign_vote": gather(25) + plain,
        "bf16": ring(D, 2) + ring(1, 4),  # two dtype buffers in one all-reduce
        "fp8": ring(D, 1) + ring(1, 4) + ring(1, 4),  # + the shared-scale pmax (one float32 per leaf)
        "demo": gather(8 * 2 * 4 + 8 * 2 * 1) + plain,  # 20x10 in 8 tiles of 5x5, top-2: f32, uint8 idx
    }[name]


COMPRESSORS = {
    "top_k": compression.top_k(0.1),
    "top_k_threshold": compression.top_k(0.1, "threshold"),
    "rand_k": compression.rand_k(0.1),
    "rand_k_independent": compression.rand_k(0.1, shared=False),
    "qsgd": compression.qsgd(7, 64),
    "qsgd_int16": compression.qsgd(300, 64),
    "terngrad": compression.terngrad(),
    "sign": compression.sign(),
    "sign_vote": compression.sign(scaled=False),
    "bf16": compression.cast(jnp.bfloat16),
    "fp8": compression.cast("float8_e4m3fn"),
    "demo": compression.demo(8, 2),
}


@pytest.mark.parametrize("name", sorted(COMPRESSORS))
def test_exact_bytes(name):
    comp = COMPRESSORS[name]
    params = {"w": jnp.zeros((20, 10)), "s": jnp.zeros(())}
    tx = compressed_mean(comp, "data", feedback="ef")
    grads = {
        "w": jax.random.normal(jax.random.key(10), (N, 20, 10)),
        "s": jnp.arange(N, dtype=jnp.float32),
    }
    step = optdist.simulate(lambda g, s: tx.update(g, s, params))
    out, state = step(grads, optdist.replicate(tx.init(params), N))
    np.testing.assert_array_equal(optdist.bytes_sent(state), [_expected_bytes(name)] * N)
    np.testing.assert_allclose(out["s"], [1.5] * N)  # the uncompressed scalar: exact mean


def test_structure_shapes_and_dtypes_survive():
    tree = {"a": jnp.ones((16, 8), jnp.bfloat16), "b": (jnp.ones((3, 4, 5)), jnp.ones((7,)))}
    comps = [*COMPRESSORS.values(), compression.powersgd(2, min_compression_rate=1.0)]
    states = [c.init(tree) for c in comps]

    @jax.jit
    def run_all(tree, states):
        key = jax.random.key(0)
        return [c.aggregate(tree, s, key, 0, Channel(None))[:2] for c, s in zip(comps, states)]

    for comp, (mean, local) in zip(comps, run_all(tree, states)):
        for result in (mean, local):
            assert jax.tree_util.tree_structure(result) == jax.tree_util.tree_structure(tree), comp.name
            for r, t in zip(jax.tree_util.tree_leaves(result), jax.tree_util.tree_leaves(tree)):
                assert r.shape == t.shape and r.dtype == t.dtype, comp.name
        assert np.isfinite(np.asarray(mean["a"], np.float32)).all()


def test_bad_arguments_are_named():
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="ratio"):
            compression.top_k(bad)
        with pytest.raises(ValueError, match="ratio"):
            compression.rand_k(bad)
    with pytest.raises(TypeError, match="shared"):
        compression.rand_k(0.1, shared="no")
    with pytest.raises(ValueError, match="method"):
        compression.top_k(0.1, method="approx")
    with pytest.raises(ValueError, match="levels"):
        compression.qsgd(0)
    with pytest.raises(ValueError, match="bucket_size"):
        compression.qsgd(4, 0)
    with pytest.raises(ValueError, match="clip_sigma"):
        compression.terngrad(0.0)
    with pytest.raises(ValueError, match="dtype"):
        compression.cast(jnp.int8)
    with pytest.raises(ValueError, match="dtype"):
        compression.cast("float32")
    with pytest.raises(ValueError, match="topk"):
        compression.demo(chunk=8, topk=0)
    with pytest.raises(ValueError, match="beta"):
        compression.demo(beta=1.0)
    with pytest.raises(TypeError, match="scaled"):
        compression.sign(scaled="yes")
    with pytest.raises(TypeError, match="floating"):
        _aggregate(compression.top_k(0.5), {"v": jnp.ones((8,), jnp.int32)})


@pytest.mark.parametrize(
    "make",
    [
        lambda: compression.top_k(0.02),
        lambda: compression.top_k(0.02, "threshold"),
        lambda: compression.chunked_top_k(0.2, 64, value_bits=4),
    ],
    ids=["top_k", "top_k_threshold", "chunked_top_k"],
)
def test_sparse_mean_on_a_mesh_accumulates_into_one_buffer(make):
    """On a mesh each worker decodes every worker's payload: the mean is scatter-added worker by worker
    into one leaf-sized buffer (no (workers, size) stack of decoded payloads), with the same bits as
    simulated workers, which decode one shared stack. The workers' top coordinates overlap, so the
    order of the additions matters; the leaf's last 64-chunk has 2 entries, so chunked top-k also
    selects padding, which is dropped."""
    workers, size = 4, 64 * 93 + 2
    key = jax.random.key(5)
    shared = jax.random.normal(key, (size,)) * (jnp.arange(size) % 50 == 0) * 10
    grads = {"w": shared + jax.random.normal(jax.random.fold_in(key, 1), (workers, size))}
    params = {"w": jnp.zeros((size,))}
    tx = compressed_mean(make(), "data")
    state = optdist.replicate(tx.init(params), workers)
    fn = lambda g, s: tx.update(g, s, params)  # noqa: E731
    mesh = jax.make_mesh((workers,), ("data",), devices=jax.devices()[:workers])
    on_mesh = jax.jit(optdist.data_parallel(fn, mesh, "data")).lower(grads, state).compile()
    stacks = re.findall(rf"f32\[{workers},([\d,]+)\]", on_mesh.as_text())
    assert not [d for d in stacks if math.prod(map(int, d.split(","))) >= size], stacks
    got, got_state = on_mesh(grads, state)
    want, want_state = optdist.simulate(fn, "data")(grads, state)
    np.testing.assert_array_equal(got["w"], want["w"])
    np.testing.assert_array_equal(optdist.bytes_sent(got_state), optdist.bytes_sent(want_state))
    overlap = np.asarray(jnp.abs(grads["w"]).argsort(1)[:, -int(0.02 * size) :])
    assert len(set.intersection(*map(set, overlap))) > 10


def test_gathered_refuses_accumulate_with_another_combine():
    from optdist.compression.base import gathered

    with pytest.raises(ValueError, match="accumulate= applies to the default mean"):
        gathered("x", lambda x, k: x, lambda p, n: p, combine=lambda s: s[0], accumulate=lambda p, a: a + p)
