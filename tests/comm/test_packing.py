"""``packed`` skips the concatenation where it would be pure copying: an all-gather on simulated workers
(the same bytes leaf by leaf), and every library all-reduce on a real mesh (the Channel packs only the
small leaves)."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optdist
from optdist.comm import Channel, accounting
from optdist.comm.packing import packed

W = 2


def _tree(sizes):
    key = jax.random.key(3)
    return [jax.random.normal(jax.random.fold_in(key, i), (W, s)) for i, s in enumerate(sizes)]


def _run(op, sizes, force_packed):
    """Outputs, bytes counted and compiled HLO of ``packed(channel.<op>, leaves)`` on W simulated workers."""
    counted = {}

    def step(*leaves):
        channel = Channel("data")
        collective = getattr(channel, op)
        if force_packed:  # a plain function is not a Channel's method: always packed
            collective = lambda t, f=collective: f(t)  # noqa: E731
        out = packed(collective, list(leaves), gathered=op == "all_gather")
        counted["bytes"] = channel.nbytes
        return out

    fn = optdist.simulate(step, "data")
    leaves = _tree(sizes)
    text = fn.lower(*leaves).compile().as_text()
    return [np.asarray(x) for x in fn(*leaves)], counted["bytes"], text


def test_simulated_all_gather_unpacked_equals_packed_with_the_same_bytes():
    sizes = (40000, 36, 1001)
    got, got_bytes, text = _run("all_gather", sizes, force_packed=False)
    want, want_bytes, _ = _run("all_gather", sizes, force_packed=True)
    assert got_bytes == want_bytes > 0
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    assert "concatenate(" not in text


def test_an_all_reduce_through_packed_is_one_buffer_per_dtype():
    sizes = (40001, 37)  # odd: per leaf each ring chunk would be padded, the one buffer is not
    leaves = [jax.ShapeDtypeStruct((s,), jnp.float32) for s in sizes]
    total = [jax.ShapeDtypeStruct((sum(sizes),), jnp.float32)]
    assert accounting.all_reduce_bytes(leaves, W) != accounting.all_reduce_bytes(total, W)
    got, got_bytes, text = _run("psum", sizes, force_packed=False)
    want, want_bytes, _ = _run("psum", sizes, force_packed=True)
    assert got_bytes == want_bytes == accounting.all_reduce_bytes(total, W)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


LARGE, SMALL = (40000, 20000), (36, 10)


@pytest.mark.parametrize(
    "make",
    [
        lambda: optdist.mean_gradients("data"),
        lambda: optdist.compressed_mean(optdist.compressors.cast(jnp.bfloat16), "data"),
        lambda: optdist.compressed_mean(optdist.compressors.quantize(8, exchange="summed"), "data"),
        lambda: optdist.powersgd(1, "data", min_compression_rate=1.0),
    ],
    ids=["exact_mean", "cast_bf16", "quantize_summed", "powersgd"],
)
def test_all_reduces_on_a_mesh_concatenate_only_the_small_leaves(make):
    """On two devices the compiled step packs the small leaves (one buffer) and sends the large ones as
    they are: no full-tree concatenate (and its slices back) before the all-reduce."""
    tx = make()
    shapes = {f"w{i}": (s // 100, 100) for i, s in enumerate(LARGE)} | {
        f"b{i}": (s,) for i, s in enumerate(SMALL)
    }
    params = {k: jnp.zeros(s) for k, s in shapes.items()}
    grads = {k: jnp.ones((W, *s)) for k, s in shapes.items()}
    state = optdist.replicate(tx.init(params), W)
    mesh = jax.make_mesh((W,), ("data",), devices=jax.devices()[:W])
    step = jax.jit(optdist.data_parallel(lambda g, s: tx.update(g, s, params), mesh, "data"))
    text = step.lower(grads, state).compile().as_text()
    sizes = [math.prod(int(d) for d in dims.split(",") if d) for dims in CONCAT.findall(text)]
    assert sizes and max(sizes) < accounting.PACK_BELOW, sizes


CONCAT = re.compile(r"= \w+\[([\d,]*)\]\S* concatenate\(")
