"""Every public factory rejects bad hyperparameters at construction, naming the parameter; every
transform of the common suite handles edge leaves or names them.

The table walks every public factory in ``optdist.__all__`` (a test checks none
is missing) with values outside the allowed range. The edge-leaf table walks
``tests/test_common.py::REGISTRY`` with zero-element, 0-d, integer and half-precision leaves.
"""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optdist
from optdist import aggregators, attacks, memory, minmax
from tests.test_common import NAMES, REGISTRY

SGD = optax.sgd(0.1)

# (public name, call with a bad value, the parameter the message must name)
BAD = [
    ("extragradient", lambda: minmax.extragradient(0.0), "learning_rate"),
    ("extragradient", lambda: minmax.extragradient(0.1, projection="box"), "projection"),
    ("past_extragradient", lambda: minmax.past_extragradient(-1.0), "learning_rate"),
    ("optimistic_gradient", lambda: minmax.optimistic_gradient(0.1, aggregator=3), "aggregator"),
    ("reflected_gradient", lambda: minmax.reflected_gradient(0.1, projection=1), "projection"),
    ("masha1", lambda: minmax.masha1(0.1, optdist.compressors.rand_k(0.1), tau=1.5), "tau"),
    ("masha2", lambda: minmax.masha2(0.1, "top_k", tau=0.5), "compressor"),
    ("local_gda", lambda: minmax.local_gda(-0.1, 4), "learning_rate"),
    ("minmax_operator", lambda: minmax.minmax_operator(None), "loss_fn"),
    ("mean_gradients", lambda: optdist.mean_gradients(3), "axis_name"),
    ("mean_gradients", lambda: optdist.mean_gradients(("a", "a")), "axis_name"),
    ("skip_nonfinite", lambda: optdist.skip_nonfinite(lambda g: g), "inner"),
    ("replicate", lambda: optdist.replicate({"a": jnp.ones(2)}, 0), "num_workers"),
    ("shard_batch", lambda: optdist.shard_batch(jnp.ones((6, 2)), 4), "worker count"),
    ("simulate", lambda: optdist.simulate(lambda x: x, ("a", "b")), "axis_sizes"),
    ("data_parallel", lambda: optdist.data_parallel(lambda x: x, _mesh(), "model"), "axis_name"),
    ("outer_loop", lambda: optdist.outer_loop(SGD, optax.sgd(1.0), 0, "data"), "sync_every"),
    ("local_sgd", lambda: optdist.local_sgd(SGD, -1, "data"), "sync_every"),
    ("diloco", lambda: optdist.diloco(-1e-3, sync_every=10), "inner_lr"),
    ("diloco", lambda: optdist.diloco(1e-3, outer_momentum=1.5), "outer_momentum"),
    ("streaming_diloco", lambda: optdist.streaming_diloco(1e-3, 10, alpha=1.5), "alpha"),
    ("sparseloco", lambda: optdist.sparseloco(0.01, density=2.0), "density"),
    ("sparseloco", lambda: optdist.sparseloco(0.01, indices="shared"), "indices"),
    ("sparseloco", lambda: optdist.sparseloco(0.01, values="summed"), "values"),
    ("muloco", lambda: optdist.muloco(0.01, bits=3), "bits"),
    ("diloco", lambda: optdist.diloco(1e-3, inner_dtype="float16"), "inner_dtype"),
    ("streaming_diloco", lambda: optdist.streaming_diloco(1e-3, 10, inner_eps=-1.0), "inner_eps"),
    ("fedavg", lambda: optdist.fedavg(0.1, -1.0, 10), "server_lr"),
    ("fedadam", lambda: optdist.fedadam(0.1, 0.01, 0), "sync_every"),
    ("fedyogi", lambda: optdist.fedyogi(0.1, 0.01, 10, tau=-1.0), "tau"),
    ("fedadagrad", lambda: optdist.fedadagrad(-0.1, 0.01, 10), "client_lr"),
    ("scaffold", lambda: optdist.scaffold(0.0, 10), "client_lr"),
    ("local_adaptive", lambda: optdist.local_adaptive(0.1, 10, scaling="sgd"), "scaling"),
    ("delayed_nesterov", lambda: optdist.delayed_nesterov(SGD, 10, buffer_size=0), "buffer_size"),
    ("async_local_sgd", lambda: optdist.async_local_sgd(SGD, 2, [1, 2], outer_lr=-1.0), "outer_lr"),
    ("qsr_sync_every", lambda: optdist.qsr_sync_every(0, 0.1, 0.01), "base"),
    (
        "compressed_mean",
        lambda: optdist.compressed_mean(optdist.compressors.top_k(0.1), "data", "ef3"),
        "feedback",
    ),
    ("compressed_mean", lambda: optdist.compressed_mean("top_k", "data"), "compressor"),
    ("powersgd", lambda: optdist.powersgd(0, "data"), "rank"),
    ("micro_adam", lambda: memory.micro_adam(1e-3, density=1.5), "density"),
    ("micro_adam", lambda: memory.micro_adam(1e-3, bits=2), "bits"),
    ("fish_mask", lambda: memory.fish_mask({"w": np.ones(3)}, "data"), "mask"),
    ("memory.fisher_mask", lambda: memory.fisher_mask({"w": np.ones(3)}, 0.0), "density"),
    ("compressors.powersgd", lambda: optdist.compressors.powersgd(-1), "rank"),
    ("compressors.powersgd", lambda: optdist.compressors.powersgd(2, impl="cuda"), "impl"),
    ("powersgd", lambda: optdist.powersgd(2, "data", impl="triton"), "impl"),
    ("compressors.top_k", lambda: optdist.compressors.top_k(0.0), "ratio"),
    ("compressors.top_k", lambda: optdist.compressors.top_k(1.5), "ratio"),
    ("compressors.rand_k", lambda: optdist.compressors.rand_k(-0.1), "ratio"),
    ("compressors.rand_k", lambda: optdist.compressors.rand_k(0.1, sampling="poisson"), "sampling"),
    ("compressors.qsgd", lambda: optdist.compressors.qsgd(0), "levels"),
    ("compressors.int8", lambda: optdist.compressors.int8(100), "bucket_size"),
    ("compressors.int8", lambda: optdist.compressors.int8(rounding="up"), "rounding"),
    ("compressors.int8", lambda: optdist.compressors.int8(impl="cuda"), "impl"),
    ("compressors.ternary", lambda: optdist.compressors.ternary(8), "bucket_size"),
    ("compressors.scaled_sign", lambda: optdist.compressors.scaled_sign(16), "bucket_size"),
    ("compressors.threshold_top_k", lambda: optdist.compressors.threshold_top_k(0.0), "ratio"),
    ("compressors.threshold_top_k", lambda: optdist.compressors.threshold_top_k(0.1, tol=1.0), "tol"),
    (
        "compressors.threshold_top_k",
        lambda: optdist.compressors.threshold_top_k(0.1, max_refine=-1),
        "max_refine",
    ),
    ("compressors.terngrad", lambda: optdist.compressors.terngrad(-1.0), "clip_sigma"),
    ("compressors.cast", lambda: optdist.compressors.cast(jnp.int8), "dtype"),
    ("compressors.demo", lambda: optdist.compressors.demo(chunk=0), "chunk"),
    ("gossip", lambda: optdist.gossip("star", "data"), "topology"),
    ("gossip", lambda: optdist.gossip("ring", "data", order="first"), "order"),
    ("gossip", lambda: optdist.gossip("ring", "data", gossip_every=0), "gossip_every"),
    (
        "gossip",
        lambda: optdist.gossip("ring", "data", optdist.compressors.top_k(0.1), consensus_step_size=2.0),
        "consensus_step_size",
    ),
    ("gossip", lambda: optdist.gossip("ring", "data", optdist.compressors.demo()), "compressor"),
    ("gradient_tracking", lambda: optdist.gradient_tracking("line", "data"), "topology"),
    ("decentralized.torus", lambda: optdist.decentralized.torus(0, 2), "rows"),
    ("decentralized.one_peer_exponential", lambda: optdist.decentralized.one_peer_exponential(0), "size"),
    ("decentralized.custom", lambda: optdist.decentralized.custom(2, 0.7, [(0.7, (1, 0))]), "weights"),
    ("seeded_spsa", lambda: optdist.seeded_spsa("data", perturbation_scale=0.0), "perturbation_scale"),
    ("seeded_spsa", lambda: optdist.seeded_spsa("data", payload="int4"), "payload"),
    ("seeded_spsa", lambda: optdist.seeded_spsa("data", clip=-1.0), "clip"),
    ("robust_mean", lambda: optdist.robust_mean("median", "data"), "aggregator"),
    ("monna_sgd", lambda: optdist.monna_sgd(0.0, 1, "data"), "learning_rate"),
    ("aggregators.trimmed_mean", lambda: aggregators.trimmed_mean(-1), "f"),
    ("aggregators.centered_clip", lambda: aggregators.centered_clip(tau=0.0), "tau"),
    ("aggregators.geometric_median", lambda: aggregators.geometric_median(max_iters=0), "max_iters"),
    ("attacks.byzantine", lambda: attacks.byzantine(attacks.sign_flip(), num_byzantine=-1), "num_byzantine"),
    ("scale_by_multi_momentum", lambda: optdist.scale_by_multi_momentum(0, 0.9), "num_clusters"),
    ("dp_diff_mean", lambda: optdist.dp_diff_mean(0.0, 1.0, 2, "data"), "clip_norm"),
    ("dp_diff_mean", lambda: optdist.dp_diff_mean(1.0, 1.0, 0, "data"), "refresh_every"),
    ("upgrad", lambda: optdist.jacobian.upgrad(max_iters=0), "max_iters"),
    ("mgda", lambda: optdist.jacobian.mgda(tol=-1.0), "tol"),
    ("aggregate_jacobian", lambda: optdist.jacobian.aggregate_jacobian("upgrad"), "rule"),
    (
        "backup_mean_gradients",
        lambda: optdist.stragglers.backup_mean_gradients(1, "data", "pareto"),
        "delays",
    ),
    (
        "dynamic_backup_mean_gradients",
        lambda: optdist.stragglers.dynamic_backup_mean_gradients(
            "data", 4, optdist.stragglers.clock.exponential(), 0.1, initial_backup=3
        ),
        "initial_backup",
    ),
    ("smea", lambda: optdist.robust.smea(-1), "f"),
    ("smea", lambda: optdist.robust.smea(1, max_subsets=0), "max_subsets"),
    ("local_dp_noise", lambda: optdist.robust.local_dp_noise(0.0, 1.0), "clip_norm"),
    ("running_median", lambda: optdist.robust.running_median(-1.0), "tau"),
    ("median_gradients", lambda: optdist.robust.median_gradients("data", "mean"), "kind"),
    ("multi_momentum", lambda: _momentum().multi_momentum(0.1, 0), "num_clusters"),
    ("multi_momentum", lambda: _momentum().multi_momentum(0.1, 2, beta=1.0), "beta"),
    ("scale_by_shampoo", lambda: optdist.scale_by_shampoo(block_size=0), "block_size"),
    ("scale_by_shampoo", lambda: optdist.scale_by_shampoo(matrix_epsilon=-1.0), "matrix_epsilon"),
    ("shampoo", lambda: optdist.shampoo(0.1, beta2=1.5), "beta2"),
    ("matrix_inverse_pth_root", lambda: optdist.matrix_inverse_pth_root(jnp.eye(3), 0), "p"),
    (
        "matrix_inverse_pth_root",
        lambda: optdist.matrix_inverse_pth_root(jnp.eye(3), 2, ridge_epsilon=-1.0),
        "ridge_epsilon",
    ),
]

