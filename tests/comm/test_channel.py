"""Channel.ppermute: a random permutation arrives exactly, in every execution mode and axis layout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optdist
from optdist.comm import Channel

PERM16 = [(int(s), int(d)) for s, d in enumerate(np.random.default_rng(0).permutation(16))]


def _expected(x, perm):
    source = np.empty(len(perm), int)
    for s, d in perm:
        source[d] = s
    return np.asarray(x)[source]


def _step(axis):
    def step(x):
        channel = Channel(axis)
        out = channel.ppermute({"v": x, "i": x.astype(jnp.int32)}, PERM16)
        return out["v"], out["i"], jnp.asarray(channel.nbytes)

    return step


@pytest.mark.parametrize(
    "runner",
    [
        lambda: optdist.simulate(_step("data"), "data"),
        lambda: optdist.data_parallel(_step("data"), jax.make_mesh((8,), ("data",)), "data"),  # 2 per device
        lambda: optdist.simulate(_step(("a", "b")), ("a", "b"), axis_sizes=(4, 4)),  # nested vmap axes
        lambda: optdist.data_parallel(_step(("a", "b")), jax.make_mesh((4, 2), ("a", "b")), ("a", "b")),
    ],
    ids=["simulate", "data_parallel_2_per_device", "nested_simulate", "mesh_4x2_2_per_device"],
)
def test_ppermute_delivers_a_random_permutation(runner):
    x = jnp.arange(16.0) * 10 + 3
    v, i, nbytes = runner()(x)
    np.testing.assert_array_equal(v, _expected(x, PERM16))
    np.testing.assert_array_equal(i, _expected(x, PERM16).astype(np.int32))
    np.testing.assert_array_equal(nbytes, 4 + 4)  # one float32 and one int32 per worker


def test_ppermute_rejects_a_partial_permutation():
    with pytest.raises(ValueError, match="exactly once"):
        optdist.simulate(lambda x: Channel("data").ppermute(x, [(0, 1), (1, 0)]), "data")(jnp.ones(16))


@pytest.mark.parametrize(
    "runner",
    [
        lambda f: optdist.simulate(f, "data"),
        lambda f: optdist.data_parallel(f, jax.make_mesh((8,), ("data",)), "data"),  # 2 per device
    ],
    ids=["simulate", "data_parallel_2_per_device"],
)
@pytest.mark.parametrize("size", [1000, 40000], ids=["small_leaf_reduce", "large_leaf_ordered_sum"])
def test_all_reduces_are_exact_and_identical_on_every_worker(runner, size):
    """psum / pmean / pmax over simulated workers (large leaves: the gathered slices in worker order)."""
    x = jax.random.normal(jax.random.key(0), (16, size))

    def step(v):
        channel = Channel("data")
        return channel.psum(v), channel.pmean(v), channel.pmax(v)

    total, mean, biggest = (np.asarray(out) for out in runner(step)(x))
    reference = np.asarray(x, np.float64)
    np.testing.assert_allclose(total[0], reference.sum(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mean[0], reference.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(biggest[0], reference.max(0).astype(np.float32))
    for out in (total, mean, biggest):
        assert (out == out[0]).all()  # bit-identical replicas
