"""The Gaussian sketch: unbiased (E[R^T R g] = g) with the stated variance, a float64 NumPy reference of
the aggregated estimate, exact bytes, private noise."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optdist
from optdist import compressors
from optdist.comm.channel import Channel
from optdist.compression.base import leaf_keys
from optdist.compression.sketch import sketch_shape

WORKERS = 4


def one_worker(compressor, x, key):
    return compressor.aggregate(x, (), key, jnp.int32(0), Channel(None)).mean


def projections(key, size, ratio, block_size, seed=0, leaf=0, num_leaves=1):
    """The R_j the sketch draws for a leaf (the same jax random numbers), as float64."""
    blocks, block, rows = sketch_shape(size, ratio, block_size)
    k = jax.random.fold_in(leaf_keys(key, num_leaves)[leaf], seed)
    return np.asarray(jax.random.normal(k, (blocks, rows, block)), np.float64) / np.sqrt(rows)


def test_unbiased_with_the_stated_variance():
    d, ratio, block = 12, 0.5, 6  # s = 3 rows per block of 6
    x = jnp.asarray(np.random.default_rng(0).normal(size=d), jnp.float32)
    c = compressors.sketch(ratio, block_size=block)
    keys = jax.random.split(jax.random.key(42), 4000)
    samples = np.asarray(jax.jit(jax.vmap(lambda k: one_worker(c, {"x": x}, k)["x"]))(keys), np.float64)
    x64 = np.asarray(x, np.float64)
    block_norm2 = np.repeat([np.sum(x64[:6] ** 2), np.sum(x64[6:] ** 2)], 6)
    var = (block_norm2 + x64**2) / 3  # Var[(R^T R x)_k] for Gaussian R with N(0, 1/s) entries
    se = np.sqrt(var / len(keys))
    assert np.all(np.abs(samples.mean(0) - x64) < 4.5 * se), (samples.mean(0) - x64) / se
    np.testing.assert_allclose(samples.var(0), var, rtol=0.2)
    # The whole error: E||C(x) - x||^2 = (b + 1)/s ||x||^2.
    np.testing.assert_allclose(np.mean(np.sum((samples - x64) ** 2, 1)), 7 / 3 * np.sum(x64**2), rtol=0.1)


def test_aggregate_matches_float64_reference_and_counts_exact_bytes():
    ratio, block = 0.3, 8
    rng = np.random.default_rng(1)
    xs = {"w": rng.normal(size=(WORKERS, 5, 4)).astype(np.float32), "s": rng.normal(size=(WORKERS,))}
    key = jax.random.key(7)
    c = compressors.sketch(ratio, block_size=block)

    def agg(x):
        channel = Channel("data")
        out = c.aggregate(x, (), key, jnp.int32(0), channel)
        return out.mean, out.local, channel.counter

    mean, local, counter = jax.jit(optdist.simulate(agg, "data"))(jax.tree_util.tree_map(jnp.asarray, xs))
    # leaves in order: s (uncompressed scalar), w (20 entries: 3 blocks of 8, 3 rows each)
    r = projections(key, 20, ratio, block, leaf=1, num_leaves=2)
    flat = np.pad(xs["w"].reshape(WORKERS, -1).astype(np.float64), ((0, 0), (0, 4))).reshape(WORKERS, 3, 8)
    sketched = np.einsum("jsb,wjb->wjs", r, flat)
    decoded = lambda y: np.einsum("jsb,js->jb", r, y).reshape(-1)[:20].reshape(5, 4)  # noqa: E731
    want_mean = decoded(sketched.sum(0)) / WORKERS
    for w in range(WORKERS):
        np.testing.assert_allclose(np.asarray(mean["w"][w]), want_mean, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(np.asarray(local["w"][w]), decoded(sketched[w]), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(float(mean["s"][w]), xs["s"].mean(), rtol=1e-6)
    # One all-reduce of 9 sketch values + the scalar (small leaves packed into one float32 buffer).
    expected = 2 * (WORKERS - 1) * -(-(9 + 1) // WORKERS) * 4
    np.testing.assert_array_equal(optdist.ByteCounter.value(counter), [expected] * WORKERS)


def test_compressed_mean_trains_and_bytes_follow_the_sketch_size():
    params = {"w": jnp.zeros((64, 32))}  # 2048 entries: 2 blocks of 1024, 103 rows each at ratio 0.1
    tx = optax.chain(optdist.compressed_mean(compressors.sketch(0.1), "data"), optax.sgd(0.1))
    grads = jax.random.normal(jax.random.key(0), (WORKERS, 64, 32))
    p_w, s_w = optdist.replicate((params, tx.init(params)), WORKERS)
    u, s_w = jax.jit(optdist.simulate(lambda g, s, p: tx.update({"w": g}, s, p), "data"))(grads, s_w, p_w)
    assert optdist.is_replicated(u)["w"]
    values = 2 * 103
    np.testing.assert_array_equal(
        optdist.bytes_sent(s_w), [2 * (WORKERS - 1) * -(-values // WORKERS) * 4] * 4
    )


def test_noise_is_private_per_worker_and_has_the_stated_variance():
    ratio, block, sigma = 0.5, 8, 0.7
    x = {"w": jnp.zeros((WORKERS, 16))}
    noisy, plain = (
        compressors.sketch(ratio, block_size=block, noise_std=sigma),
        compressors.sketch(ratio, block_size=block),
    )
    assert plain.codec is not None and noisy.codec is None

    def run(key):
        def agg(x):
            out = noisy.aggregate(x, (), key, jnp.int32(0), Channel("data"))
            return out.mean["w"], out.local["w"]

        return optdist.simulate(agg, "data")(x)

    keys = jax.random.split(jax.random.key(3), 400)
    means, locals_ = jax.jit(jax.vmap(run))(keys)  # x = 0: what is decoded is the noise alone
    locals_ = np.asarray(locals_, np.float64)
    assert not np.allclose(locals_[:, 0], locals_[:, 1])  # each worker draws its own noise
    np.testing.assert_allclose(np.asarray(means[:, 0]), locals_.mean(1), rtol=1e-4, atol=1e-5)
    # Var[(R^T xi)_k] = sigma^2 E[sum_r R_rk^2] = sigma^2 per worker, sigma^2 / n for the mean.
    np.testing.assert_allclose(locals_.var(axis=(0, 1)).mean(), sigma**2, rtol=0.1)
    np.testing.assert_allclose(
        np.asarray(means[:, 0], np.float64).var(0).mean(), sigma**2 / WORKERS, rtol=0.15
    )


@pytest.mark.parametrize(
    "make,name",
    [
        (lambda: compressors.sketch(0.0), "ratio"),
        (lambda: compressors.sketch(0.1, block_size=0), "block_size"),
        (lambda: compressors.sketch(0.1, noise_std=-1.0), "noise_std"),
        (lambda: compressors.sketch(0.1, seed=1.5), "seed"),
    ],
)
def test_bad_arguments_are_named(make, name):
    with pytest.raises((ValueError, TypeError), match=name):
        make()
