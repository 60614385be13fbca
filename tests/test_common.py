"""The common suite: every public transform passes the same checks (as optax's ``_common_test``).

A new method joins ``REGISTRY`` with a small valid config and gets, for free:
jit + ``lax.scan`` (state structure, shapes and dtypes stable across steps, so
``lax.cond`` / ``optax.MultiSteps`` work), the three execution modes agreeing, the agreed
non-finite skip, an orbax checkpoint round-trip, and a named error under an unbound axis; the
registry's other suites (``test_optax_conventions``, bfloat16 parameters included;
``test_validation``; ``comm/test_byte_audit``) run over the same entries.
"""

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import optdist
import optdist.jacobian
import optdist.minmax
import optdist.momentum
import optdist.stragglers
from optdist import aggregators, attacks, compressors, memory, privacy
from tests.helpers import assert_trees_close, linear_loss, linear_problem

WORKERS = 4


@dataclasses.dataclass(frozen=True)
class Entry:
    make: Callable[[str], optax.GradientTransformation]
    # "gradient": outputs an (aggregated) gradient, chained with sgd; "update": outputs parameter updates.
    output: str = "gradient"
    # Non-finite policy under skip_nonfinite: "skip" (a NaN gradient on one worker skips the step on
    # every worker) or "robust" (check_inputs=False: the robust aggregator discards the bad worker).
    nonfinite: str = "skip"


