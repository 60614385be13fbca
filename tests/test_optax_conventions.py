"""optax's conventions for optimizers, checked for every transform of the common suite.

Ports (written for optdist, not copied) of the properties optax asserts for its own contributed
optimizers in ``optax/contrib/_common_test.py`` and for sharding in ``optax/_src/sharding_test.py``,
run for every entry of ``tests.test_common.REGISTRY``:

* unexpected extra keyword arguments to ``update`` are accepted;
* a jitted step does not retrace on its second call (the state's structure, dtypes and weak types
  round-trip), counted with a trace counter;
* ``optax.tree.map_params`` maps the state;
* convergence on optax's targets (parabola, Rosenbrock, matrix parabola, mixed 1-D / 2-D tensors);
* ``optax.inject_hyperparams`` of a learning-rate-taking factory equals the plain factory;
* updates keep the parameters' dtype (float32 and bfloat16), and bfloat16 parameters stay bfloat16
  through two training steps (the state keeping its shapes and dtypes);
* ``optax.MultiSteps`` accumulates (zero updates on the mini-steps, then the inner update of the
  mean gradient);
* abstract init (``jax.eval_shape``) under an explicit-axes mesh, and ``jax.typeof`` of the state
  (shape, dtype, sharding) stable across init, jitted init and update.

Execution: every property runs on ``WORKERS`` simulated (or, for the mesh property, mesh-sharded)
workers, because the transforms talk over a named axis and several need more than one worker
(trimmed mean, Krum-like aggregators, gossip). For convergence the workers see identical data:
the objective has no data, the parameters start replicated, so every worker computes the same
gradient and each transform must converge to the target's minimiser exactly as a single
optimizer would (robust aggregators of identical inputs, compressors with or without error
feedback, outer loops whose workers never drift apart). Transforms that output a gradient are
chained with an optimizer for that check (as ``test_common`` chains them with SGD).

Where a property cannot apply to a transform, the transform is listed with the reason in an
exclusion table below (``INJECT_EXCLUDED``, ``MAP_PARAMS_EXCLUDED``, ``CONVERGE_TARGETS_EXCLUDED``);
the tables are tested (every registry entry is either checked or excluded, and a ``map_params``
exclusion must still raise). Learning rates that suit the linear problem of ``REGISTRY`` but not
these targets are replaced for the convergence run only (``CONVERGE_OVERRIDES``, with reasons).
Failures that are library defects are ``XFAIL`` entries (strict) naming the cause, to be fixed in
the library rather than here.

Cost: one compiled function per transform and property group (the mesh properties share one
``data_parallel`` step; MultiSteps and bfloat16 share one; inject compiles plain and injected
together); tiny shapes.
"""

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optdist
import optdist.minmax
import optdist.momentum
from optdist import compressors, memory
from tests.helpers import linear_loss, linear_problem
from tests.test_common import NAMES, REGISTRY, WORKERS

AXIS = "data"

# Known library defects, found by these ports (strict: a fix turns them into a failure to remove here).
# Transforms whose property is a known defect (strict: a fix makes the test fail until it is removed).
XFAIL: dict[str, dict[str, str]] = {}


def names(test, pool=NAMES):
    marks = XFAIL.get(test, {})
    return [
        pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=marks[n])) if n in marks else n
        for n in pool
    ]


@functools.cache
def problem():
    params, data = linear_problem(num_examples=4 * WORKERS)
    return params, optdist.shard_batch(data, WORKERS)


def spec(tree):
    return jax.tree_util.tree_map(lambda x: (jnp.shape(x), jnp.result_type(x)), tree)


# --------------------------------------------------------------------------------------------------
# Extra args, no recompilation, float32 dtype, abstract init and state types under an explicit mesh.
# One compiled data_parallel step per transform serves all of them.


def explicit_mesh(axis):
    return jax.make_mesh(
        (WORKERS,), (axis,), axis_types=(jax.sharding.AxisType.Explicit,), devices=jax.devices()[:WORKERS]
    )