# Public callables that are not factories with hyperparameters to validate.
NOT_FACTORIES = {
    "schedule_free_eval_params",
    "global_params",
    "bytes_sent",
    "is_replicated",
    "num_workers",
    "unreplicate",
    "worker_index",
    "worker_specs",
}


def _momentum():
    import optdist.momentum

    return optdist.momentum


def _mesh():
    import jax

    return jax.make_mesh((8,), ("data",))


@pytest.mark.parametrize("name,make,param", BAD, ids=[f"{n}:{p}" for n, _, p in BAD])
def test_bad_hyperparameter_is_named(name, make, param):
    with pytest.raises((ValueError, TypeError)) as info:
        make()
    assert param in str(info.value), f"{name}: message does not name {param!r}: {info.value}"


def test_every_public_factory_is_in_the_table():
    factories = {
        n
        for n in optdist.__all__
        if callable(getattr(optdist, n))
        and not inspect.isclass(getattr(optdist, n))
        and n not in NOT_FACTORIES
    }
    covered = {n for n, _, _ in BAD}
    assert factories <= covered, f"add bad-value rows for: {sorted(factories - covered)}"


# --- Edge leaves (issue 18): every transform of the common suite either handles a zero-element leaf, a
# 0-d leaf, an integer leaf and float16 / bfloat16 leaves correctly (output of the leaf's shape and
# dtype, finite output and state, an empty leaf passed through untouched), or rejects the tree with an
# error that names the leaf and the fix. One jitted step per (transform, tree), tiny shapes.