REGISTRY = {
    # Variational inequalities (optdist.minmax): gradient descent on a minimization is a monotone VI.
    "past_extragradient": Entry(lambda ax: optdist.minmax.past_extragradient(0.05, ax), "update"),
    "optimistic_gradient": Entry(lambda ax: optdist.minmax.optimistic_gradient(0.05, ax), "update"),
    "masha1": Entry(lambda ax: optdist.minmax.masha1(0.05, compressors.rand_k(0.5), ax, tau=0.5), "update"),
    "masha2": Entry(lambda ax: optdist.minmax.masha2(0.05, compressors.top_k(0.3), ax, tau=0.5), "update"),
    "mean_gradients": Entry(lambda ax: optdist.mean_gradients(ax)),
    "local_sgd": Entry(lambda ax: optdist.local_sgd(optax.sgd(0.1), 2, ax), "update"),
    "diloco": Entry(lambda ax: optdist.diloco(0.01, sync_every=2, axis_name=ax), "update"),
    "streaming_diloco": Entry(
        lambda ax: optdist.streaming_diloco(0.01, 2, ax, num_fragments=2, delay=1, alpha=0.5), "update"
    ),
    "fedavg": Entry(lambda ax: optdist.fedavg(0.1, 1.0, 2, ax), "update"),
    "fedadam": Entry(lambda ax: optdist.fedadam(0.1, 0.01, 2, ax), "update"),
    "fedyogi": Entry(lambda ax: optdist.fedyogi(0.1, 0.01, 2, ax), "update"),
    "scaffold": Entry(lambda ax: optdist.scaffold(0.1, 2, ax), "update"),
    "local_adaptive": Entry(lambda ax: optdist.local_adaptive(0.01, 2, ax), "update"),
    "delayed_nesterov": Entry(
        lambda ax: optdist.delayed_nesterov(optax.sgd(0.1), 2, ax, buffer_size=2), "update"
    ),
    "shampoo": Entry(
        lambda ax: optax.chain(
            optdist.mean_gradients(ax),
            optdist.scale_by_shampoo(block_size=4, precondition_every=2, matrix_epsilon=1e-2),
        )
    ),
    "shampoo[distributed roots]": Entry(
        lambda ax: optax.chain(
            optdist.mean_gradients(ax),
            optdist.scale_by_shampoo(block_size=4, precondition_every=2, matrix_epsilon=1e-2, axis_name=ax),
        )
    ),
    "compressed_mean[top_k+ef]": Entry(
        lambda ax: optdist.compressed_mean(compressors.top_k(0.3), ax, feedback="ef")
    ),
    "compressed_mean[qsgd+ef21]": Entry(
        lambda ax: optdist.compressed_mean(compressors.qsgd(7, 8), ax, feedback="ef21")
    ),
    "compressed_mean[sign+econtrol]": Entry(
        lambda ax: optdist.compressed_mean(compressors.sign(), ax, feedback="econtrol")
    ),
    "compressed_mean[terngrad]": Entry(lambda ax: optdist.compressed_mean(compressors.terngrad(), ax)),
    # Fused EF kernels (impl="auto": the XLA reference on CPU; scaled_sign shares int8's builder).
    "compressed_mean[int8+ef]": Entry(
        lambda ax: optdist.compressed_mean(compressors.int8(16, "stochastic"), ax, feedback="ef")
    ),
    "compressed_mean[ternary]": Entry(lambda ax: optdist.compressed_mean(compressors.ternary(16), ax)),
    "compressed_mean[threshold_top_k+ef]": Entry(
        lambda ax: optdist.compressed_mean(compressors.threshold_top_k(0.3), ax, feedback="ef")
    ),
    "compressed_mean[cyclic_top_k+ef]": Entry(
        lambda ax: optdist.compressed_mean(compressors.cyclic_top_k(0.25, 4, 8), ax, feedback="ef")
    ),
    "compressed_mean[quantize summed+ef]": Entry(
        lambda ax: optdist.compressed_mean(
            compressors.quantize(8, chunk_size=4, exchange="summed"), ax, feedback="ef"
        )
    ),
    "compressed_mean[quantize requantized+ef]": Entry(
        lambda ax: optdist.compressed_mean(
            compressors.quantize(4, "e2m1", chunk_size=4, exchange="requantized"), ax, feedback="ef"
        )
    ),
    "compressed_mean[rand_k]": Entry(lambda ax: optdist.compressed_mean(compressors.rand_k(0.5), ax)),
    "compressed_mean[demo]": Entry(lambda ax: optdist.compressed_mean(compressors.demo(4, 2), ax)),
    "compressed_mean[fp16]": Entry(lambda ax: optdist.compressed_mean(compressors.cast(jnp.float16), ax)),
    "powersgd": Entry(lambda ax: optdist.powersgd(1, ax, min_compression_rate=1.0)),
    "robust_mean[mean]": Entry(lambda ax: optdist.robust_mean(aggregators.mean(), ax)),
    "robust_mean[trimmed_mean]": Entry(
        lambda ax: optdist.robust_mean(aggregators.trimmed_mean(1), ax), nonfinite="robust"
    ),
    "robust_mean[centered_clip+nnm]": Entry(
        lambda ax: optdist.robust_mean(
            aggregators.centered_clip(1.0), ax, pre_aggregation=aggregators.nnm(1)
        ),
        nonfinite="robust",
    ),
    "byzantine[alie]+median": Entry(
        lambda ax: optax.chain(
            attacks.byzantine(attacks.alie(), num_byzantine=1, axis_name=ax),
            optdist.robust_mean(aggregators.median(), ax),
        ),
        # The poisoned worker plus the attacker are 2 of 4 (past the median's breakdown point): the
        # aggregate is non-finite, so the safe outcome is the agreed skip.
        nonfinite="skip",
    ),
    # Decentralized: per-worker parameters, gossip last in the chain (it outputs parameter updates).
    "gossip[ring]": Entry(lambda ax: optax.chain(optax.sgd(0.1), optdist.gossip("ring", ax)), "update"),
    "gossip[choco+top_k]": Entry(
        lambda ax: optax.chain(
            optax.sgd(0.1), optdist.gossip("ring", ax, compressors.top_k(0.3), consensus_step_size=0.5)
        ),
        "update",
    ),
    "gradient_tracking": Entry(
        lambda ax: optax.chain(
            optdist.gradient_tracking("exponential", ax),
            optax.sgd(0.1),
            optdist.gossip("exponential", ax, order="combine_then_adapt"),
        ),
        "update",
    ),
    # Memory-light and private methods (issue 16).
    "compressed_mean[sketch]": Entry(
        lambda ax: optdist.compressed_mean(compressors.sketch(0.5, block_size=4), ax)
    ),
    "dp_diff_mean": Entry(lambda ax: privacy.dp_diff_mean(10.0, 0.01, 2, ax, diff_clip_norm=1.0)),
    "micro_adam": Entry(
        lambda ax: optax.chain(
            optdist.mean_gradients(ax), memory.micro_adam(0.05, density=0.5, window=2, bucket_size=3)
        ),
        "update",
    ),
    "fish_mask": Entry(
        lambda ax: memory.fish_mask(
            lambda p: memory.fisher_mask(
                jax.tree_util.tree_map(lambda x: np.arange(x.size).reshape(x.shape) % 3, p), 0.5
            ),
            ax,
        )
    ),
    # Schedule-free in an outer loop, multi-momentum, median-gradient SGD, SMEA (issue 16, items 5-8).
    "outer_loop[schedule_free]": Entry(
        lambda ax: optdist.outer_loop(
            optax.sgd(0.1), optax.contrib.schedule_free(optax.sgd(1.0), 1.0, b1=0.9), 2, ax
        ),
        "update",
    ),
    "multi_momentum": Entry(
        lambda ax: optax.chain(
            optdist.mean_gradients(ax),
            optdist.momentum.scale_by_multi_momentum(2, 0.9, cluster_schedule=lambda t: t % 2),
        )
    ),
    "median_gradients[geometric]": Entry(
        lambda ax: optdist.robust.median_gradients(ax, "geometric"), nonfinite="robust"
    ),
    "running_median": Entry(
        lambda ax: optax.chain(optdist.mean_gradients(ax), optdist.robust.running_median(1.0))
    ),
    "robust_mean[smea]": Entry(
        lambda ax: optdist.robust_mean(optdist.robust.smea(1), ax), nonfinite="robust"
    ),
    "robust_mean[upgrad]": Entry(lambda ax: optdist.robust_mean(optdist.jacobian.upgrad(), ax)),
    "backup_mean": Entry(
        lambda ax: optdist.stragglers.backup_mean_gradients(1, ax, optdist.stragglers.clock.pareto(1.0, 2.0))
    ),
    "dynamic_backup_mean": Entry(
        lambda ax: optdist.stragglers.dynamic_backup_mean_gradients(
            ax, WORKERS, optdist.stragglers.clock.shifted_exponential(1.0, 0.5), 0.1, initial_backup=1
        )
    ),
}
NAMES = sorted(REGISTRY)


