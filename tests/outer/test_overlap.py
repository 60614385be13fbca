"""outer_loop(overlap=True): the sync does not depend on this step's gradient; float64 reference."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optdist
import optdist.outer as outer
from optdist.comm.dependence import collective_dependence, compiled_collective_dependence
from tests.outer._problem import flat, init_params, loss, make_data, np_grad, run

N = 4


@pytest.fixture(scope="module")
def data():
    return make_data(N, seed=5)


def _dependence(tx, data):
    params = init_params()
    grads = jax.grad(loss)(params, data[0])
    step = optdist.simulate(lambda g, s, p: tx.update(g, s, p))
    args = optdist.replicate((grads, tx.init(params), params), N)
    return collective_dependence(step, args, argnums=[0])


@pytest.mark.parametrize("aggregator", [None, "ef"])
def test_overlapped_sync_does_not_depend_on_the_gradient(data, aggregator):
    agg = None
    if aggregator == "ef":
        agg = optdist.aggregation.compressed(optdist.compressors.quantize(4, chunk_size=4), feedback="ef")
    plain = _dependence(outer.diloco(0.05, sync_every=2, axis_name="data", aggregator=agg), data)
    overlapped = _dependence(
        outer.diloco(0.05, sync_every=2, axis_name="data", aggregator=agg, overlap=True), data
    )
    sends = lambda found: [d for name, d in found if name in ("psum", "all_gather")]
    assert sends(plain) and any(sends(plain))  # the usual sync waits for the gradient...
    assert sends(overlapped) and not any(sends(overlapped))  # ...the overlapped one does not


def _compiled_dependence(fn, args, inputs):
    mesh = jax.make_mesh((N,), ("data",), devices=jax.devices()[:N])
    step = optdist.data_parallel(fn, mesh, "data")
    text = jax.jit(step, keep_unused=True).lower(*args).compile().as_text()
    return [depends for _, _, depends in compiled_collective_dependence(text, inputs)]


@pytest.mark.parametrize("aggregator", [None, "ef"])
def test_compiled_overlapped_sync_does_not_depend_on_the_gradient(data, aggregator):
    """The same on the optimized HLO of the step under data_parallel (4 devices): after XLA's passes
    no collective of the overlapped sync reads anything computed from the gradient."""
    agg = None
    if aggregator == "ef":
        agg = optdist.aggregation.compressed(optdist.compressors.quantize(4, chunk_size=4), feedback="ef")
    params = init_params()
    grads = jax.grad(loss)(params, data[0])
    found = {}
    for overlap in (False, True):
        tx = outer.diloco(0.05, sync_every=2, axis_name="data", aggregator=agg, overlap=overlap)
        args = optdist.replicate((grads, tx.init(params), params), N)
        gradient = range(len(jax.tree_util.tree_leaves(args[0])))  # entry parameters of argument 0
        found[overlap] = _compiled_dependence(lambda g, s, p, tx=tx: tx.update(g, s, p), args, gradient)
    assert found[False] and all(found[False])  # every sync collective waits for the gradient...
    assert found[True] and not any(found[True])  # ...none of the overlapped ones does


def test_compiled_check_sees_what_the_jaxpr_cannot():
    """XLA:CPU's all-reduce combiner merges an independent psum with a dependent one: independent in
    the jaxpr, the merged all-reduce of the compiled program waits for the gradient."""

    def fn(g, s):
        return jax.lax.psum(2 * g, "data"), jax.lax.psum(s + 1, "data")

    args = (jnp.ones((N, 8)), jnp.ones((N, 8)))
    assert collective_dependence(optdist.simulate(fn), args, [0]) == [("psum", True), ("psum", False)]
    compiled = _compiled_dependence(fn, args, [0])
    assert compiled == [True]  # one combined all-reduce, dependent (a failure here: XLA stopped combining)


def np_overlapped_local_sgd(data, steps, h, lr):
    """Sync at every H-th step on the parameters the step started from, then apply its update."""
    n = data.shape[0]
    theta = flat(init_params())
    x = np.tile(theta, (n, 1))
    for t in range(1, steps + 1):
        u = np.stack([-lr * np_grad(x[i], data[i]) for i in range(n)])
        if t % h == 0:
            theta = theta - (theta - x).mean(axis=0)  # outer sgd(1.0) on Δ_i = θ - x_i
            x = theta + u
        else:
            x = x + u
    return x, theta


def test_overlapped_local_sgd_matches_reference(data):
    h, steps, lr = 3, 10, 0.1
    p, s, _ = run(outer.local_sgd(optax.sgd(lr), h, "data", overlap=True), steps, data)
    x, theta = np_overlapped_local_sgd(data, steps, h, lr)
    np.testing.assert_allclose(flat(p), x, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(flat(s.anchor)[0], theta, rtol=1e-5, atol=1e-6)


def test_overlap_bad_inputs():
    with pytest.raises(TypeError, match="overlap"):
        outer.local_sgd(optax.sgd(0.1), 2, "data", overlap=1)
    with pytest.raises(ValueError, match="overlap"):
        outer.scaffold(0.1, 2, "data", overlap=True)