@functools.cache
def mesh_probe(name):
    """Two data_parallel steps on an explicit-axes mesh, the state placed as data_parallel places it."""
    tx = REGISTRY[name].make(AXIS)
    params, batches = problem()
    mesh = explicit_mesh(AXIS)
    sharding = NamedSharding(mesh, P(AXIS))
    traces = []

    def step(params, state, batch):
        traces.append(None)  # runs once per trace
        grads = jax.grad(linear_loss)(params, batch)
        return tx.update(grads, state, params, unexpected_extra_args_your_optimizer_doesnt_expect=1)

    with jax.set_mesh(mesh):
        params_w, state0, batches = jax.device_put(
            optdist.replicate((params, tx.init(params)), WORKERS) + (batches,), sharding
        )
        run = optdist.data_parallel(step, mesh, AXIS)
        updates1, state1 = run(params_w, state0, batches)
        traces_after_first = len(traces)
        updates2, state2 = run(params_w, state1, batches)
        types = [jax.tree_util.tree_map(jax.typeof, s) for s in (state0, state1, state2)]
    return dict(
        params_w=params_w, types=types, updates=(updates1, updates2), traces=(traces_after_first, len(traces))
    )


@pytest.mark.parametrize("name", NAMES)
def test_accepts_unexpected_extra_args(name):
    probe = mesh_probe(name)
    for updates in probe["updates"]:
        assert jax.tree_util.tree_structure(updates) == jax.tree_util.tree_structure(probe["params_w"])
        assert all(np.isfinite(np.asarray(u, np.float32)).all() for u in jax.tree_util.tree_leaves(updates))


@pytest.mark.parametrize("name", NAMES)
def test_no_recompilation_on_second_call(name):
    first, second = mesh_probe(name)["traces"]
    assert first == 1, "the step was traced more than once on its first call"
    assert second == 1, "the jitted step retraced on its second call: the state does not round-trip"


@pytest.mark.parametrize("name", NAMES)
def test_float32_updates_keep_the_parameters_dtype(name):
    probe = mesh_probe(name)
    for updates in probe["updates"]:
        assert spec(updates) == spec(probe["params_w"])


def assert_same_types(a, b, what):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b), what
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        assert x == y, f"{what}: {x} vs {y}"


@pytest.mark.parametrize("name", NAMES)
def test_state_types_stable_across_updates_under_explicit_mesh(name):
    """sharding_test's init/update type match, for the stacked per-worker state under data_parallel:
    every leaf keeps shape, dtype and sharding (the worker axis split over the mesh)."""
    init, first, second = mesh_probe(name)["types"]
    assert_same_types(init, first, "state type changed by the first update")
    assert_same_types(init, second, "state type changed by the second update")


@pytest.mark.parametrize("name", names("abstract_init"))
def test_abstract_init_under_explicit_mesh(name):
    """sharding_test's abstract init and init/jit(init) type match, on one worker whose parameters
    are sharded over an explicit-axes mesh (init needs no worker axis)."""
    tx = REGISTRY[name].make(AXIS)
    mesh = explicit_mesh("model")
    with jax.set_mesh(mesh):
        params = {
            "w": jnp.zeros((4, 8), out_sharding=NamedSharding(mesh, P(None, "model"))),
            "b": jnp.zeros((8,), out_sharding=NamedSharding(mesh, P("model"))),
        }
        abstract = jax.eval_shape(tx.init, jax.tree_util.tree_map(jax.typeof, params))
        eager = jax.tree_util.tree_map(jax.typeof, tx.init(params))
        jitted = jax.tree_util.tree_map(jax.typeof, jax.jit(tx.init)(params))
    assert_same_types(eager, jitted, "init and jit(init) disagree")
    shapes = lambda t: jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), t)  # noqa: E731
    assert shapes(abstract) == shapes(eager)
    # eval_shape leaves a replicated leaf's sharding unset (None); init's is P().
    spec_of = lambda x: P() if x.sharding is None else x.sharding.spec  # noqa: E731
    for a, e in zip(jax.tree_util.tree_leaves(abstract), jax.tree_util.tree_leaves(eager)):
        assert spec_of(a) == spec_of(e), f"eval_shape sharding {spec_of(a)}, init {spec_of(e)}"
    # Parameter-shaped state (residuals, moments, anchors) follows the parameters' sharding.
    params_specs = {
        (x.shape, spec_of(x)) for x in jax.tree_util.tree_leaves(jax.tree_util.tree_map(jax.typeof, params))
    }
    for e in jax.tree_util.tree_leaves(eager):
        if e.shape in {(4, 8), (8,)} and e.dtype == jnp.float32:
            assert (e.shape, spec_of(e)) in params_specs, (
                f"a parameter-shaped state leaf lost its sharding: {e}"
            )


