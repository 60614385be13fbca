"""Shampoo against a float64 NumPy reference of the paper's update, fallbacks, distribution, optax."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optdist
from optdist.preconditioning import (
    SHAMPOO_STATIC_ARGS,
    ShampooState,
    assign_blocks,
    make_layout,
    scale_by_shampoo,
    shampoo,
)
from tests.helpers import assert_trees_close, linear_problem, make_train_step, run_in_three_modes

STEPS = 20


def np_root(a, p, eps):
    w, v = np.linalg.eigh(a)
    w = np.maximum(w, 0.0)
    return (v * (w + eps * w[-1]) ** (-1.0 / p)) @ v.T


def np_shampoo(grads, merged, block_size, beta2, eps):
    """Float64 reference: blocked Shampoo (Gupta et al. 2018 / Anil et al. 2020), SGD grafting per block.

    grads: [T, *shape]; ``merged`` is the parameter's shape after merging small dims (given by hand).
    """
    out = np.zeros_like(grads)
    k = len(merged)
    chunks = [[slice(s, min(s + block_size, d)) for s in range(0, d, block_size)] for d in merged]
    stats = {blk: [0.0] * k for blk in itertools.product(*[range(len(c)) for c in chunks])}
    for t, g in enumerate(grads):
        g = g.reshape(merged)
        d_all = np.zeros(merged)
        for blk in stats:
            idx = tuple(chunks[i][j] for i, j in enumerate(blk))
            block = g[idx]
            d = block
            for i in range(k):
                gi = np.moveaxis(block, i, 0).reshape(block.shape[i], -1)
                gram = gi @ gi.T
                stats[blk][i] = (
                    stats[blk][i] + gram if beta2 == 1.0 else beta2 * stats[blk][i] + (1 - beta2) * gram
                )
                d = np.moveaxis(np.tensordot(np_root(stats[blk][i], 2 * k, eps), d, axes=(1, i)), 0, i)
            d_all[idx] = d * np.linalg.norm(block) / np.linalg.norm(d)
        out[t] = d_all.reshape(grads.shape[1:])
    return out


def np_diagonal(grads, beta2, eps):
    out, acc = np.zeros_like(grads), 0.0
    for t, g in enumerate(grads):
        acc = acc + g * g if beta2 == 1.0 else beta2 * acc + (1 - beta2) * g * g
        d = g * (acc + eps * acc.max()) ** -0.5
        out[t] = d * np.linalg.norm(g) / np.linalg.norm(d)
    return out


def scan_updates(tx, params):
    """``(state, grads [steps, ...]) -> (final state, outputs [steps, ...])`` in one ``lax.scan``."""

    def run(state, grads):
        def body(state, g):
            u, state = tx.update(g, state, params)
            return state, u

        return jax.lax.scan(body, state, grads)

    return run


def run_steps(tx, grads, params):
    """All outputs of ``tx`` over the leading (step) axis of ``grads``, in one jitted scan."""
    return jax.jit(scan_updates(tx, params))(tx.init(params), grads)


# (block_size, beta2, {name: (shape, merged shape or None for the diagonal fallback)})
CASES = {
    "blocked_and_order3": (4, 1.0, {"a": ((10, 7), (10, 7)), "c": ((2, 3, 5), (2, 3, 5))}),
    "merged_small_and_vector": (
        8,
        0.9,
        {"m": ((2, 3, 5), (6, 5)), "s": ((6, 5), (6, 5)), "t": ((1, 7, 1, 3), (7, 3)), "v": ((5,), None)},
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_direction_matches_float64_numpy_reference_over_20_steps(case):
    block_size, beta2, leaves = CASES[case]
    rng = np.random.default_rng(0)
    grads = {name: rng.normal(size=(STEPS, *shape)) for name, (shape, _) in leaves.items()}
    eps = 1e-6
    with jax.enable_x64(True):
        params = {name: jnp.zeros(shape, jnp.float64) for name, (shape, _) in leaves.items()}
        tx = scale_by_shampoo(
            block_size,
            beta2=beta2,
            matrix_epsilon=eps,
            grafting="sgd",
            precondition_every=1,
            start_preconditioning_step=0,
            root_method="eigh",
        )
        state, out = run_steps(tx, jax.tree_util.tree_map(jnp.asarray, grads), params)
        assert state.stats[next(iter(state.stats))][0].dtype == jnp.float64
    for name, (_, merged) in leaves.items():
        g = grads[name]
        ref = np_diagonal(g, beta2, eps) if merged is None else np_shampoo(g, merged, block_size, beta2, eps)
        np.testing.assert_allclose(np.asarray(out[name]), ref, rtol=1e-7, atol=1e-9, err_msg=name)


def test_iterative_roots_give_the_same_direction_in_float64():
    rng = np.random.default_rng(1)
    grads = rng.normal(size=(8, 6, 5))
    ref = np_shampoo(grads, (6, 5), 8, 1.0, 1e-6)
    with jax.enable_x64(True):
        params = jnp.zeros((6, 5), jnp.float64)
        for method in ("coupled_newton",):
            tx = scale_by_shampoo(
                8, grafting="sgd", start_preconditioning_step=0, root_method=method, matrix_epsilon=1e-6
            )
            _, out = run_steps(tx, jnp.asarray(grads), params)
            np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-7, err_msg=method)


def test_parameter_smaller_than_a_block_equals_unblocked_update():
    rng = np.random.default_rng(2)
    grads = jnp.asarray(rng.normal(size=(6, 6, 5)), jnp.float32)
    params = jnp.zeros((6, 5))
    outs = []
    for block_size in (6, 1024):
        tx = scale_by_shampoo(block_size, grafting="sgd", start_preconditioning_step=0, root_method="eigh")
        outs.append(run_steps(tx, grads, params)[1])
    np.testing.assert_array_equal(outs[0], outs[1])
    # ...while a smaller block changes it.
    tx = scale_by_shampoo(3, grafting="sgd", start_preconditioning_step=0, root_method="eigh")
    assert np.abs(np.asarray(run_steps(tx, grads, params)[1]) - np.asarray(outs[0])).max() > 1e-3


def test_failed_root_keeps_the_previous_preconditioner_and_is_counted():
    rng = np.random.default_rng(3)
    params = {"w": jnp.zeros((8, 6)), "b": jnp.zeros(3)}
    g1, g2 = ({"w": jnp.asarray(rng.normal(size=(8, 6)), jnp.float32), "b": jnp.ones(3)} for _ in range(2))
    kw = dict(block_size=4, grafting="none", start_preconditioning_step=0, root_method="eigh")
    good = scale_by_shampoo(**kw)
    # A threshold of 0 rejects every root (their residual estimates are > 0): the forced failure.
    failing = scale_by_shampoo(**kw, root_error_threshold=0.0)
    state = good.init(params)
    u1, state1 = jax.jit(good.update)(g1, state, params)
    u2, state2 = jax.jit(failing.update)(g2, state1, params)
    ok_u2, ok_state2 = jax.jit(good.update)(g2, state1, params)
    assert_trees_close(state2.preconditioners, state1.preconditioners, rtol=0, atol=0)
    for key in state2.root_failures:
        np.testing.assert_array_equal(state2.root_failures[key], 1)
        np.testing.assert_array_equal(ok_state2.root_failures[key], 0)
        assert np.all(np.asarray(state2.root_errors[key]) > 0)
    # The statistics did move on; the direction used the old preconditioners.
    assert not np.allclose(state2.stats["4x4"][0], state1.stats["4x4"][0])
    assert not np.allclose(u2["w"], ok_u2["w"])
    lp, rp = (np.asarray(x[0]) for x in state1.preconditioners["4x4"])
    np.testing.assert_allclose(u2["w"][:4, :4], lp @ np.asarray(g2["w"][:4, :4]) @ rp, rtol=1e-5, atol=1e-6)


def test_nonfinite_gradient_leaves_the_state_unchanged_and_skip_nonfinite_skips():
    params = {"w": jnp.ones((6, 4)), "b": jnp.ones(3)}
    tx = scale_by_shampoo(4, grafting="adam", start_preconditioning_step=0)
    good = {"w": jnp.arange(24.0).reshape(6, 4) / 10, "b": jnp.ones(3)}
    bad = {"w": good["w"].at[0, 0].set(jnp.nan), "b": jnp.ones(3)}
    _, s1 = jax.jit(tx.update)(good, tx.init(params), params)
    u, s2 = jax.jit(tx.update)(bad, s1, params)
    assert not np.all(np.isfinite(u["w"]))
    assert int(s2.count) == 2
    assert_trees_close(s2._replace(count=s1.count), s1, rtol=0, atol=0)
    safe = optdist.skip_nonfinite(optax.chain(tx, optax.sgd(0.1)))
    st = safe.init(params)
    u, st = jax.jit(safe.update)(bad, st, params)
    assert int(st.skipped) == 1
    assert all(np.all(np.asarray(x) == 0) for x in jax.tree_util.tree_leaves(u))


def test_grafting_rescales_each_block_to_the_grafting_norm():
    rng = np.random.default_rng(4)
    params = {"w": jnp.zeros((8, 6)), "b": jnp.zeros(5)}
    grads = {k: jnp.asarray(rng.normal(size=(3, *v.shape)), jnp.float32) for k, v in params.items()}
    for name, per_block in [("adam", True), ("adam", False), ("rmsprop", True)]:
        tx = scale_by_shampoo(4, grafting=name, graft_per_block=per_block, start_preconditioning_step=1)
        _, out = run_steps(tx, grads, params)
        ref_tx = optax.scale_by_adam() if name == "adam" else optax.scale_by_rms(0.999, 1e-8, 0.0, True, True)
        _, ref = run_steps(optax.with_extra_args_support(ref_tx), grads, params)
        # Step 0 is before start_preconditioning_step: the grafting direction itself.
        assert_trees_close(
            jax.tree_util.tree_map(lambda x: x[0], out), jax.tree_util.tree_map(lambda x: x[0], ref)
        )
        w, r = np.asarray(out["w"][2]), np.asarray(ref["w"][2])
        blocks = [(slice(0, 4), slice(0, 4)), (slice(0, 4), slice(4, 6)), (slice(4, 8), slice(0, 4))]
        for blk in blocks if per_block else [(slice(None), slice(None))]:
            np.testing.assert_allclose(np.linalg.norm(w[blk]), np.linalg.norm(r[blk]), rtol=1e-5)
        if not per_block:  # one scale for the whole parameter: block norms are not matched
            blk = blocks[1]
            assert abs(np.linalg.norm(w[blk]) / np.linalg.norm(r[blk]) - 1) > 1e-3
        assert not np.allclose(w, r)  # same norms, different (Shampoo) direction
        np.testing.assert_allclose(np.linalg.norm(out["b"][2]), np.linalg.norm(ref["b"][2]), rtol=1e-5)


def test_bad_arguments_are_named():
    for kwargs, name in [
        (dict(block_size=0), "block_size"),
        (dict(exponent_override=0), "exponent_override"),
        (dict(matrix_epsilon=-1e-6), "matrix_epsilon"),
        (dict(beta2=0.0), "beta2"),
        (dict(precondition_every=0), "precondition_every"),
        (dict(statistics_every=0), "statistics_every"),
        (dict(start_preconditioning_step=-1), "start_preconditioning_step"),
        (dict(grafting="lion"), "grafting"),
        (dict(root_method="svd"), "root_method"),
        (dict(root_error_threshold=-1.0), "root_error_threshold"),
        (dict(statistics_dtype=jnp.int32), "statistics_dtype"),
        (dict(preconditioner_dtype="uint8"), "preconditioner_dtype"),
        (dict(num_workers=0), "num_workers"),
        (dict(root_impl="cuda"), "root_impl"),
        (dict(num_workers=2), "num_workers"),
    ]:
        with pytest.raises(ValueError, match=name):
            scale_by_shampoo(**kwargs)
    with pytest.raises(ValueError, match="momentum"):
        shampoo(0.1, momentum=1.0)
    with pytest.raises(ValueError, match="weight_decay"):
        shampoo(0.1, weight_decay=-0.1)
    with pytest.raises(TypeError, match="axis_name"):
        scale_by_shampoo(axis_name=3)


def owner_rows(layout, n):
    """{key: [N_g] worker owning each bank row} from the assignment."""
    assignment = assign_blocks(layout, n)
    return {
        k: assignment.positions[k] // assignment.tables[k].shape[1] for k in assignment.tables
    }, assignment


def test_distributed_roots_equal_local_and_bytes_are_exact():
    n, steps = 4, 3
    rng = np.random.default_rng(5)
    params = {"w": jnp.zeros((8, 7)), "c": jnp.zeros((2, 3, 4)), "b": jnp.zeros(5)}
    grads_w = {k: jnp.asarray(rng.normal(size=(n, steps, *v.shape)), jnp.float32) for k, v in params.items()}
    # A larger ridge keeps the float32 roots well conditioned: the averaged gradient differs from the
    # full-batch one by rounding only, and that must not be amplified by kappa ~ 1e6.
    kw = dict(
        block_size=4,
        grafting="rmsprop",
        start_preconditioning_step=0,
        precondition_every=2,
        matrix_epsilon=1e-2,
    )
    dist = optax.chain(optdist.mean_gradients("data"), scale_by_shampoo(**kw, axis_name="data"))
    local = scale_by_shampoo(**kw)

    state_w, out_w = optdist.simulate(scan_updates(dist, params))(
        optdist.replicate(dist.init(params), n), grads_w
    )
    local_state, local_out = run_steps(local, jax.tree_util.tree_map(lambda g: g.mean(0), grads_w), params)
    for w in range(n):
        assert_trees_close(optdist.unreplicate(out_w, w), local_out, rtol=2e-5, atol=1e-6)
    owners, assignment = owner_rows(make_layout([(5,), (2, 3, 4), (8, 7)], 4, True, 16384), n)
    shampoo_w = state_w[1]
    split = False
    for key, owner in owners.items():
        for i, local_pre in enumerate(local_state.preconditioners[key]):
            dist_pre = np.asarray(shampoo_w.preconditioners[key][i])
            for row, w in enumerate(owner):
                np.testing.assert_allclose(dist_pre[w, row], local_pre[row], rtol=1e-5, atol=1e-6)
                np.testing.assert_allclose(
                    shampoo_w.stats[key][i][w, row], local_state.stats[key][i][row], rtol=1e-6
                )
            # A worker that neither owns nor pads a row never computed it (the work was split).
            untouched = [
                (w, r) for w in range(n) for r in range(len(owner)) if r not in assignment.tables[key][w]
            ]
            split |= bool(untouched)
            for w, r in untouched:
                np.testing.assert_array_equal(shampoo_w.stats[key][i][w, r], 0)
    assert split
    # Bytes: the mean's all-reduce plus the all-gather of each worker's direction slots, every step.
    elems = 56 + 24 + 5
    mean_bytes = 2 * (n - 1) * -(-elems // n) * 4
    gather = sum(
        t.shape[1] * int(np.prod([int(d) for d in k.split("x")])) for k, t in assignment.tables.items()
    )
    expected = steps * (mean_bytes + (n - 1) * gather * 4)
    np.testing.assert_array_equal(optdist.bytes_sent(state_w), [expected] * n)
    np.testing.assert_array_equal(shampoo_w.bytes_sent.value(), [steps * (n - 1) * gather * 4] * n)

    # Sharded state (num_workers=n): the same directions, each worker's banks hold only its table rows.
    sharded = optax.chain(
        optdist.mean_gradients("data"), scale_by_shampoo(**kw, axis_name="data", num_workers=n)
    )

    init_s = optdist.replicate(sharded.init(params), n)
    state_s, out_s = optdist.simulate(scan_updates(sharded, params))(init_s, grads_w)
    assert_trees_close(out_s, out_w, rtol=1e-6, atol=1e-7)
    for key, table in assignment.tables.items():
        for i, local_stat in enumerate(local_state.stats[key]):
            banks = np.asarray(state_s[1].stats[key][i])
            assert banks.shape[:2] == (n, table.shape[1])
            for w in range(n):
                np.testing.assert_allclose(banks[w], np.asarray(local_stat)[table[w]], rtol=1e-6)
    np.testing.assert_array_equal(optdist.bytes_sent(state_s), [expected] * n)
    full, shard = (sum(x[0].size for x in jax.tree_util.tree_leaves(s[1].stats)) for s in (state_w, state_s))
    sides = {k: [int(d) for d in k.split("x")] for k in assignment.tables}
    assert full == sum(len(owners[k]) * sum(d * d for d in sides[k]) for k in sides)
    assert shard == sum(t.shape[1] * sum(d * d for d in sides[k]) for k, t in assignment.tables.items())
    assert shard < full
    wrong = scale_by_shampoo(**kw, axis_name="data", num_workers=n + 1)
    with pytest.raises(ValueError, match="num_workers"):
        optdist.simulate(lambda s, g: wrong.update(g, s, params))(
            optdist.replicate(wrong.init(params), n), jax.tree_util.tree_map(lambda g: g[:, 0], grads_w)
        )


def test_three_execution_modes_agree_with_single_worker():
    params, data = linear_problem(num_examples=64)
    kw = dict(
        block_size=4,
        grafting="adagrad",
        start_preconditioning_step=0,
        precondition_every=2,
        matrix_epsilon=1e-2,
    )
    tx = optax.chain(optdist.mean_gradients("data"), shampoo(0.1, **kw, axis_name="data"))
    step = make_train_step(tx)
    init = optdist.replicate((params, tx.init(params)), 8)
    batches = optdist.shard_batch(data, 8)
    results = run_in_three_modes(step, init, batches, steps=3)
    ref_tx = shampoo(0.1, **kw)
    p_ref, s_ref = params, ref_tx.init(params)
    ref_step = jax.jit(make_train_step(ref_tx))
    for _ in range(3):
        p_ref, s_ref = ref_step(p_ref, s_ref, data)
    for name, (p, s) in results.items():
        assert_trees_close(p, results["simulate"][0], rtol=1e-5, atol=1e-6)
        assert all(jax.tree_util.tree_leaves(optdist.is_replicated(p))), name
        assert_trees_close(optdist.unreplicate(p, 5), p_ref, rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(optdist.bytes_sent(s), optdist.bytes_sent(results["simulate"][1]))


def test_optax_chain_inject_hyperparams_multisteps_and_stable_state():
    params = {"w": jnp.ones((6, 5)), "b": jnp.ones(5)}
    g = {"w": jnp.arange(30.0).reshape(6, 5) / 30 - 0.5, "b": jnp.linspace(-1, 1, 5)}
    # inject_hyperparams: learning rate from the state.
    with pytest.raises(TypeError, match="SHAMPOO_STATIC_ARGS"):
        optax.inject_hyperparams(shampoo)(learning_rate=0.1).init(params)
    tx = optax.inject_hyperparams(shampoo, static_args=SHAMPOO_STATIC_ARGS)(learning_rate=0.1, block_size=4)
    state = tx.init(params)
    update = jax.jit(tx.update)
    u1, _ = update(g, state, params)
    state.hyperparams["learning_rate"] = jnp.asarray(0.2)
    u2, _ = update(g, state, params)
    assert_trees_close(u2, jax.tree_util.tree_map(lambda x: 2 * x, u1), rtol=1e-6)
    # Momentum + decoupled weight decay in the alias = chaining them by hand.
    kw = dict(block_size=4, start_preconditioning_step=0)
    alias = shampoo(0.1, momentum=0.9, nesterov=True, weight_decay=0.01, **kw)
    manual = optax.chain(
        scale_by_shampoo(**kw),
        optax.trace(0.9, nesterov=True),
        optax.add_decayed_weights(0.01),
        optax.sgd(0.1),
    )
    sa, sm = alias.init(params), manual.init(params)
    for _ in range(2):
        ua, sa = jax.jit(alias.update)(g, sa, params)
        um, sm = jax.jit(manual.update)(g, sm, params)
        assert_trees_close(ua, um, rtol=1e-6, atol=1e-7)
    # MultiSteps: two micro-steps = one Shampoo step on the mean gradient.
    inner = scale_by_shampoo(**kw)
    ms = optax.MultiSteps(inner, every_k_schedule=2)
    sms = ms.init(params)
    g2 = jax.tree_util.tree_map(lambda x: -2 * x + 0.1, g)
    _, sms = jax.jit(ms.update)(g, sms, params)
    u, sms = jax.jit(ms.update)(g2, sms, params)
    mean_g = jax.tree_util.tree_map(lambda a, b: (a + b) / 2, g, g2)
    ref, _ = jax.jit(inner.update)(mean_g, inner.init(params), params)
    # Rank-2 statistics with a 1e-6 ridge: float32 roots at kappa ~ 1e6 agree to ~1e-3 across compiles.
    assert_trees_close(u, ref, rtol=2e-3, atol=1e-4)
    # Shapes and dtypes stable across steps with bf16 storage (lax.scan enforces a fixed carry type;
    # every run_steps above checks the same for the default dtypes); a plain pytree of arrays.
    tx = scale_by_shampoo(
        4, statistics_dtype=jnp.bfloat16, preconditioner_dtype=jnp.bfloat16, precondition_every=2
    )
    state, out = run_steps(tx, jax.tree_util.tree_map(lambda x: jnp.stack([x, -x, 2 * x]), g), params)
    assert isinstance(state, ShampooState)
    assert state.stats["4x4"][0].dtype == state.preconditioners["4x4"][0].dtype == jnp.bfloat16
    assert out["w"].dtype == jnp.float32 and np.all(np.isfinite(out["w"]))


def test_layout_merges_splits_and_falls_back_and_assignment_balances():
    layout = make_layout([(3, 40), (2, 3, 5), (6, 5), (7,), (1, 1)], 8, True, 32)
    diag = [leaf.diagonal for leaf in layout.leaves]
    assert diag == [True, False, False, True, True]  # dim 40 > max_preconditioner_dim; vectors; scalars
    assert layout.leaves[1].merged == (6, 5)
    assert make_layout([(6, 5)], 64, True, 100).leaves[0].merged == (6, 5)  # never merged to a vector
    layout = make_layout([(20, 9), (8, 8)], 8, True, 1000)
    assert dict(zip(layout.keys, layout.group_sizes)) == {"8x8": 3, "8x1": 2, "4x8": 1, "4x1": 1}
    assignment = assign_blocks(layout, 3)
    for key in layout.keys:
        owners = assignment.positions[key] // assignment.tables[key].shape[1]
        assert len(set(assignment.positions[key])) == len(owners)  # every block computed exactly once
        counts = np.bincount(owners, minlength=3)
        assert counts.max() - counts.min() <= 1
    costs = {"8x8": 2 * 8**3, "8x1": 8**3 + 1, "4x8": 4**3 + 8**3, "4x1": 4**3 + 1}
    assert assignment.loads.sum() == sum(costs[k] * n for k, n in zip(layout.keys, layout.group_sizes))
    # LPT: the single 4x8 and 4x1 blocks go to the workers left lightest by the 8x8/8x1 blocks.
    assert assignment.loads.max() - assignment.loads.min() <= costs["8x8"]


def test_root_kernel_gives_the_same_directions():
    """root_impl='pallas' (the on-chip Newton kernel; interpret mode here) vs the XLA loop."""
    rng = np.random.default_rng(3)
    params = {"w": jnp.zeros((32, 16))}
    grads = {"w": jnp.asarray(rng.normal(size=(5, 32, 16)), jnp.float32)}
    kw = dict(
        block_size=16,
        start_preconditioning_step=0,
        precondition_every=2,
        grafting="sgd",
        matrix_epsilon=1e-3,
        root_method="coupled_newton",
        root_max_iters=40,
    )
    for impl in ("xla", "pallas"):  # the kernel path really is the one taken
        tx = scale_by_shampoo(**kw, root_impl=impl)
        jaxpr = str(jax.make_jaxpr(lambda g, s, tx=tx: tx.update(g, s, params))(params, tx.init(params)))
        assert ("pallas_call" in jaxpr) == (impl == "pallas")
    _, ref = run_steps(scale_by_shampoo(**kw, root_impl="xla"), grads, params)
    _, got = run_steps(scale_by_shampoo(**kw, root_impl="pallas"), grads, params)
    assert_trees_close(got, ref, rtol=1e-3, atol=1e-5)
