"""worker_cond: a real branch under simulated workers, exact per worker, lax.cond elsewhere."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optdist
from optdist.comm.branching import worker_cond


def _step(count, x):
    """Adds 100 * ||x||² where the (replicated or per-worker) gate holds, else 1."""
    pred = count % 3 == 0
    y = worker_cond(pred, lambda v: v + 100.0 * jnp.sum(v * v), lambda v: v + 1.0, x)
    return count + 1, y


def _top_level(fn, *args):
    return {eqn.primitive.name for eqn in jax.make_jaxpr(fn)(*args).jaxpr.eqns}


def test_stays_a_branch_when_simulated_and_is_a_select_under_plain_vmap():
    counts = jnp.zeros((4,), jnp.int32)
    x = jnp.arange(8.0).reshape(4, 2)
    simulated = _top_level(optdist.simulate(_step, "data", jit=False), counts, x)
    assert "cond" in simulated  # the gate is a branch: the heavy side runs only on gated steps
    plain = _top_level(jax.vmap(_step, axis_name="data"), counts, x)
    assert "cond" not in plain and "select_n" in plain  # what lax.cond alone would become


def test_exact_per_worker_when_simulated_workers_disagree():
    counts = jnp.array([0, 1, 2, 3], jnp.int32)  # gates: True, False, False, True
    x = jnp.arange(8.0).reshape(4, 2)
    _, y = optdist.simulate(_step, "data")(counts, x)
    xs = np.arange(8.0).reshape(4, 2)
    want = [xs[i] + (100.0 * np.sum(xs[i] ** 2) if i % 3 == 0 else 1.0) for i in range(4)]
    np.testing.assert_allclose(np.asarray(y), np.stack(want), rtol=1e-6)


@pytest.mark.parametrize("workers", [8, 16])
def test_modes_agree(workers):
    counts = jnp.arange(workers, dtype=jnp.int32) % 4  # mixed gates
    x = jax.random.normal(jax.random.key(0), (workers, 3))
    mesh = jax.make_mesh((8,), ("data",))
    ref = optdist.simulate(_step, "data")(counts, x)
    got = optdist.data_parallel(_step, mesh, "data")(counts, x)
    for a, b in zip(ref, got):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
    if workers == 8:
        got = jax.pmap(_step, axis_name="data")(counts, x)
        for a, b in zip(ref, got):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)


def test_nested_simulated_axes():
    counts = jnp.array([0, 1, 2, 3], jnp.int32)
    x = jnp.arange(8.0).reshape(4, 2)
    run = optdist.simulate(_step, ("outer", "inner"), axis_sizes=(2, 2), jit=False)
    assert "cond" in _top_level(run, jnp.zeros((4,), jnp.int32), x)
    _, y = jax.jit(run)(counts, x)
    _, want = optdist.simulate(_step, "data")(counts, x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(want), rtol=1e-6)