# --------------------------------------------------------------------------------------------------
# optax.tree.map_params

# optax.tree.map_params runs init on a shape-free placeholder and matches the resulting tree against
# the state. Where the state's *structure* is derived from the parameters' shapes (one entry per
# block shape or leaf), the placeholder builds a different tree, so map_params cannot apply (optax's
# own design: it finds parameter trees by structure). These must still raise (checked below).
MAP_PARAMS_EXCLUDED: dict[str, str] = {
    "shampoo": "statistics are a dict keyed by block shape ('4x3', '1x3'), built from the leaf shapes",
    "shampoo[distributed roots]": "statistics are a dict keyed by block shape, built from the leaf shapes",
    "powersgd": "the warm-started Q factors are batched per group of same-shape matrices, e.g. "
    "q=((1, 3, 1),): not a tree shaped like the parameters",
    "compressed_mean[demo]": "the compressor's parameter-shaped buffers are a flat tuple in leaf order, "
    "not a tree structured like the parameters (storing them as one would make map_params apply)",
    "streaming_diloco": "fragments are groups of whole leaves: init needs the leaf count (the placeholder "
    "has none, so num_fragments=2 is rejected)",
    "micro_adam": "the ring buffer and the quantized error are per-leaf tuples in leaf order, sized from the "
    "leaf sizes (k per block, buckets): not trees shaped like the parameters",
    "fish_mask": "the mask is kept as a tuple of per-leaf index vectors (k entries each), read from a "
    "concrete mask at init: not a tree shaped like the parameters",
}


@pytest.mark.parametrize("name", NAMES)
def test_tree_map_params(name):
    tx = REGISTRY[name].make(AXIS)
    params, _ = problem()
    state = tx.init(params)
    if name in MAP_PARAMS_EXCLUDED:
        with pytest.raises(Exception):  # noqa: B017 - the exclusion must stay true
            optax.tree.map_params(tx, lambda v: v, state)
        return
    same = optax.tree.map_params(tx, lambda v: v, state)
    assert jax.tree_util.tree_structure(same) == jax.tree_util.tree_structure(state)
    jax.tree_util.tree_map(np.testing.assert_array_equal, same, state)
    # Parameter-shaped trees (error residuals, anchors, moments) are mapped, nothing else is.
    zeroed = optax.tree.map_params(tx, jnp.zeros_like, state, transform_non_params=lambda v: v)
    assert spec(zeroed) == spec(state)


# --------------------------------------------------------------------------------------------------
# Convergence on optax's targets (joint: the objectives are separable, so each target's leaves
# see exactly their own gradient).


def targets(dtype=jnp.float32):
    initial = {
        "parabola": jnp.array([-1.0, 10.0, 1.0], dtype),
        "rosenbrock": jnp.array([0.0, 0.0], dtype),
        "matrix": jnp.zeros((2, 2), dtype),
        "mixed": (jnp.zeros((3,), dtype), jnp.zeros((2, 2), dtype)),
    }
    final = {
        "parabola": jnp.array([1.0, -1.0, 1.0], dtype),
        "rosenbrock": jnp.array([1.0, 1.0], dtype),
        "matrix": jnp.array([[3.0, -2.0], [1.0, 4.0]], dtype),
        "mixed": (jnp.array([1.0, -1.0, 2.0], dtype), jnp.array([[1.0, 0.0], [-1.0, 1.0]], dtype)),
    }

    def objective(p):
        sq = lambda x, t: jnp.sum((x - t) ** 2)  # noqa: E731
        r = p["rosenbrock"]
        rosen = (1.0 - r[0]) ** 2 + 100.0 * (r[1] - r[0] ** 2) ** 2
        mixed = sq(p["mixed"][0], final["mixed"][0]) + sq(p["mixed"][1], final["mixed"][1])
        return sq(p["parabola"], final["parabola"]) + rosen + sq(p["matrix"], final["matrix"]) + mixed

    return initial, final, objective