EDGE_WORKERS = 4
EDGE_TREES = {
    # a zero-element leaf and a 0-d leaf next to an ordinary one
    "empty_and_0d": lambda: {"w": jnp.ones((5, 3)), "empty": jnp.ones((0, 3)), "scalar": jnp.ones(())},
    "integer": lambda: {"w": jnp.ones((5, 3)), "step": jnp.arange(3, dtype=jnp.int32)},
    "half": lambda: {"bf16": jnp.ones((5, 3), jnp.bfloat16), "fp16": jnp.ones((4, 3), jnp.float16)},
}
FIX_WORDS = ("cast", "pass ", "use ", "keep ")
# (transform, tree) pairs known to fail, with why; strict, so a fix shows up as an XPASS.
EDGE_XFAIL: dict[tuple[str, str], str] = {
    ("outer_loop[schedule_free]", "half"): "optax.contrib.schedule_free's init sizes its scalars with "
    "optax.tree.dtype(params, 'lowest'), which raises for a tree mixing bfloat16 and float16 leaves "
    "(neither promotes to the other): an optax limitation, the outer loop itself handles the tree",
}


def _edge_grads(params):
    leaves, treedef = jax.tree_util.tree_flatten(params)
    key = jax.random.key(0)

    def grad(i, p):
        shape = (EDGE_WORKERS, *p.shape)
        if not jnp.issubdtype(p.dtype, jnp.floating):
            return jnp.zeros(shape, p.dtype)
        return (0.1 * jax.random.normal(jax.random.fold_in(key, i), shape)).astype(p.dtype)

    return treedef.unflatten([grad(i, p) for i, p in enumerate(leaves)])


