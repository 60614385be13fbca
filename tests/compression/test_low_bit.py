"""Low-bit codecs: exact round trip on the grid, unbiasedness, packed bytes, SparseLoCo's codec."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optdist
from optdist import compressors
from optdist.comm import Channel
from optdist.compression.low_bit import grid_levels, pack_codes, unpack_codes

N = 4


def _one_worker(comp, x, key=0):
    """(mean, local) of one worker's encode/decode (no communication)."""
    agg = comp.aggregate({"x": x}, comp.init({"x": x}), jax.random.key(key), 0, Channel(None))
    return agg.mean["x"], agg.local["x"]


@pytest.mark.parametrize("bits", [2, 4, 8, 12])
def test_pack_codes_round_trip(bits):
    codes = jax.random.randint(jax.random.key(bits), (37,), 0, 2**bits)
    packed = pack_codes(codes, bits)
    assert packed.dtype == jnp.uint8 and packed.size == math.ceil(37 * bits / 8)
    np.testing.assert_array_equal(unpack_codes(packed, 37, bits), codes)


@pytest.mark.parametrize(
    "bits, grid", [(8, "symmetric"), (4, "symmetric"), (4, "e2m1"), (2, "uniform"), (2, "symmetric")]
)
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_values_on_the_grid_round_trip_exactly(bits, grid, rounding):
    levels = grid_levels(bits, grid)
    chunk = 16
    rng = np.random.default_rng(0)
    scales = np.array([2.0, 0.5, 3.0])
    codes = rng.integers(0, len(levels), (3, chunk))
    codes[:, 0] = len(levels) - 1  # the max sets each chunk's scale
    x = (levels[codes] * scales[:, None]).reshape(-1).astype(np.float32)
    comp = compressors.quantize(bits, grid, chunk_size=chunk, rounding=rounding)
    _, local = _one_worker(comp, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(local), x, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bits, grid", [(8, "symmetric"), (4, "e2m1"), (2, "uniform")])
def test_stochastic_rounding_is_unbiased(bits, grid):
    x = jax.random.normal(jax.random.key(1), (64,))
    comp = compressors.quantize(bits, grid, chunk_size=16)
    trials = 4000
    decode = jax.jit(jax.vmap(lambda k: _one_worker_key(comp, x, k)))
    samples = np.asarray(decode(jax.random.split(jax.random.key(2), trials)), np.float64)
    mean, se = samples.mean(0), samples.std(0) / np.sqrt(trials)
    assert np.all(np.abs(mean - np.asarray(x)) <= 5 * se + 1e-6)
    assert samples.std(0).max() > 0  # really stochastic


def _one_worker_key(comp, x, key):
    agg = comp.aggregate({"x": x}, (), key, 0, Channel(None))
    return agg.local["x"]


def test_nearest_rounding_error_is_half_a_step():
    x = jax.random.normal(jax.random.key(3), (256,))
    comp = compressors.quantize(4, "symmetric", chunk_size=64, rounding="nearest")
    _, local = _one_worker(comp, x)
    scale = np.abs(np.asarray(x).reshape(4, 64)).max(1, keepdims=True)
    err = np.abs(np.asarray(local) - np.asarray(x)).reshape(4, 64)
    assert np.all(err <= scale / 7 / 2 + 1e-6)


def test_sigma_range_clips_outliers():
    x = jnp.concatenate([jax.random.normal(jax.random.key(4), (511,)), jnp.array([100.0])])
    comp = compressors.quantize(8, scale="sigma", sigmas=6.0, rounding="nearest")
    _, local = _one_worker(comp, x)
    bound = 6.0 * float(jnp.std(x))
    assert float(local[-1]) == pytest.approx(bound, rel=1e-6)
    np.testing.assert_allclose(np.asarray(local[:-1]), np.asarray(x[:-1]), atol=bound / 127 / 2 + 1e-6)


def test_bytes_are_the_packed_payload_times_the_gather_factor():
    tree = {"w": jnp.ones((4, 300)), "b": jnp.ones((5,))}  # b: 5 entries, one chunk each
    cases = [
        (compressors.quantize(4, chunk_size=256), math.ceil(1200 * 4 / 8) + 5 * 4, math.ceil(5 * 4 / 8) + 4),
        (compressors.quantize(2, chunk_size=256), 1200 * 2 // 8 + 5 * 4, math.ceil(5 * 2 / 8) + 4),
        # 5% of 256 -> 13 per chunk, 5 chunks (the last padded): 2-bit values, 8-bit indices.
        (
            compressors.chunked_top_k(0.05, 256),
            math.ceil(65 * 2 / 8) + 65 + 5 * 4,
            math.ceil(1 * 2 / 8) + 1 + 4,
        ),
    ]
    for comp, w_bytes, b_bytes in cases:
        tx = optdist.compressed_mean(comp, "data")
        state = optdist.replicate(tx.init(tree), N)
        _, state = optdist.simulate(lambda g, s, tx=tx: tx.update(g, s))(optdist.replicate(tree, N), state)
        np.testing.assert_array_equal(optdist.bytes_sent(state), [(N - 1) * (w_bytes + b_bytes)] * N)


def test_chunked_top_k_keeps_the_largest_per_chunk_with_12_bit_indices():
    x = jax.random.normal(jax.random.key(5), (2 * 4096,))
    comp = compressors.chunked_top_k(0.01, 4096, value_bits=8, grid="symmetric")
    payload = jax.eval_shape(lambda: comp.codec.encode({"x": x}, jax.random.key(0)))
    k = math.ceil(0.01 * 4096)
    assert payload[0]["indices"].shape == (math.ceil(2 * k * 12 / 8),)  # 12 bits per index
    _, local = _one_worker(comp, x)
    xs, ls = np.asarray(x).reshape(2, 4096), np.asarray(local).reshape(2, 4096)
    for row, dec in zip(xs, ls):
        kept = np.argsort(-np.abs(row))[:k]
        assert set(np.flatnonzero(dec)) == set(kept)
        np.testing.assert_allclose(dec[kept], row[kept], atol=np.abs(row).max() / 127 / 2 + 1e-6)


def test_chunked_top_k_shares_one_scale_per_scale_group():
    """Chunks of 8 (3-bit indices), one float32 scale per 32 entries: the 4 chunks of a group are
    scaled by the group's largest kept magnitude; the last group is short (5 chunks)."""
    x = jax.random.normal(jax.random.key(7), (40,))
    comp = compressors.chunked_top_k(0.25, 8, value_bits=8, grid="symmetric", scale_size=32)
    payload = jax.eval_shape(lambda: comp.codec.encode({"x": x}, jax.random.key(0)))[0]
    assert payload["scale"].shape == (2,)
    assert payload["indices"].shape == (math.ceil(5 * 2 * 3 / 8),)
    _, local = _one_worker(comp, x)
    rows = np.asarray(x, np.float64).reshape(5, 8)
    keep = np.argsort(-np.abs(rows), axis=1)[:, :2]
    kept = np.take_along_axis(rows, keep, axis=1)
    s = np.repeat([np.abs(kept[:4]).max(), np.abs(kept[4:]).max()], [4, 1])[:, None]
    want = np.zeros_like(rows)
    np.put_along_axis(want, keep, np.round(kept / s * 127) / 127 * s, axis=1)
    np.testing.assert_allclose(np.asarray(local), want.reshape(-1), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="scale_size"):
        compressors.chunked_top_k(0.25, 8, scale_size=12)


def test_sparseloco_aggregator_matches_float64_reference():
    """compressed(chunked_top_k, "ef", error_decay=β): e <- βe + Δ; send Q(TopK(e)); e <- e - sent."""
    beta, rounds = 0.9, 4
    comp = compressors.chunked_top_k(0.25, 8, value_bits=8, grid="symmetric")
    agg = optdist.aggregation.compressed(comp, feedback="ef", error_decay=beta)
    tx = optdist.comm.as_transform(agg, "data")
    deltas = jax.random.normal(jax.random.key(6), (rounds, N, 16))
    state = optdist.replicate(tx.init({"x": deltas[0, 0]}), N)
    step = jax.jit(optdist.simulate(lambda g, s: tx.update({"x": g}, s)))
    e = np.zeros((N, 16))
    for r in range(rounds):
        out, state = step(deltas[r], state)
        p = beta * e + np.asarray(deltas[r], np.float64)
        sent = np.zeros_like(p)
        for i in range(N):
            for c in range(2):
                row = p[i, 8 * c : 8 * c + 8]
                keep = np.argsort(-np.abs(row))[:2]
                s = np.abs(row[keep]).max()
                sent[i, 8 * c + keep] = np.round(row[keep] / s * 127) / 127 * s
        e = p - sent
        np.testing.assert_allclose(np.asarray(out["x"])[0], sent.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(state.aggregator.error["x"]), e, rtol=1e-5, atol=1e-5)


def test_cyclic_top_k_with_decayed_ef_matches_float64_reference():
    """Round t: the leader t mod n picks each chunk's top-k of its own p = βe + Δ; every worker sends
    its p at those positions (8-bit symmetric, its own chunk scale); e <- p - sent. The indices
    travel once (a uint8 all-reduce), the values and scales are all-gathered."""
    beta, rounds, size = 0.9, 5, 16
    comp = compressors.cyclic_top_k(0.25, 8, value_bits=8, grid="symmetric")
    agg = optdist.aggregation.compressed(comp, feedback="ef", error_decay=beta)
    tx = optdist.comm.as_transform(agg, "data")
    deltas = jax.random.normal(jax.random.key(8), (rounds, N, size))
    state = optdist.replicate(tx.init({"x": deltas[0, 0]}), N)
    step = jax.jit(optdist.simulate(lambda g, s: tx.update({"x": g}, s)))
    e = np.zeros((N, size))
    for r in range(rounds):
        out, state = step(deltas[r], state)
        p = beta * e + np.asarray(deltas[r], np.float64)
        sent = np.zeros_like(p)
        for c in range(2):
            cols = slice(8 * c, 8 * c + 8)
            keep = np.argsort(-np.abs(p[r % N, cols]))[:2]
            for i in range(N):
                kept = p[i, cols][keep]
                s = np.abs(kept).max()
                sent[i, 8 * c + keep] = np.round(kept / s * 127) / 127 * s
        e = p - sent
        np.testing.assert_allclose(np.asarray(out["x"])[0], sent.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(state.aggregator.error["x"]), e, rtol=1e-5, atol=1e-5)
    indices = jnp.zeros(math.ceil(2 * 2 * 3 / 8), jnp.uint8)  # 2 chunks x 2 kept x 3 bits
    values_and_scales = 2 * 2 * 1 + 2 * 4
    per_round = optdist.comm.accounting.all_reduce_bytes([indices], N) + (N - 1) * values_and_scales
    np.testing.assert_array_equal(optdist.bytes_sent(state), [rounds * per_round] * N)


def test_cyclic_top_k_with_summed_values_matches_float64_reference():
    """values="summed": the leader's positions, one scale per chunk (the max over workers of the
    chunk's largest magnitude), codes -L..L with L = 127 // n summed exactly by an int8 all-reduce."""
    size, top = 16, 127 // N
    comp = compressors.cyclic_top_k(0.25, 8, values="summed")
    tx = optdist.comm.as_transform(optdist.aggregation.compressed(comp, feedback="ef"), "data")
    deltas = jax.random.normal(jax.random.key(9), (3, N, size))
    state = optdist.replicate(tx.init({"x": deltas[0, 0]}), N)
    step = jax.jit(optdist.simulate(lambda g, s: tx.update({"x": g}, s)))
    e = np.zeros((N, size))
    for r in range(3):
        out, state = step(deltas[r], state)
        p = e + np.asarray(deltas[r], np.float64)
        sent = np.zeros_like(p)
        for c in range(2):
            cols = slice(8 * c, 8 * c + 8)
            keep = 8 * c + np.argsort(-np.abs(p[r % N, cols]))[:2]
            s = np.abs(p[:, cols]).max()
            sent[:, keep] = np.clip(np.floor(p[:, keep] / s * top + 0.5), -top, top) * s / top
        e = p - sent
        np.testing.assert_allclose(np.asarray(out["x"])[0], sent.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(state.aggregator.error["x"]), e, rtol=1e-5, atol=1e-5)
    ring = optdist.comm.accounting.all_reduce_bytes
    indices, scales, codes = jnp.zeros(2, jnp.uint8), jnp.zeros(2, jnp.float32), jnp.zeros(4, jnp.int8)
    per_round = ring([indices], N) + ring([scales], N) + ring([codes], N)
    np.testing.assert_array_equal(optdist.bytes_sent(state), [3 * per_round] * N)


def _summed_reference(x, bits, chunk, noise):
    """float64 :func:`quantize` with exchange="summed": shared chunk scales (max over workers),
    unsigned codes u = floor((x / s + 1) M / 2 + noise), M = (2^b - 1) // n,
    mean s (2 sum_i u / (n M) - 1)."""
    n, d = x.shape
    top = (2**bits - 1) // n
    rows = -(-d // chunk)
    pad = np.zeros((n, rows * chunk))
    pad[:, :d] = x
    s = np.abs(pad.reshape(n, rows, chunk)).max(axis=(0, 2)).repeat(chunk)[:d]
    u = np.clip(np.floor((x / s + 1.0) * top / 2 + noise), 0, top)
    return s * (2 * u / top - 1), s * (2 * u.sum(0) / (n * top) - 1)


@pytest.mark.parametrize("bits", [8, 4])
def test_summed_quantize_matches_float64_reference_and_counts_the_integer_all_reduce(bits):
    n, d, chunk = (N, 40, 16) if bits == 8 else (3, 40, 16)
    comp = compressors.quantize(bits, chunk_size=chunk, rounding="nearest", exchange="summed")
    x = jax.random.normal(jax.random.key(11), (n, d))
    tx = optdist.compressed_mean(comp, "data")
    state = optdist.replicate(tx.init({"x": x[0], "b": x[0, 0]}), n)
    out, state = jax.jit(optdist.simulate(lambda g, b, s: tx.update({"x": g, "b": b}, s)))(x, x[:, 0], state)
    local, mean = _summed_reference(np.asarray(x, np.float64), bits, chunk, 0.5)
    np.testing.assert_allclose(np.asarray(out["x"])[0], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        np.asarray(out["b"])[0], np.asarray(x[:, 0]).mean(), rtol=1e-6
    )  # a scalar: plain
    agg = jax.jit(
        optdist.simulate(lambda v: comp.aggregate({"x": v}, (), jax.random.key(0), 0, Channel("data")))
    )(x)
    np.testing.assert_allclose(np.asarray(agg.local["x"]), local, rtol=1e-5, atol=1e-6)
    ring = optdist.comm.accounting.all_reduce_bytes
    codes = jnp.zeros(math.ceil(d * bits / 8), jnp.uint8)  # the packed codes, summed as bytes
    scales = jnp.zeros(-(-d // chunk), jnp.float32)
    expected = ring([codes], n) + ring([scales], n) + ring([jnp.zeros((), jnp.float32)], n)
    np.testing.assert_array_equal(optdist.bytes_sent(state), [expected] * n)


def _assert_mean_is_unbiased(comp, x, seed, trials=3000):
    """Over ``trials`` shared keys, the decoded mean of ``comp`` over the rows of ``x`` (one per worker)
    averages to the exact mean within 5 standard errors per entry, and really varies."""
    run = optdist.simulate(lambda v, k: comp.aggregate({"x": v}, (), k, 0, Channel("data")).mean["x"])
    keys = jax.random.split(jax.random.key(seed), trials)
    n = x.shape[0]
    samples = np.asarray(jax.jit(jax.vmap(lambda k: run(x, jnp.broadcast_to(k, (n,)))[0]))(keys), np.float64)
    mean, se = samples.mean(0), samples.std(0) / np.sqrt(trials)
    assert np.all(np.abs(mean - np.asarray(x, np.float64).mean(0)) <= 5 * se + 1e-6)
    assert samples.std(0).max() > 0


def test_summed_quantize_is_unbiased_and_int8_sends_a_quarter_of_the_float32_all_reduce():
    comp = compressors.quantize(8, chunk_size=16, exchange="summed")
    _assert_mean_is_unbiased(comp, jax.random.normal(jax.random.key(12), (N, 64)), seed=13)
    big = {"w": jnp.ones((4096,))}
    for exchange, ratio in (("summed", 4.0), ("gathered", 1.0)):
        tx = optdist.compressed_mean(compressors.quantize(8, chunk_size=4096, exchange=exchange), "data")
        state = optdist.replicate(tx.init(big), 8)
        _, state = optdist.simulate(lambda g, s, tx=tx: tx.update(g, s))(optdist.replicate(big, 8), state)
        exact = optdist.comm.accounting.all_reduce_bytes([big["w"]], 8)
        assert exact / int(optdist.bytes_sent(state)[0]) == pytest.approx(ratio, rel=0.01)


def _requantized_reference(x, bits, grid, chunk):
    """float64 :func:`quantize` with exchange="requantized", nearest rounding: each worker encodes its n
    shards (a scale per chunk of a shard), the owner of shard j averages the n decodings and encodes that
    mean again. Returns (local, mean)."""
    levels = grid_levels(bits, grid)
    n, d = x.shape
    m = -(-d // n)

    def code(v):  # one shard, nearest level per chunk of ``chunk`` entries
        out = np.zeros_like(v)
        for c in range(0, v.size, chunk):
            part = v[c : c + chunk]
            s = np.abs(part).max()
            y = part / (s if s > 0 else 1.0)
            out[c : c + chunk] = levels[np.abs(y[:, None] - levels[None, :]).argmin(1)] * s
        return out

    shards = np.zeros((n, n * m))
    shards[:, :d] = x
    shards = shards.reshape(n, n, m)  # [worker, shard, entry]
    first = np.stack([[code(shards[i, j]) for j in range(n)] for i in range(n)])
    mean = np.concatenate([code(first[:, j].mean(0)) for j in range(n)])[:d]
    return first.reshape(n, n * m)[:, :d], mean


@pytest.mark.parametrize("bits, grid", [(8, "symmetric"), (4, "e2m1")])
def test_requantized_quantize_matches_float64_reference_and_counts_both_halves(bits, grid):
    n, d, chunk = N, 37, 4  # 10 entries a shard (the leaf zero-padded to 40): chunks of 4, 4, 2
    comp = compressors.quantize(bits, grid, chunk_size=chunk, rounding="nearest", exchange="requantized")
    x = jax.random.normal(jax.random.key(14), (n, d)) * jnp.linspace(0.1, 3.0, d)
    agg = jax.jit(
        optdist.simulate(lambda v: comp.aggregate({"x": v}, (), jax.random.key(0), 0, Channel("data")))
    )(x)
    local, mean = _requantized_reference(np.asarray(x, np.float64), bits, grid, chunk)
    np.testing.assert_allclose(np.asarray(agg.mean["x"]), np.broadcast_to(mean, (n, d)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(agg.local["x"]), local, rtol=1e-5, atol=1e-6)
    tx = optdist.compressed_mean(comp, "data")
    state = optdist.replicate(tx.init({"x": x[0]}), n)
    _, state = optdist.simulate(lambda g, s: tx.update({"x": g}, s))(x, state)
    shard = math.ceil(10 * bits / 8) + 3 * 4  # one worker's encoding of one shard: codes + 3 scales
    np.testing.assert_array_equal(optdist.bytes_sent(state), [2 * (n - 1) * shard] * n)  # all_to_all + gather


def test_requantized_quantize_is_unbiased():
    comp = compressors.quantize(4, "e2m1", chunk_size=8, exchange="requantized")
    _assert_mean_is_unbiased(comp, jax.random.normal(jax.random.key(15), (N, 32)), seed=16)


def test_all_to_all_checks_its_rows():
    bad = optdist.simulate(lambda v: Channel("data").all_to_all(v))
    with pytest.raises(ValueError, match="leading axis of size n = 4"):
        bad(jnp.ones((4, 3)))
    rows = optdist.simulate(lambda v: Channel("data").all_to_all(v))(jnp.arange(16.0).reshape(4, 4, 1))
    np.testing.assert_array_equal(np.asarray(rows)[..., 0], np.arange(16.0).reshape(4, 4).T)


def test_bad_arguments_name_the_parameter():
    with pytest.raises(ValueError, match="bits"):
        compressors.quantize(3)
    with pytest.raises(ValueError, match="e2m1"):
        compressors.quantize(2, "e2m1")
    with pytest.raises(ValueError, match="grid"):
        compressors.quantize(4, "fp8")
    with pytest.raises(ValueError, match="density"):
        compressors.chunked_top_k(0.0)
    with pytest.raises(ValueError, match="rounding"):
        compressors.chunked_top_k(0.1, rounding="up")
    with pytest.raises(ValueError, match="density"):
        compressors.cyclic_top_k(1.5)
    with pytest.raises(ValueError, match="values"):
        compressors.cyclic_top_k(0.1, values="mean")
    summed = compressors.cyclic_top_k(0.5, 4, values="summed")
    x = jnp.ones((128, 8))
    with pytest.raises(ValueError, match="127 workers"):  # the int8 sum of 128 codes could overflow
        optdist.simulate(lambda v: summed.aggregate({"x": v}, (), jax.random.key(0), 0, Channel("data")))(x)
    with pytest.raises(ValueError, match="exchange"):
        compressors.quantize(8, exchange="reduced")
    with pytest.raises(ValueError, match="grid=None"):
        compressors.quantize(4, "e2m1", exchange="summed")
    summed4 = compressors.quantize(4, exchange="summed")
    with pytest.raises(ValueError, match="n <= 15"):  # 16 workers' 4-bit codes could carry
        optdist.simulate(lambda v: summed4.aggregate({"x": v}, (), jax.random.key(0), 0, Channel("data")))(
            jnp.ones((16, 8))
        )
    with pytest.raises(ValueError, match="error_decay"):
        optdist.aggregation.compressed(compressors.top_k(0.1), feedback="ef21", error_decay=0.5)