CONVERGE_STEPS = 2000
# SGD with momentum: Rosenbrock's curvature (about 1000 at the minimum) needs a small step; with
# it every target converges in CONVERGE_STEPS for the exact mean, the robust aggregators and most
# compressors.
SGD_M = lambda lr=1e-3: optax.sgd(lr, momentum=0.9)  # noqa: E731

# name -> (transform for the convergence run, steps). The learning rates in REGISTRY are for the
# linear problem; on these targets they diverge (SGD 0.1 on Rosenbrock) or cycle, so these entries
# keep their method and structure (sync period, fragments, compressor) with a step size that
# converges. Measured on this file's targets, 4 workers, float32 (max error over the targets):
CONVERGE_OVERRIDES = {
    # Single-call extragradient and MASHA: the registry's 0.05 diverges on Rosenbrock (curvature ~1000 at
    # the minimum; optimistic gradient is stable for step x curvature < 2/3): the largest stable steps.
    "past_extragradient": (lambda ax: optdist.minmax.past_extragradient(6e-4, ax), 8000),
    "optimistic_gradient": (lambda ax: optdist.minmax.optimistic_gradient(6e-4, ax), 8000),
    "masha1": (lambda ax: optdist.minmax.masha1(1e-3, compressors.rand_k(0.5), ax, tau=0.5), 8000),
    "masha2": (lambda ax: optdist.minmax.masha2(1e-3, compressors.top_k(0.3), ax, tau=0.5), 8000),
    # Local SGD(0.1) diverges on Rosenbrock: momentum SGD 1e-3 inside, schedule-free SGD(1.0) outside.
    "outer_loop[schedule_free]": (
        lambda ax: optdist.outer_loop(
            SGD_M(), optax.contrib.schedule_free(optax.sgd(1.0), 1.0, b1=0.9), 2, ax
        ),
        CONVERGE_STEPS,
    ),
    # multi-momentum is already a momentum: plain SGD after it (SGD_M's second momentum diverges).
    "multi_momentum": (
        lambda ax: optax.chain(REGISTRY["multi_momentum"].make(ax), optax.sgd(1e-3)),
        CONVERGE_STEPS,
    ),
    # The unbiased sketch's variance is (b + 1) / s = 3 times |g|^2 on Rosenbrock's 2-entry leaf (one
    # row): momentum SGD 1e-3 diverges (NaN) and Adam(0.02) keeps a noise floor (0.19 after 3000 steps);
    # Adam with the step cosine-decayed 100x over 6000 steps converges (Rosenbrock error 0.0056 - 0.03).
    "compressed_mean[sketch]": (
        lambda ax: optax.chain(
            REGISTRY["compressed_mean[sketch]"].make(ax),
            optax.adam(optax.cosine_decay_schedule(0.02, 6000, 0.01)),
        ),
        6000,
    ),
    # A fixed mask freezes the off-mask coordinates, so the targets' minimisers are reached only with
    # the full mask (same transform and wire format, every entry kept).
    "fish_mask": (
        lambda ax: optax.chain(
            memory.fish_mask(lambda p: jax.tree_util.tree_map(lambda x: np.ones(x.shape, bool), p), ax),
            SGD_M(),
        ),
        CONVERGE_STEPS,
    ),
    # MicroAdam's short window makes it sign-like (v from 2 gradients): at a constant step it cycles
    # (parabola error 0.07 at lr 0.05); an exponentially decaying step converges (Rosenbrock excluded).
    "micro_adam": (
        lambda ax: optax.chain(
            optdist.mean_gradients(ax),
            memory.micro_adam(
                optax.exponential_decay(0.01, 8000, 0.01), density=0.5, window=2, bucket_size=3
            ),
        ),
        8000,
    ),
    # Local optimizer SGD(0.1) diverges on Rosenbrock: momentum SGD 1e-3 (like the gradient entries).
    "local_sgd": (lambda ax: optdist.local_sgd(SGD_M(), 2, ax), CONVERGE_STEPS),
    "delayed_nesterov": (lambda ax: optdist.delayed_nesterov(SGD_M(), 2, ax, buffer_size=2), CONVERGE_STEPS),
    "gossip[ring]": (lambda ax: optax.chain(SGD_M(), optdist.gossip("ring", ax)), CONVERGE_STEPS),
    "gossip[choco+top_k]": (
        lambda ax: optax.chain(
            SGD_M(), optdist.gossip("ring", ax, compressors.top_k(0.3), consensus_step_size=0.5)
        ),
        CONVERGE_STEPS,
    ),
    "gradient_tracking": (
        lambda ax: optax.chain(
            optdist.gradient_tracking("exponential", ax),
            SGD_M(),
            optdist.gossip("exponential", ax, order="combine_then_adapt"),
        ),
        CONVERGE_STEPS,
    ),
    # Plain SGD clients (no momentum): the largest stable Rosenbrock step, and 8000 steps for its valley.
    "fedavg": (lambda ax: optdist.fedavg(1.9e-3, 1.0, 2, ax), 8000),
    "scaffold": (lambda ax: optdist.scaffold(1.9e-3, 2, ax), 8000),
    # FedOpt server optimizers with the registry's client SGD(0.1) diverge on Rosenbrock.
    "fedadam": (lambda ax: optdist.fedadam(1e-3, 0.05, 2, ax), CONVERGE_STEPS),
    "fedyogi": (lambda ax: optdist.fedyogi(1e-3, 0.05, 2, ax), CONVERGE_STEPS),
    # DiLoCo's AdamW inner + Nesterov(0.7, 0.9) outer limit-cycles on a deterministic quadratic at a
    # constant step (parabola error 0.7 after 2000 steps even without weight decay); decoupled weight
    # decay moves the minimiser. Weight decay 0, outer momentum 0.5, inner lr 0.005.
    "diloco": (
        lambda ax: optdist.diloco(
            0.005, outer_momentum=0.5, sync_every=2, axis_name=ax, inner_weight_decay=0.0
        ),
        4000,
    ),
    "streaming_diloco": (
        lambda ax: optdist.streaming_diloco(
            0.005, 2, ax, num_fragments=2, delay=1, alpha=0.5, outer_momentum=0.5, inner_weight_decay=0.0
        ),
        8000,
    ),
    "local_adaptive": (lambda ax: optdist.local_adaptive(0.01, 2, ax), 8000),
    # Shampoo's output is preconditioned (AdaGrad-like with beta2=1): it needs a larger step than SGD's.
    "shampoo": (
        lambda ax: optax.chain(REGISTRY["shampoo"].make(ax), optax.sgd(0.5)),
        4000,
    ),
    "shampoo[distributed roots]": (
        lambda ax: optax.chain(REGISTRY["shampoo[distributed roots]"].make(ax), optax.sgd(0.5)),
        4000,
    ),
    # Rosenbrock is a 2-element leaf: top-k 30% (own or cyclic indices) and scaled sign send one
    # coordinate's worth per step, rand_k 50% doubles one random coordinate (SGD 1e-3 with momentum
    # diverges on it).
    "compressed_mean[top_k+ef]": (
        lambda ax: optax.chain(REGISTRY["compressed_mean[top_k+ef]"].make(ax), SGD_M(3e-4)),
        8000,
    ),
    "compressed_mean[cyclic_top_k+ef]": (
        lambda ax: optax.chain(REGISTRY["compressed_mean[cyclic_top_k+ef]"].make(ax), SGD_M(3e-4)),
        8000,
    ),
    "compressed_mean[sign+econtrol]": (
        lambda ax: optax.chain(REGISTRY["compressed_mean[sign+econtrol]"].make(ax), SGD_M(3e-4)),
        8000,
    ),
    "compressed_mean[rand_k]": (
        lambda ax: optax.chain(REGISTRY["compressed_mean[rand_k]"].make(ax), optax.adam(0.02)),
        3000,
    ),
}