def full_tx(name, axis_name="data"):
    entry = REGISTRY[name]
    tx = entry.make(axis_name)
    return optax.chain(tx, optax.sgd(0.1)) if entry.output == "gradient" else tx


def step_fn(tx, poison=False):
    def step(params, state, batch, bad):
        grads = jax.grad(linear_loss)(params, batch)
        if poison:
            grads = jax.tree_util.tree_map(lambda g: jnp.where(bad, jnp.nan, g), grads)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


def run_steps(tx, params, data, steps=3, runner=None, poison=None):
    params_w, state_w = optdist.replicate((params, tx.init(params)), WORKERS)
    batches = optdist.shard_batch(data, WORKERS)
    bad = jnp.zeros(WORKERS, bool) if poison is None else poison
    step = step_fn(tx, poison is not None)
    runner = runner or optdist.simulate

    def chunk(params, state, batch, bad):
        def body(carry, _):
            return step(*carry, batch, bad), None

        return jax.lax.scan(body, (params, state), None, length=steps)[0]

    return runner(chunk)(params_w, state_w, batches, bad)


@pytest.fixture(scope="module")
def problem():
    return linear_problem(num_examples=32)


@functools.cache
def simulated(name):
    """Three simulated steps of ``full_tx(name)``: one compiled run shared by the tests below
    (tests/conftest.py keeps one name's tests on one xdist worker)."""
    params, data = linear_problem(num_examples=32)
    return run_steps(full_tx(name), params, data)


@pytest.mark.parametrize("name", NAMES)
def test_scan_keeps_state_structure_shapes_and_dtypes(problem, name):
    params, data = problem
    params_w, state_w = simulated(name)
    init_w = optdist.replicate(full_tx(name).init(params), WORKERS)
    spec = lambda t: jax.tree_util.tree_map(lambda x: (jnp.shape(x), jnp.result_type(x)), t)  # noqa: E731
    assert spec(state_w) == spec(init_w)
    assert jax.tree_util.tree_structure(state_w) == jax.tree_util.tree_structure(init_w)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(params_w))


@pytest.mark.parametrize("name", NAMES)
def test_three_execution_modes_agree(problem, name):
    params, data = problem
    tx = full_tx(name)
    mesh = jax.make_mesh((WORKERS,), ("data",), devices=jax.devices()[:WORKERS])
    sim = simulated(name)
    dp = run_steps(tx, params, data, runner=lambda f: optdist.data_parallel(f, mesh, "data"))
    pm = run_steps(tx, params, data, runner=lambda f: jax.pmap(f, axis_name="data"))
    assert_trees_close(dp, sim, rtol=1e-5, atol=1e-6)
    assert_trees_close(pm, sim, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(optdist.bytes_sent(dp[1]), optdist.bytes_sent(sim[1]))


@pytest.mark.parametrize("name", NAMES)
def test_nonfinite_on_one_worker_is_skipped_on_every_worker(problem, name):
    params, data = problem
    robust = REGISTRY[name].nonfinite == "robust"
    tx = optdist.skip_nonfinite(full_tx(name), "data", check_inputs=not robust)
    poison = jnp.array([False, True, False, False])
    params_w, state_w = run_steps(tx, params, data, steps=2, poison=poison)
    if not robust:
        assert_trees_close(params_w, optdist.replicate(params, WORKERS), rtol=0, atol=0)
        np.testing.assert_array_equal(state_w.skipped, [2] * WORKERS)
    else:  # the robust aggregator drops the poisoned worker and training goes on
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(params_w))
        assert not np.allclose(np.asarray(params_w["w"][0]), np.asarray(params["w"]))
        np.testing.assert_array_equal(state_w.skipped, [0] * WORKERS)


@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_round_trip(problem, name, tmp_path):
    _, state_w = simulated(name)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "state", state_w)
        ckpt.wait_until_finished()
        restored = ckpt.restore(
            tmp_path / "state", jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state_w)
        )
    assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(state_w)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), restored, state_w
    )


@pytest.mark.parametrize("name", NAMES)
def test_unbound_axis_is_named(problem, name):
    params, data = problem
    tx = full_tx(name, axis_name="workers")
    grads = jax.grad(linear_loss)(params, data)
    with pytest.raises(optdist.UnboundAxisError, match="workers"):
        jax.jit(tx.update)(grads, tx.init(params), params)
