"""Shampoo's pure parts, each alone against a float64 NumPy reference; Shampoo's input checks."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.extend import core as jex_core

import optdist
from optdist.comm.accounting import ByteCounter
from optdist.comm.channel import Channel
from optdist.preconditioning import assign_blocks, blocking, make_layout, scale_by_shampoo, shampoo
from optdist.preconditioning import shampoo_ops as sh
from tests.helpers import assert_trees_close


def np_unfold(block, i):
    return np.moveaxis(block, i, 0).reshape(block.shape[i], -1)


def np_root(a, p, eps):
    """(A + eps * lambda_max I)^{-1/p} by eigendecomposition (float64)."""
    w, v = np.linalg.eigh(a)
    w = np.maximum(w, 0.0)
    return (v * (w + eps * w[-1]) ** (-1.0 / p)) @ v.T


def spd(rng, c, s):
    x = rng.normal(size=(c, s, 2 * s))
    return x @ np.swapaxes(x, -1, -2) / s


@pytest.mark.parametrize("beta2", [1.0, 0.9])
@pytest.mark.parametrize("shape", [(4, 5), (2, 3, 4)])
def test_update_statistics_is_the_ema_of_unfolded_grams(beta2, shape):
    rng = np.random.default_rng(0)
    blocks = rng.normal(size=(3, *shape))
    old = [spd(rng, 3, s) for s in shape]
    with jax.enable_x64(True):
        new = sh.update_statistics(tuple(jnp.asarray(x) for x in old), jnp.asarray(blocks), beta2)
        assert all(x.dtype == jnp.float64 for x in new)
    for i, (o, n) in enumerate(zip(old, new)):
        gram = np.stack([np_unfold(b, i) @ np_unfold(b, i).T for b in blocks])
        ref = o + gram if beta2 == 1.0 else beta2 * o + (1 - beta2) * gram
        np.testing.assert_allclose(np.asarray(n), ref, rtol=1e-12, atol=1e-12)


def test_inverse_roots_batch_across_block_shapes_and_match_eigh():
    rng = np.random.default_rng(1)
    eps = 1e-4
    # Side 4 appears in both block shapes (one batched call); exponents p = 2k = 4.
    stats = {"4x5": (spd(rng, 2, 4), spd(rng, 2, 5)), "3x4": (spd(rng, 3, 3), spd(rng, 3, 4))}
    config = sh.RootConfig(method="eigh", ridge_epsilon=eps)
    with jax.enable_x64(True):
        roots = sh.inverse_roots(
            {k: tuple(jnp.asarray(x) for x in v) for k, v in stats.items()}, config, jnp.float64
        )
    for key, per_dim in stats.items():
        for (root, err), stat in zip(roots[key], per_dim):
            ref = np.stack([np_root(a, 4, eps) for a in stat])
            np.testing.assert_allclose(np.asarray(root), ref, rtol=1e-9, atol=1e-12)
            assert np.asarray(err).shape == (stat.shape[0],) and np.all(np.asarray(err) < 1e-8)
    # exponent_override: p for every dim.
    with jax.enable_x64(True):
        (root, _), _ = sh.inverse_roots(
            {"4x5": tuple(jnp.asarray(x) for x in stats["4x5"])},
            sh.RootConfig(method="eigh", ridge_epsilon=eps, exponent_override=2),
            jnp.float64,
        )["4x5"]
    np.testing.assert_allclose(np.asarray(root)[1], np_root(stats["4x5"][0][1], 2, eps), rtol=1e-9)


def test_accept_roots_keeps_the_old_preconditioner_on_failure_and_counts_it():
    rng = np.random.default_rng(2)
    old = (jnp.asarray(spd(rng, 3, 4)), jnp.asarray(spd(rng, 3, 5)))
    new_roots = [jnp.asarray(spd(rng, 3, 4)), jnp.asarray(spd(rng, 3, 5))]
    new_roots[1] = new_roots[1].at[2, 0, 0].set(jnp.nan)  # a non-finite root for block 2, dim 1
    errs = [jnp.asarray([0.1, 0.3, 0.0]), jnp.asarray([0.0, 0.0, 0.0])]
    errors, failures = jnp.full((3, 2), 7.0), jnp.asarray([[0, 1], [2, 3], [4, 5]], jnp.int32)
    pres, new_errors, new_failures = sh.accept_roots(
        tuple(zip(new_roots, errs)), old, errors, failures, threshold=0.25
    )
    ok = np.array([[True, True], [False, True], [True, False]])  # err 0.3 > 0.25; NaN root
    for i in range(2):
        for b in range(3):
            want = new_roots[i][b] if ok[b, i] else old[i][b]
            np.testing.assert_array_equal(np.asarray(pres[i][b]), np.asarray(want))
    np.testing.assert_array_equal(new_failures, np.asarray(failures) + ~ok)
    np.testing.assert_array_equal(new_errors, np.stack([np.asarray(e) for e in errs], axis=1))


def test_precondition_blocks_is_left_and_right_inverse_fourth_roots():
    rng = np.random.default_rng(3)
    g = rng.normal(size=(2, 4, 6))
    lhat, rhat = spd(rng, 2, 4), spd(rng, 2, 6)
    left = np.stack([np_root(a, 4, 1e-6) for a in lhat])
    right = np.stack([np_root(a, 4, 1e-6) for a in rhat])
    with jax.enable_x64(True):
        p = sh.precondition_blocks(jnp.asarray(g), (jnp.asarray(left), jnp.asarray(right)))
    ref = np.stack([lb @ gb @ rb for lb, gb, rb in zip(left, g, right)])  # P = L^{-1/4} G R^{-1/4}
    np.testing.assert_allclose(np.asarray(p), ref, rtol=1e-12, atol=1e-12)
    # Order 3: P = G x_1 A x_2 B x_3 C (mode products).
    g3 = rng.normal(size=(1, 2, 3, 4))
    mats = [np.asarray(spd(rng, 1, s)) for s in (2, 3, 4)]
    with jax.enable_x64(True):
        p3 = sh.precondition_blocks(jnp.asarray(g3), tuple(jnp.asarray(m) for m in mats))
    ref3 = np.einsum("ai,bj,ck,ijk->abc", mats[0][0], mats[1][0], mats[2][0], g3[0])
    np.testing.assert_allclose(np.asarray(p3)[0], ref3, rtol=1e-12, atol=1e-12)


def test_grafting_and_diagonal_fallback_against_numpy():
    rng = np.random.default_rng(4)
    p, d = rng.normal(size=(3, 4, 5)), rng.normal(size=(3, 4, 5))
    with jax.enable_x64(True):
        out = sh.graft_blocks({"4x5": jnp.asarray(p)}, {"4x5": jnp.asarray(d)})["4x5"]
        zero = sh.graft_blocks({"4x5": jnp.zeros((1, 4, 5))}, {"4x5": jnp.ones((1, 4, 5))})["4x5"]
    for b in range(3):  # P <- (||D||_F / ||P||_F) P per block
        np.testing.assert_allclose(
            np.asarray(out[b]), p[b] * np.linalg.norm(d[b]) / np.linalg.norm(p[b]), rtol=1e-12
        )
    np.testing.assert_array_equal(zero, 0.0)  # a zero direction stays zero
    stat, g = rng.uniform(0.0, 2.0, size=7), rng.normal(size=7)
    config = sh.RootConfig(ridge_epsilon=1e-3)
    with jax.enable_x64(True):
        new, direction = sh.diagonal_step(jnp.asarray(stat), jnp.asarray(g), jnp.asarray(True), 0.9, config)
        kept, _ = sh.diagonal_step(jnp.asarray(stat), jnp.asarray(g), jnp.asarray(False), 0.9, config)
    ref = 0.9 * stat + 0.1 * g * g
    np.testing.assert_allclose(np.asarray(new), ref, rtol=1e-12)
    np.testing.assert_array_equal(kept, stat)
    np.testing.assert_allclose(np.asarray(direction), g * (ref + 1e-3 * ref.max()) ** -0.5, rtol=1e-12)


def test_gather_directions_reassembles_the_banks_and_counts_the_all_gather():
    n = 4
    layout = make_layout([(8, 7), (2, 3, 4), (4, 4)], 4, True, 16384)
    rng = np.random.default_rng(5)
    banks = {
        k: jnp.asarray(rng.normal(size=(size, *g)), jnp.float32)
        for k, g, size in zip(layout.keys, layout.groups, layout.group_sizes)
    }
    assignment = assign_blocks(layout, n)

    def worker(counter):
        channel = Channel("data", counter)
        _, rows = sh.worker_blocks(layout, channel.size, channel.index)
        own = {k: banks[k][rows[k]] for k in banks}
        return sh.gather_directions(channel, own, assignment), channel.counter

    out, counter = optdist.simulate(worker, axis_name="data")(optdist.replicate(ByteCounter.zeros("data"), n))
    for k in banks:
        for w in range(n):
            np.testing.assert_array_equal(np.asarray(out[k][w]), np.asarray(banks[k]))
    slots = sum(
        t.shape[1] * int(np.prod(layout.groups[layout.keys.index(k)])) for k, t in assignment.tables.items()
    )
    np.testing.assert_array_equal(counter.value(), [(n - 1) * slots * 4] * n)


def _primitives(jaxpr, inside_cond=False, found=None):
    """{(primitive name, whether it sits inside a cond branch)} over a jaxpr and its sub-jaxprs."""
    found = set() if found is None else found
    for eqn in jaxpr.eqns:
        found.add((eqn.primitive.name, inside_cond))
        for sub in jex_core.jaxprs_in_params(eqn.params):
            _primitives(sub, inside_cond or eqn.primitive.name == "cond", found)
    return found


def test_root_refresh_is_a_real_branch_under_simulate():
    """Simulated workers batch the step counter; the roots (eigh) must still sit only in a cond branch
    (a plain lax.cond under vmap would become a select running the refresh every step)."""
    n = 2
    params = {"w": jnp.zeros((6, 5))}
    tx = scale_by_shampoo(4, root_method="eigh", precondition_every=3, axis_name="data")
    state = optdist.replicate(tx.init(params), n)
    grads = optdist.replicate(params, n)
    fn = optdist.simulate(lambda s, g: tx.update(g, s, params))
    found = _primitives(jax.make_jaxpr(fn)(state, grads).jaxpr)
    assert ("eigh", True) in found and ("eigh", False) not in found


# ---- input checks (issue 18) ----


def test_learning_rate_is_validated_and_schedules_pass():
    for bad, err in [(float("nan"), ValueError), (0.0, ValueError), (-1e-3, ValueError), ("fast", TypeError)]:
        with pytest.raises(err, match="learning_rate"):
            shampoo(bad)
    params = {"w": jnp.ones((4, 3))}
    tx = shampoo(optax.linear_schedule(0.1, 0.0, 10), block_size=4)
    u, _ = jax.jit(tx.update)(params, tx.init(params), params)
    assert np.all(np.isfinite(u["w"]))


def test_wrong_weight_decay_mask_is_a_clear_error_at_init():
    params = {"w": jnp.ones((4, 3)), "b": jnp.ones(3)}
    for mask in ({"a": True}, {"w": True}, lambda p: [True, False]):
        tx = shampoo(0.1, weight_decay=0.1, weight_decay_mask=mask)
        with pytest.raises(ValueError, match="weight_decay_mask.*structure"):
            tx.init(params)
    # A right mask (and a prefix of one) decays exactly the masked leaves, as optax does.
    mask = {"w": True, "b": False}
    tx = shampoo(0.1, block_size=4, weight_decay=0.1, weight_decay_mask=mask)
    ref = shampoo(0.1, block_size=4)
    g = jax.tree_util.tree_map(jnp.zeros_like, params)
    u, _ = tx.update(g, tx.init(params), params)
    r, _ = ref.update(g, ref.init(params), params)
    np.testing.assert_allclose(u["w"], r["w"] - 0.1 * 0.1 * params["w"], rtol=1e-6)
    np.testing.assert_array_equal(u["b"], r["b"])


def test_zero_element_leaves_pass_through_untouched():
    rng = np.random.default_rng(6)
    params = {"w": jnp.zeros((6, 5)), "e": jnp.zeros((0,)), "f": jnp.zeros((0, 5)), "v": jnp.zeros(3)}
    grads = {k: jnp.asarray(rng.normal(size=v.shape), jnp.float32) for k, v in params.items()}
    dense = {k: params[k] for k in ("w", "v")}
    for grafting in ("adam", "none"):
        tx = scale_by_shampoo(4, grafting=grafting, start_preconditioning_step=0)
        u, state = jax.jit(tx.update)(grads, tx.init(params), params)
        ref, _ = jax.jit(tx.update)({k: grads[k] for k in dense}, tx.init(dense), dense)
        assert u["e"].shape == (0,) and u["f"].shape == (0, 5)
        assert_trees_close({k: u[k] for k in dense}, ref, rtol=0, atol=0)
        assert int(state.count) == 1
    # Distributed too (the all-gather of an axis with empty leaves).
    tx = scale_by_shampoo(4, axis_name="data")
    u, _ = optdist.simulate(lambda s, g: tx.update(g, s, params))(
        optdist.replicate(tx.init(params), 2), optdist.replicate(grads, 2)
    )
    assert u["f"].shape == (2, 0, 5)


def test_integer_leaf_is_refused_at_init_with_the_floating_point_error():
    params = {"w": jnp.ones((4, 3)), "step": jnp.zeros((), jnp.int32)}
    with pytest.raises(TypeError, match="floating-point"):
        scale_by_shampoo(4).init(params)
    with pytest.raises(TypeError, match="floating-point"):
        shampoo(0.1).init(params)
    assert blocking.make_layout([(0, 5)], 4, True, 16).leaves[0].empty