# Targets a transform does not reach within optax's tolerance, with the reason; the test still bounds
# their error (CONVERGE_BOUND) and asserts the other targets.
CONVERGE_TARGETS_EXCLUDED = {
    **{
        name: {
            "rosenbrock": "first order at the largest stable constant step (no momentum) creeps along the "
            "valley like gradient descent: max error 0.064 after 8000 steps (6e-4), MASHA 0.13 after 8000 "
            "calls (1e-3); measured on 4 workers, float32"
        }
        for name in ("past_extragradient", "optimistic_gradient", "masha1", "masha2")
    },
    "micro_adam": {
        "rosenbrock": "top-1 of the 2-entry leaf per step with a 2-gradient window moves one coordinate at a "
        "time along the curved valley: max error 0.11 after 8000 steps (lr 0.01 decayed to 1e-4)"
    },
    "compressed_mean[sign+econtrol]": {
        "rosenbrock": "scaled sign with EControl at a constant step keeps a small cycle around Rosenbrock's "
        "minimum (max error 0.05 after 8000 steps, 0.06 after 10000, SGD 3e-4 momentum 0.9), at "
        "optax's tolerance (0.03 + 0.03 |x*|)"
    },
}
CONVERGE_BOUND = 0.2


def converge_tx(name):
    if name in CONVERGE_OVERRIDES:
        make, steps = CONVERGE_OVERRIDES[name]
        return make(AXIS), steps
    entry = REGISTRY[name]
    tx = entry.make(AXIS)
    return (optax.chain(tx, SGD_M()) if entry.output == "gradient" else tx), CONVERGE_STEPS