def _edge_params():
    return [
        pytest.param(
            name,
            tree,
            marks=[pytest.mark.xfail(strict=True, reason=EDGE_XFAIL[name, tree])]
            if (name, tree) in EDGE_XFAIL
            else [],
            id=f"{name}:{tree}",
        )
        for name in NAMES
        for tree in EDGE_TREES
    ]


def _finite(x):
    return not jnp.issubdtype(x.dtype, jnp.inexact) or bool(np.isfinite(np.asarray(x, np.float32)).all())


@pytest.mark.parametrize("name,tree", _edge_params())
def test_edge_leaves_are_handled_or_named(name, tree):
    tx = REGISTRY[name].make("data")
    params = EDGE_TREES[tree]()
    try:
        state = tx.init(params)
        params_w, state_w = optdist.replicate((params, state), EDGE_WORKERS)
        out, new_state = optdist.simulate(lambda g, s, p: tx.update(g, s, p))(
            _edge_grads(params), state_w, params_w
        )
    except (TypeError, ValueError) as error:
        message = str(error)
        named = [key for key in params if key != "w" and f"'{key}'" in message]
        assert named, f"{name} rejects the {tree} tree without naming the leaf: {message}"
        assert any(w in message.lower() for w in FIX_WORDS), f"{name}: no fix in the error: {message}"
        return
    assert jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(params)
    for key, p in params.items():
        o = out[key]
        assert o.shape == (EDGE_WORKERS, *p.shape) and o.dtype == p.dtype, (key, o.shape, o.dtype)
        assert _finite(o), f"{name}: output leaf {key!r} is not finite"
    bad = [
        jax.tree_util.keystr(k)
        for k, x in jax.tree_util.tree_flatten_with_path(new_state)[0]
        if not _finite(x)
    ]
    assert not bad, f"{name}: non-finite state entries {bad}"
