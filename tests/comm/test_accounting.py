import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optdist.comm import accounting
from optdist.comm.accounting import ByteCounter, bytes_sent


def test_counter_is_exact_past_32_bits():
    counter = ByteCounter.zeros("data")
    step = jax.jit(lambda c: c.add(3_000_000_000))
    for _ in range(5):
        counter = step(counter)
    assert int(counter.value()) == 15_000_000_000
    big = ByteCounter.zeros().add(7 * 2**32 + 5)
    assert int(big.value()) == 7 * 2**32 + 5


def test_counter_where_masks_the_add():
    counter = ByteCounter.zeros()
    counter = jax.jit(lambda c, w: c.add(100, where=w))(counter, jnp.array(False))
    assert int(counter.value()) == 0
    counter = jax.jit(lambda c, w: c.add(100, where=w))(counter, jnp.array(True))
    assert int(counter.value()) == 100


def test_negative_add_rejected():
    with pytest.raises(ValueError, match="nbytes"):
        ByteCounter.zeros().add(-1)


@pytest.mark.parametrize("n", [1, 2, 3, 8])
def test_formulas(n):
    tree = {"a": jnp.zeros((10, 3), jnp.float32), "b": jnp.zeros((7,), jnp.bfloat16)}
    ar = accounting.all_reduce_bytes(tree, n)
    expect = 2 * (n - 1) * (-(-30 // n) * 4 + -(-7 // n) * 2)
    assert ar == expect
    assert accounting.all_gather_bytes(tree, n) == (n - 1) * (30 * 4 + 7 * 2)
    assert accounting.payload_bytes(tree) == 30 * 4 + 7 * 2
    # Small leaves are packed per dtype: two float32 leaves are one buffer...
    two = {"a": jnp.zeros((3,)), "b": jnp.zeros((5,))}
    assert accounting.all_reduce_bytes(two, n) == 2 * (n - 1) * -(-8 // n) * 4
    # ...large ones travel (and are counted) one by one.
    big = {"a": jnp.zeros((accounting.PACK_BELOW + 1,)), "b": jnp.zeros((5,))}
    each = -(-(accounting.PACK_BELOW + 1) // n) + -(-5 // n)
    assert accounting.all_reduce_bytes(big, n) == 2 * (n - 1) * each * 4


def test_bytes_sent_filters_by_axis_and_stacks():
    state = (ByteCounter.zeros("ici").add(10), {"x": ByteCounter.zeros("dcn").add(7)})
    assert int(bytes_sent(state)) == 17
    assert int(bytes_sent(state, "dcn")) == 7
    with pytest.raises(ValueError, match="'dcn', 'ici'"):  # a misspelt axis is not 0 bytes
        bytes_sent(state, "nope")
    other = (ByteCounter.zeros("ici").add(2**33), {"x": ByteCounter.zeros("dcn").add(1)})
    stacked = jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), state, other)
    np.testing.assert_array_equal(bytes_sent(stacked), [17, 2**33 + 1])


def test_flattened_counters_are_refused_not_read_as_zero():
    """flax.nnx.state turns a ByteCounter into {"hi", "lo"} entries: bytes_sent must not report 0."""
    import optax
    from flax import nnx

    import optdist

    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.chain(optdist.mean_gradients(None), optax.sgd(0.1)), wrt=nnx.Param)
    _, state = nnx.split((model, optimizer))
    with pytest.raises(ValueError, match="flattened"):
        optdist.bytes_sent(state)
    assert int(optdist.bytes_sent(optimizer.opt_state)) == 0  # the real state: no counter error