@pytest.mark.parametrize("name", NAMES)
def test_converges_on_optax_targets(name):
    initial, final, objective = targets()
    tx, steps = converge_tx(name)

    def run(params, state):
        def body(carry, _):
            p, s = carry
            updates, s = tx.update(jax.grad(objective)(p), s, p)
            return (optax.apply_updates(p, updates), s), None

        return jax.lax.scan(body, (params, state), None, length=steps)[0]

    params_w = optdist.replicate(initial, WORKERS)
    params_w, _ = optdist.simulate(run, AXIS)(params_w, jax.vmap(tx.init)(params_w))
    errors = {}
    for target in final:
        got = jax.tree_util.tree_leaves(params_w[target])  # [workers, ...] each
        want = jax.tree_util.tree_leaves(final[target])
        errors[target] = max(
            float(np.max(np.abs(np.asarray(g, np.float64) - np.asarray(t)) - 3e-2 * np.abs(np.asarray(t))))
            for g, t in zip(got, want)
        )
    # optax's tolerance: |x - x*| <= atol + rtol |x*| with rtol = atol = 3e-2, on every worker.
    excluded = CONVERGE_TARGETS_EXCLUDED.get(name, {})
    failed = {t: round(e, 4) for t, e in errors.items() if t not in excluded and not e <= 3e-2}
    loose = {t: round(errors[t], 4) for t in excluded if not errors[t] <= CONVERGE_BOUND}
    assert not loose, f"excluded targets beyond the bound {CONVERGE_BOUND}: {loose}"
    assert not failed, f"not converged after {steps} steps (error beyond the rtol part): {failed}"


# --------------------------------------------------------------------------------------------------
# inject_hyperparams


def _alternate(step):  # multi_momentum's cluster id: the two clusters in turn
    return step % 2


