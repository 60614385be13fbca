"""Issue 18 item 4: out-of-range worker indices, axis names, Byzantine counts raise naming what is valid."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optdist
from optdist import attacks

W = 8


def test_unreplicate_checks_the_worker_index():
    tree = {"a": jnp.arange(W * 2.0).reshape(W, 2), "b": jnp.arange(W)}
    np.testing.assert_array_equal(optdist.unreplicate(tree, 7)["a"], [14.0, 15.0])
    np.testing.assert_array_equal(optdist.unreplicate(tree, -1)["b"], 7)  # from the end, as Python
    np.testing.assert_array_equal(optdist.unreplicate(tree, -8)["b"], 0)
    np.testing.assert_array_equal(optdist.unreplicate(tree, np.int64(3))["b"], 3)
    for bad in (8, -9, 100):
        with pytest.raises(IndexError, match=r"out of range for 8 workers.*\[0, 7\].*\[-8, -1\]"):
            optdist.unreplicate(tree, bad)
    for bad in (1.5, "0", None, True):
        with pytest.raises(TypeError, match="integer worker index"):
            optdist.unreplicate(tree, bad)
    with pytest.raises(ValueError, match="leading worker axis"):
        optdist.unreplicate({"a": jnp.ones(())})


def test_unreplicate_checks_the_index_of_a_sharded_tree():
    mesh = jax.make_mesh((W,), ("data",))
    x = jax.device_put(jnp.arange(W * 3.0).reshape(W, 3), jax.sharding.NamedSharding(mesh, jax.P("data")))
    np.testing.assert_array_equal(optdist.unreplicate(x, -2), [18.0, 19.0, 20.0])
    with pytest.raises(IndexError, match="out of range for 8 workers"):
        optdist.unreplicate(x, 8)


def test_bytes_sent_names_the_axes_of_the_state_for_an_unknown_axis():
    params = {"w": jnp.ones((4,))}
    tx = optax.chain(optdist.mean_gradients("ici"), optdist.mean_gradients("dcn"))
    state = tx.init(params)
    assert int(optdist.bytes_sent(state, "dcn")) == 0 and int(optdist.bytes_sent(state)) == 0
    with pytest.raises(ValueError, match=r"axis_name='dat'.*'dcn', 'ici'"):
        optdist.bytes_sent(state, "dat")
    # A state without any counter sent nothing on any axis.
    assert int(optdist.bytes_sent(optax.sgd(0.1).init(params), "data")) == 0


def _run_byzantine(tx, n=W):
    update = {"g": jnp.ones((n, 3))}
    state = optdist.replicate(tx.init({"g": jnp.ones(3)}), n)
    return optdist.simulate(lambda u, s: tx.update(u, s))(update, state)


@pytest.mark.parametrize(
    "attack",
    [attacks.sign_flip(), attacks.gaussian(), attacks.nan_inf()],
    ids=["sign_flip", "gaussian", "nan_inf"],
)
def test_byzantine_rejects_all_workers_byzantine_at_trace_time(attack):
    tx = attacks.byzantine(attack, num_byzantine=W, axis_name="data")  # W unknown until traced
    with pytest.raises(ValueError, match=r"num_byzantine=8 makes all n=8 workers Byzantine.*<= 7"):
        _run_byzantine(tx)
    with pytest.raises(ValueError, match="all n=8 workers Byzantine"):  # a mask gives n at construction
        attacks.byzantine(attack, mask=[True] * W, axis_name="data")
    out, _ = _run_byzantine(attacks.byzantine(attack, num_byzantine=W - 1, axis_name="data"))
    np.testing.assert_array_equal(out["g"][W - 1], [1.0, 1.0, 1.0])  # the honest worker's own update
