"""``packed`` on simulated workers: leaves skip the concatenation exactly when that counts the same bytes."""

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


@pytest.mark.parametrize("op", ["all_gather", "psum", "pmean"])
def test_simulated_unpacked_equals_packed_with_the_same_bytes(op):
    sizes = (40000, 36, 1000)  # even sizes: a ring over 2 workers pads nothing, so unpacked is free
    got, got_bytes, text = _run(op, sizes, force_packed=False)
    want, want_bytes, _ = _run(op, sizes, force_packed=True)
    assert got_bytes == want_bytes > 0
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    if op == "all_gather":  # (an all-reduce still packs its small leaves itself, in the Channel)
        assert "concatenate(" not in text


def test_an_all_reduce_whose_ring_padding_differs_stays_packed():
    sizes = (40001, 37)  # odd: per leaf each ring chunk would be padded, the packed buffer is not
    leaves = [jax.ShapeDtypeStruct((s,), jnp.float32) for s in sizes]
    total = [jax.ShapeDtypeStruct((sum(sizes),), jnp.float32)]
    assert accounting.all_reduce_bytes(leaves, W) != accounting.all_reduce_bytes(total, W)
    _, got_bytes, _ = _run("psum", sizes, force_packed=False)
    _, want_bytes, _ = _run("psum", sizes, force_packed=True)
    assert got_bytes == want_bytes == accounting.all_reduce_bytes(total, W)