def _inject_cases():
    """name -> (factory, kwargs as in REGISTRY, the learning-rate arguments to inject)."""
    minmax = optdist.minmax
    vi_kw = dict(learning_rate=0.05, axis_name=AXIS)
    masha_kw = lambda c: dict(vi_kw, compressor=c, tau=0.5)  # noqa: E731
    shampoo_kw = dict(learning_rate=0.1, block_size=4, precondition_every=2, matrix_epsilon=1e-2)
    return {
        "past_extragradient": (minmax.past_extragradient, vi_kw, ("learning_rate",)),
        "optimistic_gradient": (minmax.optimistic_gradient, vi_kw, ("learning_rate",)),
        "masha1": (minmax.masha1, masha_kw(compressors.rand_k(0.5)), ("learning_rate",)),
        "masha2": (minmax.masha2, masha_kw(compressors.top_k(0.3)), ("learning_rate",)),
        "diloco": (
            optdist.diloco, dict(inner_lr=0.01, sync_every=2, axis_name=AXIS), ("inner_lr", "outer_lr")
        ),
        "streaming_diloco": (
            optdist.streaming_diloco,
            dict(inner_lr=0.01, sync_every=2, axis_name=AXIS, num_fragments=2, delay=1, alpha=0.5),
            ("inner_lr", "outer_lr"),
        ),
        "fedavg": (optdist.fedavg, dict(client_lr=0.1, server_lr=1.0, sync_every=2, axis_name=AXIS),
                   ("client_lr", "server_lr")),
        "fedadam": (optdist.fedadam, dict(client_lr=0.1, server_lr=0.01, sync_every=2, axis_name=AXIS),
                    ("client_lr", "server_lr")),
        "fedyogi": (optdist.fedyogi, dict(client_lr=0.1, server_lr=0.01, sync_every=2, axis_name=AXIS),
                    ("client_lr", "server_lr")),
        "scaffold": (optdist.scaffold, dict(client_lr=0.1, sync_every=2, axis_name=AXIS),
                     ("client_lr", "server_lr")),
        "local_adaptive": (optdist.local_adaptive, dict(learning_rate=0.01, sync_every=2, axis_name=AXIS),
                           ("learning_rate",)),
        # The registry chains mean_gradients with scale_by_shampoo (no learning rate); optdist.shampoo
        # is the learning-rate-taking factory of the same preconditioner.
        "shampoo": (optdist.shampoo, shampoo_kw, ("learning_rate",)),
        "shampoo[distributed roots]": (optdist.shampoo, dict(shampoo_kw, axis_name=AXIS), ("learning_rate",)),
        "micro_adam": (memory.micro_adam, dict(learning_rate=0.05, density=0.5, window=2, bucket_size=3),
                       ("learning_rate",)),
        "multi_momentum": (optdist.momentum.multi_momentum,
                           dict(learning_rate=0.1, num_clusters=2, cluster_schedule=_alternate),
                           ("learning_rate",)),
    }  # fmt: skip


INJECT_CASES = _inject_cases()
_NO_LR = "no optdist factory here takes a learning rate: the step size lives in a chained optax optimizer"
INJECT_EXCLUDED = {
    "mean_gradients": _NO_LR,
    "local_sgd": "the local optimizer is an optax transform argument; local_sgd has no learning rate",
    "delayed_nesterov": "outer_lr only: the local optimizer is an optax transform argument (checked "
    "through the diloco / fedopt entries, which share the outer loop)",
    "robust_mean[mean]": _NO_LR,
    "robust_mean[trimmed_mean]": _NO_LR,
    "robust_mean[centered_clip+nnm]": _NO_LR,
    "robust_mean[upgrad]": _NO_LR,
    "backup_mean": _NO_LR,
    "dynamic_backup_mean": "learning_rate is the SGD step DBW's gain model assumes, not a step it applies: "
    "the step size lives in a chained optax optimizer",
    "byzantine[alie]+median": _NO_LR,
    "gossip[ring]": _NO_LR,
    "gossip[choco+top_k]": _NO_LR,
    "gradient_tracking": _NO_LR,
    "powersgd": _NO_LR,
    "fish_mask": _NO_LR,
    "dp_diff_mean": _NO_LR,
    "outer_loop[schedule_free]": "the inner and outer optimizers are optax transform arguments "
    "(schedule_free's learning rate belongs to the optax factory)",
    "median_gradients[geometric]": _NO_LR,
    "running_median": _NO_LR,
    "robust_mean[smea]": _NO_LR,
    **{n: _NO_LR for n in NAMES if n.startswith("compressed_mean[")},
}


@pytest.mark.parametrize("name", names("inject", sorted(INJECT_CASES)))
def test_inject_hyperparams_equals_plain_factory(name):
    factory, kwargs, injected = INJECT_CASES[name]
    # inject_hyperparams turns every numeric argument, defaults included, into an array; only the
    # learning rates are meant to be injected (structural ints such as sync_every stay static).
    named = inspect.signature(factory).parameters.items()
    variadic = (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
    static = tuple(k for k, p in named if k not in injected and p.kind not in variadic)
    if factory is optdist.shampoo:  # the library's documented list
        assert set(static) == set(optdist.SHAMPOO_STATIC_ARGS)
        static = optdist.SHAMPOO_STATIC_ARGS
    plain = factory(**kwargs)
    inject = optax.inject_hyperparams(factory, static_args=static)(**kwargs)
    params, batches = problem()
    params_w = optdist.replicate(params, WORKERS)

    def steps(tx, p, batch):  # step 2 is a sync step of the outer loops / a root refresh of Shampoo
        def body(carry, _):
            p, s = carry
            updates, s = tx.update(jax.grad(linear_loss)(p, batch), s, p)
            return (optax.apply_updates(p, updates), s), updates

        (_, s), updates = jax.lax.scan(body, (p, tx.init(p)), None, length=2)
        return updates, s

    both = lambda p, batch: (steps(plain, p, batch), steps(inject, p, batch))  # noqa: E731  one compile
    (updates, state), (updates_inject, state_inject) = optdist.simulate(both, AXIS)(params_w, batches)
    assert set(state_inject.hyperparams) >= set(k for k in injected if k in kwargs)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), updates_inject, updates
    )
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(
            np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=1e-5, atol=1e-6
        ),
        state_inject.inner_state,
        state,
    )


