"""DiLoCo and Streaming DiLoCo with float16 / bfloat16 parameters (issue 18).

In float16 AdamW's eps = 1e-8 rounds to 0 and squared gradients below ~2.4e-4 underflow, so an
inner AdamW in the parameters' dtype returns 0/0 and every anchor is NaN at the first sync. The
default ``inner_dtype="auto"`` keeps the inner AdamW in float32 on half-precision leaves.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optdist
from tests.helpers import linear_loss, linear_problem

WORKERS = 4
MAKERS = {
    "diloco": lambda **kw: optdist.diloco(0.01, sync_every=2, axis_name="data", **kw),
    "streaming_diloco": lambda **kw: optdist.streaming_diloco(
        0.01, 2, "data", num_fragments=2, delay=1, alpha=0.5, **kw
    ),
}


def _small_loss(params, batch):  # gradients ~1e-4: their squares underflow in float16
    return 1e-4 * linear_loss(params, batch)


def _run(tx, dtype, steps=6):
    params, data = linear_problem(num_examples=32)
    params = jax.tree_util.tree_map(lambda p: p.astype(dtype), params)
    params_w, state_w = optdist.replicate((params, tx.init(params)), WORKERS)
    batches = optdist.shard_batch(data.astype(dtype), WORKERS)

    def step(p, s, b):
        u, s = tx.update(jax.grad(_small_loss)(p, b), s, p)
        return optax.apply_updates(p, u), s

    def chunk(p, s, b):
        return jax.lax.scan(lambda c, _: (step(*c, b), None), (p, s), None, length=steps)[0]

    return optdist.simulate(chunk)(params_w, state_w, batches)


def _finite(tree):
    return all(np.isfinite(np.asarray(x, np.float32)).all() for x in jax.tree_util.tree_leaves(tree))


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_float16_parameters_train_finite_and_close_to_float32(name):
    ref, _ = _run(MAKERS[name](), jnp.float32)
    params_w, state_w = _run(MAKERS[name](), jnp.float16)  # 3 rounds
    assert {x.dtype for x in jax.tree_util.tree_leaves(params_w)} == {jnp.dtype(jnp.float16)}
    assert _finite(params_w) and _finite(state_w.anchor)
    inner = jax.tree_util.tree_leaves(state_w.inner_state)
    assert {x.dtype for x in inner if jnp.issubdtype(x.dtype, jnp.floating)} == {jnp.dtype(jnp.float32)}
    # The parameters moved (~0.01 per step) and agree with float32 to float16's resolution.
    moved = max(
        float(np.abs(np.asarray(a, np.float32) - np.asarray(b)).max())
        for a, b in zip(jax.tree_util.tree_leaves(ref), jax.tree_util.tree_leaves(linear_problem(32)[0]))
    )
    assert moved > 0.02
    for a, b in zip(jax.tree_util.tree_leaves(params_w), jax.tree_util.tree_leaves(ref)):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b), atol=6e-3)


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_parameter_dtype_adamw_is_the_nan_trap(name):
    params_w, state_w = _run(MAKERS[name](inner_dtype=None), jnp.float16)
    assert not _finite(state_w.anchor)  # what the default avoids


def test_bfloat16_inner_state_is_float32_and_params_stay_bfloat16():
    params_w, state_w = _run(MAKERS["diloco"](), jnp.bfloat16, steps=2)
    assert {x.dtype for x in jax.tree_util.tree_leaves(params_w)} == {jnp.dtype(jnp.bfloat16)}
    mu = state_w.inner_state[0].mu
    assert {x.dtype for x in jax.tree_util.tree_leaves(mu)} == {jnp.dtype(jnp.float32)}


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_bad_inner_dtype_and_eps_are_named(name):
    with pytest.raises(ValueError, match="inner_dtype"):
        MAKERS[name](inner_dtype=jnp.float16)
    with pytest.raises(ValueError, match="inner_eps"):
        MAKERS[name](inner_eps=-1.0)