# --------------------------------------------------------------------------------------------------
# bfloat16 dtype and optax.MultiSteps (one compiled function per transform).


@pytest.mark.parametrize("name", NAMES)
def test_multisteps_accumulates_and_bfloat16_parameters_stay_bfloat16(name):
    inner = REGISTRY[name].make(AXIS)
    every = 4
    multi = optax.MultiSteps(inner, every_k_schedule=every)
    params, batches = problem()
    params = jax.tree_util.tree_map(lambda p: p.astype(jnp.bfloat16), params)
    batches = batches.astype(jnp.bfloat16)
    params_w = optdist.replicate(params, WORKERS)

    full = optax.chain(inner, optax.sgd(0.1)) if REGISTRY[name].output == "gradient" else inner

    def run(p, batch):
        grads = jax.grad(linear_loss)(p, batch)
        direct, _ = inner.update(grads, inner.init(p), p)  # the inner update of this (mean) gradient

        # Two training steps on bfloat16 parameters (test_common's train step, chained with SGD for
        # gradient outputs): the parameters and the state keep their dtypes.
        def train_step(carry, _):
            trained, state = carry
            updates, state = full.update(jax.grad(linear_loss)(trained, batch), state, trained)
            return (optax.apply_updates(trained, updates), state), None

        (trained, state), _ = jax.lax.scan(train_step, (p, full.init(p)), None, length=2)

        def mini_step(ms_state, _):  # parameters do not move on mini-steps: every gradient is equal
            updates, ms_state = multi.update(grads, ms_state, p)
            return ms_state, updates

        _, stacked = jax.lax.scan(mini_step, multi.init(p), None, length=every)
        steps = [jax.tree_util.tree_map(lambda u, i=i: u[i], stacked) for i in range(every)]
        return steps, direct, trained, (full.init(p), state)

    mini, direct, trained, (state0, state2) = optdist.simulate(run, AXIS)(params_w, batches)
    assert {x.dtype for x in jax.tree_util.tree_leaves(trained)} == {jnp.dtype(jnp.bfloat16)}
    assert all(np.isfinite(np.asarray(x, np.float32)).all() for x in jax.tree_util.tree_leaves(trained))
    assert spec(state2) == spec(state0), "two bfloat16 steps changed the state's shapes or dtypes"
    for i, updates in enumerate(mini):
        assert spec(updates) == spec(params_w), f"mini-step {i}: updates changed dtype"
    assert spec(direct) == spec(params_w), "the transform's updates are not bfloat16"
    for updates in mini[:-1]:  # accumulation steps emit exact zeros
        for u in jax.tree_util.tree_leaves(updates):
            np.testing.assert_array_equal(np.asarray(u, np.float32), 0.0)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(
            np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-2, atol=1e-3
        ),
        mini[-1],
        direct,
    )


# --------------------------------------------------------------------------------------------------
# The exclusion tables cover the registry.


def test_every_registry_entry_is_checked_or_excluded():
    assert set(INJECT_CASES) | set(INJECT_EXCLUDED) == set(NAMES)
    assert not set(INJECT_CASES) & set(INJECT_EXCLUDED)
    assert set(CONVERGE_OVERRIDES) <= set(NAMES)
    assert set(MAP_PARAMS_EXCLUDED) <= set(NAMES)
    assert set(CONVERGE_TARGETS_EXCLUDED) <= set(NAMES)
    assert all(set(t) <= set(targets()[1]) for t in CONVERGE_TARGETS_EXCLUDED.values())
    for test, marks in XFAIL.items():
        assert set(marks) <= set(NAMES), test
