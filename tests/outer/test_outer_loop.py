"""outer_loop: equivalence to data-parallel SGD, bytes, participation, schedules, modes, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optdist
import optdist.outer as outer
from optdist.comm import all_reduce_bytes
from tests.helpers import assert_trees_close, run_in_three_modes
from tests.outer._problem import flat, init_params, loss, make_data, np_local_models, run

N = 4
PARAM_BYTES = all_reduce_bytes(init_params(), N)  # one ring all-reduce of {"w": [3], "b": []} f32


@pytest.fixture(scope="module")
def data():
    return make_data(N)


def test_local_sgd_h1_equals_data_parallel_sgd_step_for_step(data):
    data8 = make_data(8, seed=5)
    steps = 6
    p_loc, _, (traj_loc, _) = run(outer.local_sgd(optax.sgd(0.1), 1, "data"), steps, data8, record=True)
    sync = optax.chain(optdist.mean_gradients("data"), optax.sgd(0.1))
    p_dp, _, (traj_dp, _) = run(sync, steps, data8, record=True)
    # traj: [workers, steps, ...]: every step of every worker agrees.
    assert_trees_close(traj_loc, traj_dp, rtol=1e-5, atol=1e-6)
    assert not np.allclose(flat(traj_loc)[0, 0], flat(traj_loc)[0, -1])  # it did move


def test_bytes_zero_between_syncs_and_one_all_reduce_per_sync(data):
    h, steps = 3, 8
    tx = outer.local_sgd(optax.sgd(0.1), h, "data")
    _, s, (_, states) = run(tx, steps, data, record=True)
    per_step = np.asarray(optdist.bytes_sent(states))  # [workers, steps]
    expected = np.array([(t // h) * PARAM_BYTES for t in range(1, steps + 1)])
    np.testing.assert_array_equal(per_step, np.broadcast_to(expected, per_step.shape))
    assert PARAM_BYTES == 2 * (N - 1) * 1 * 4  # 4 f32 elements over 4 workers: one per chunk
    np.testing.assert_array_equal(s.rounds, [steps // h] * N)


def test_inner_state_persists_or_resets(data):
    h, steps = 2, 5
    kept = run(outer.outer_loop(optax.adam(0.1), optax.sgd(1.0), h, "data"), steps, data)[1]
    reset = run(
        outer.outer_loop(optax.adam(0.1), optax.sgd(1.0), h, "data", reset_inner_state=True), steps, data
    )[1]
    np.testing.assert_array_equal(kept.inner_state[0].count, [steps] * N)
    # Reset at the syncs after steps 2 and 4: one step since.
    np.testing.assert_array_equal(reset.inner_state[0].count, [1] * N)
    mu = np.asarray(kept.inner_state[0].mu["w"])
    assert not np.allclose(mu[0], mu[1])  # per-worker moments differ (non-IID data)
    assert all(jax.tree_util.tree_leaves(optdist.is_replicated(kept.anchor)))


def _np_local_sgd_rounds(data, participants, k, lr):
    x = flat(init_params())
    for members in participants:
        ys = np_local_models(x, data, k, lr, members)
        x = np.mean(ys, axis=0) if len(ys) else x
    return x


def test_partial_participation_fixed_table(data):
    table = np.array([[True, False, True, False], [False, False, False, True]])
    k = 2
    p, s, _ = run(outer.local_sgd(optax.sgd(0.1), k, "data", participation=table), 3 * k, data)
    ref = _np_local_sgd_rounds(data, [[0, 2], [3], [0, 2]], k, 0.1)  # table rows cycle
    np.testing.assert_allclose(flat(p), np.broadcast_to(ref, (N, ref.size)), rtol=1e-5, atol=1e-6)
    # Sync bytes: psum of (params, weight) packed = 5 f32 over 4 workers, plus the 4-byte count.
    per_sync = all_reduce_bytes({"x": jnp.zeros(5)}, N) + all_reduce_bytes({"c": jnp.zeros(())}, N)
    np.testing.assert_array_equal(optdist.bytes_sent(s), [3 * per_sync] * N)


def test_partial_participation_sampled_with_shared_seed(data):
    k, seed, m = 2, 7, 2
    p, s, _ = run(outer.local_sgd(optax.sgd(0.1), k, "data", num_participants=m, seed=seed), 2 * k, data)
    keys = [jax.random.fold_in(jax.random.key(seed), r) for r in range(2)]
    members = [sorted(np.asarray(jax.random.permutation(key, N))[:m].tolist()) for key in keys]
    ref = _np_local_sgd_rounds(data, members, k, 0.1)
    np.testing.assert_allclose(flat(p), np.broadcast_to(ref, (N, ref.size)), rtol=1e-5, atol=1e-6)
    full = _np_local_sgd_rounds(data, [range(N)] * 2, k, 0.1)
    assert not np.allclose(ref, full)  # the sample mattered


def test_runtime_dropout_and_empty_round_is_skipped(data):
    k = 2
    tx = outer.local_sgd(optax.sgd(0.1), k, "data")
    # Worker 1 drops out of every round.
    alive = jnp.array([True, False, True, True])
    p, s, _ = run(tx, 2 * k, data, participating=alive)
    ref = _np_local_sgd_rounds(data, [[0, 2, 3]] * 2, k, 0.1)
    np.testing.assert_allclose(flat(p), np.broadcast_to(ref, (N, ref.size)), rtol=1e-5, atol=1e-6)
    # Nobody participates: rounds are skipped, every worker is back at the initial anchor.
    p, s, _ = run(tx, 2 * k, data, participating=jnp.zeros(N, bool))
    np.testing.assert_allclose(flat(p), np.broadcast_to(flat(init_params()), (N, 4)), rtol=0, atol=1e-7)
    np.testing.assert_array_equal(s.skipped_rounds, [2] * N)
    np.testing.assert_array_equal(s.rounds, [2] * N)


def test_schedule_sync_every_under_jit(data):
    # H = 2 for rounds starting before step 4, then 3: syncs after steps 2, 4, 7, 10.
    tx = outer.local_sgd(optax.sgd(0.1), lambda t: jnp.where(t < 4, 2, 3), "data")
    _, s, (_, states) = run(tx, 10, data, record=True)
    per_step = np.asarray(optdist.bytes_sent(states))[0]
    syncs = np.flatnonzero(np.diff(np.concatenate([[0], per_step]))) + 1
    np.testing.assert_array_equal(syncs, [2, 4, 7, 10])
    np.testing.assert_array_equal(s.round_length, [3] * N)


def test_qsr_schedule_values_and_in_loop(data):
    lr = optax.linear_schedule(0.1, 0.01, 20)
    sched = outer.qsr_sync_every(2, 0.25, lr)
    hs = np.asarray(jax.jit(jax.vmap(sched))(jnp.arange(0, 21, 5)))
    expected = [max(2, int(np.floor((0.25 / float(lr(t))) ** 2))) for t in range(0, 21, 5)]
    np.testing.assert_array_equal(hs, expected)
    assert hs[0] == 6 and hs[-1] == 625  # grows like 1 / lr^2
    assert int(outer.qsr_sync_every(8, 0.25, 0.1)(jnp.int32(0))) == 8  # the floor H_base
    assert int(outer.qsr_sync_every(3, 0.2, lambda t: 0.0 * t)(jnp.int32(0))) == 2**30  # lr = 0
    tx = outer.local_sgd(optax.sgd(lr), sched, "data")
    _, s, _ = run(tx, 9, data)
    # H is fixed at each round's start: 6 at step 0 -> sync after step 6; then H(6) = 11.
    np.testing.assert_array_equal(s.rounds, [1] * N)
    np.testing.assert_array_equal(s.round_length, [int(sched(jnp.int32(6)))] * N)
    assert int(sched(jnp.int32(6))) == 11


@pytest.fixture(scope="module")
def mode_results():
    params = init_params()
    data8 = jnp.asarray(make_data(8, seed=2), jnp.float32)
    tx = outer.diloco(inner_lr=0.05, sync_every=2, axis_name="data", num_participants=6, seed=3)

    def step(p, s, d):
        u, s = tx.update(jax.grad(loss)(p, d), s, p)
        return optax.apply_updates(p, u), s

    out = run_in_three_modes(step, optdist.replicate((params, tx.init(params)), 8), data8, steps=5)
    # 16 workers, 2 simulated per device (cond under vmap inside shard_map) vs 16 simulated.
    data16 = jnp.asarray(make_data(16, seed=2), jnp.float32)
    runners = {
        "simulate16": optdist.simulate(step, "data"),
        "data_parallel16": optdist.data_parallel(step, jax.make_mesh((8,), ("data",)), "data"),
    }
    for name, fn in runners.items():
        p, s = optdist.replicate((params, tx.init(params)), 16)
        for _ in range(5):
            p, s = fn(p, s, data16)
        out[name] = (p, s)
    return out


def test_three_execution_modes_agree(mode_results):
    for name, (p, s) in mode_results.items():
        ref_p, ref_s = mode_results["simulate16" if name.endswith("16") else "simulate"]
        assert_trees_close(p, ref_p, rtol=1e-5, atol=1e-6)
        assert_trees_close(s.anchor, ref_s.anchor, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(optdist.bytes_sent(s), optdist.bytes_sent(ref_s))
        assert all(jax.tree_util.tree_leaves(optdist.is_replicated(s.anchor))), name
        assert int(optdist.bytes_sent(s)[0]) > 0


def test_sync_branch_is_a_real_conditional_under_pmap():
    """With one worker per device the all-reduce sits inside the conditional: skipped off-sync."""
    params = init_params()
    tx = outer.local_sgd(optax.sgd(0.1), 4, "data")

    def step(p, s, g):
        return tx.update(g, s, p)

    p, s = optdist.replicate((params, tx.init(params)), 8)
    hlo = jax.pmap(step, axis_name="data").lower(p, s, p).compile().as_text()
    assert "conditional" in hlo
    # Every all-reduce instruction is in a branch computation, not the entry computation.
    entry = hlo[hlo.index("ENTRY") :]
    entry = entry[: entry.index("\n}")]
    assert "all-reduce(" not in entry and "all-reduce(" in hlo


def test_bad_inputs():
    sgd = optax.sgd(0.1)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="sync_every"):
            outer.local_sgd(sgd, bad, "data")
    with pytest.raises(ValueError, match="sync_every"):
        outer.local_sgd(sgd, lambda t: 0 * t, "data")
    with pytest.raises(ValueError, match=r"participation.*round\(s\) \[1\]"):
        outer.local_sgd(sgd, 2, "data", participation=[[True, False], [False, False]])
    with pytest.raises(ValueError, match="participation must be a boolean"):
        outer.local_sgd(sgd, 2, "data", participation=[[1, 0]])
    with pytest.raises(ValueError, match="num_participants"):
        outer.local_sgd(sgd, 2, "data", num_participants=0)
    with pytest.raises(ValueError, match="not both"):
        outer.local_sgd(sgd, 2, "data", num_participants=1, participation=[True])
    with pytest.raises(ValueError, match="outer_lr"):
        outer.diloco(1e-3, outer_lr=-0.1)
    with pytest.raises(ValueError, match="outer_momentum"):
        outer.diloco(1e-3, outer_momentum=1.0)
    with pytest.raises(ValueError, match="buffer_size"):
        outer.delayed_nesterov(sgd, 2, buffer_size=0)
    with pytest.raises(ValueError, match="tau"):
        outer.fedadam(0.1, 0.1, 2, tau=0.0)
    with pytest.raises(ValueError, match="client_lr"):
        outer.scaffold(0.0, 2)
    with pytest.raises(ValueError, match="reset_inner_state"):
        outer.scaffold(0.1, 2, reset_inner_state=True)
    with pytest.raises(ValueError, match="scaling"):
        outer.local_adaptive(0.1, 2, scaling="oasis")
    with pytest.raises(ValueError, match="base"):
        outer.qsr_sync_every(0, 0.1, 0.1)
    with pytest.raises(ValueError, match="alpha"):
        outer.qsr_sync_every(2, 0.0, 0.1)
    with pytest.raises(TypeError, match="axis_name"):
        outer.local_sgd(sgd, 2, 3)
    with pytest.raises(TypeError, match="aggregator"):
        outer.local_sgd(sgd, 2, "data", aggregator="median")


def test_bad_inputs_found_at_trace_time(data):
    params = init_params()
    tx = outer.local_sgd(optax.sgd(0.1), 1, "data", participation=[True, False, True])  # 3 columns

    def step(p, s):
        return tx.update(p, s, p)

    with pytest.raises(ValueError, match="3 columns but there are 4 workers"):
        optdist.simulate(step)(*optdist.replicate((params, tx.init(params)), 4))
    tx = outer.local_sgd(optax.sgd(0.1), 1, "data", num_participants=5)
    with pytest.raises(ValueError, match="num_participants=5 exceeds"):
        optdist.simulate(lambda p, s: tx.update(p, s, p))(*optdist.replicate((params, tx.init(params)), 4))
    with pytest.raises(ValueError, match="needs params"):
        tx.update(params, tx.init(params))


def test_custom_aggregator_slot(data):
    """An aggregator receives (deltas, channel) and its bytes are counted."""

    def coordinate_median_of_gather(deltas, channel, *, weights=None):
        gathered = channel.all_gather(deltas)
        return jax.tree_util.tree_map(lambda g: jnp.median(g, axis=0), gathered)

    k = 2
    tx = outer.local_sgd(optax.sgd(0.1), k, "data", aggregator=coordinate_median_of_gather)
    p, s, _ = run(tx, k, data)
    x = flat(init_params())
    ys = np_local_models(x, data, k, 0.1)
    ref = x - np.median(x - np.array(ys), axis=0)
    np.testing.assert_allclose(flat(p)[0], ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(optdist.bytes_sent(s), [(N - 1) * 4 * 4] * N)  # all-gather of 4 f32


def test_skip_nonfinite_keeps_anchor(data):
    """Wrapped in skip_nonfinite, a NaN on one worker at a sync leaves every anchor untouched."""
    params = init_params()
    tx = optdist.skip_nonfinite(outer.local_sgd(optax.sgd(0.1), 1, "data"), "data")

    def step(p, s, poison):
        g = jax.tree_util.tree_map(lambda x: jnp.where(poison, jnp.nan, x), p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    p0, s0 = optdist.replicate((params, tx.init(params)), N)
    p1, s1 = optdist.simulate(step)(p0, s0, jnp.array([False, True, False, False]))
    assert_trees_close(p1, p0, rtol=0, atol=0)
    assert_trees_close(s1.inner_state.anchor, s0.inner_state.anchor, rtol=0, atol=0)
    np.testing.assert_array_equal(s1.skipped, [1] * N)


def test_transform_aggregator_top_k_with_error_feedback_matches_reference(data):
    """A stateful aggregator (compressed mean with EF) compresses the pseudo-gradients at syncs only."""
    k, rounds, lr = 2, 3, 0.1
    agg = optdist.aggregation.compressed(optdist.compressors.top_k(0.3), feedback="ef")
    tx = outer.local_sgd(optax.sgd(lr), k, "data", aggregator=agg)
    p, s, (_, states) = run(tx, k * rounds + 1, data, record=True)  # one step into round 4
    # float64 reference: top-1 of w's 3 entries with a per-worker residual; b (a scalar) sent exactly.
    x, err = flat(init_params()), np.zeros((N, 3))
    for _ in range(rounds):
        ys = np.array(np_local_models(x, data, k, lr))
        deltas = x - ys
        pw = deltas[:, 1:] + err
        keep = np.abs(pw) >= np.sort(np.abs(pw), axis=1)[:, -1:]
        sent = np.where(keep, pw, 0.0)
        err = pw - sent
        x = x - np.concatenate([[deltas[:, 0].mean()], sent.mean(0)])
    after = np.array(np_local_models(x, data, 1, lr))  # the extra inner step
    np.testing.assert_allclose(flat(p), after, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(s.aggregator_state.error["w"]), err, rtol=1e-5, atol=1e-6)
    assert not np.allclose(err[0], err[1])  # per-worker residuals
    # The residual changes at syncs only; bytes = one compressed mean per sync.
    res = np.asarray(states.aggregator_state.error["w"])  # [workers, steps, 3]
    np.testing.assert_array_equal(res[:, k * rounds], res[:, k * rounds - 1])
    as_tx = optdist.comm.as_transform(agg, "data")
    single = optdist.simulate(lambda g, st: as_tx.update(g, st)[1])(
        *optdist.replicate((init_params(), as_tx.init(init_params())), N)
    )
    np.testing.assert_array_equal(optdist.bytes_sent(s), np.asarray(optdist.bytes_sent(single)) * rounds)
    partial = outer.local_sgd(optax.sgd(lr), k, "data", aggregator=agg, num_participants=2)
    with pytest.raises(ValueError, match="participation"):
        run(partial, k, data)
    with pytest.raises(TypeError, match="aggregator"):  # a transform is not an aggregator
        outer.local_sgd(optax.sgd(lr), k, "data", aggregator=as_tx)


def test_transform_aggregator_three_execution_modes_agree():
    params, data8 = init_params(), jnp.asarray(make_data(8, seed=4), jnp.float32)
    agg = optdist.aggregation.compressed(optdist.compressors.top_k(0.3), feedback="ef")
    tx = outer.local_sgd(optax.sgd(0.1), 2, "data", aggregator=agg)

    def step(p, s, d):
        u, s = tx.update(jax.grad(loss)(p, d), s, p)
        return optax.apply_updates(p, u), s

    out = run_in_three_modes(step, optdist.replicate((params, tx.init(params)), 8), data8, steps=5)
    ref_p, ref_s = out["simulate"]
    assert float(np.abs(np.asarray(ref_s.aggregator_state.error["w"])).max()) > 0
    for p, s in out.values():
        assert_trees_close(p, ref_p, rtol=1e-5, atol=1e-6)
        assert_trees_close(s.aggregator_state.error, ref_s.aggregator_state.error, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(optdist.bytes_sent(s), optdist.bytes_sent(ref_s))


def test_aliases_work_with_inject_hyperparams(data):
    """optax passes an alias's **kwargs back by name, and injected rates are traced in update."""
    static = ("sync_every", "axis_name")
    injected = optax.inject_hyperparams(outer.diloco, static_args=static)(
        inner_lr=0.05, outer_lr=0.7, sync_every=2, axis_name="data"
    )
    plain = outer.diloco(inner_lr=0.05, outer_lr=0.7, sync_every=2, axis_name="data")
    p_inj, s_inj, _ = run(injected, 5, data)
    p_plain, _, _ = run(plain, 5, data)
    assert_trees_close(p_inj, p_plain, rtol=1e-5, atol=1e-6)
    assert set(s_inj.hyperparams) >= {"inner_lr", "outer_lr", "outer_momentum"}
    sgd = optax.inject_hyperparams(outer.local_sgd, static_args=static)(
        inner=optax.sgd(0.1), sync_every=2, axis_name="data", seed=0
    )
    assert_trees_close(run(sgd, 4, data)[0], run(outer.local_sgd(optax.sgd(0.1), 2, "data"), 4, data)[0])


def test_robust_aggregator_trimmed_mean_matches_reference(data):
    """A robust rule in the sync slot: the anchor moves by the trimmed mean of the pseudo-gradients."""
    k, rounds, lr = 2, 3, 0.1
    tx = outer.local_sgd(
        optax.sgd(lr), k, "data", aggregator=optdist.aggregation.robust(optdist.aggregators.trimmed_mean(1))
    )
    p, s, _ = run(tx, k * rounds, data)
    x = flat(init_params())
    for _ in range(rounds):
        deltas = x - np.array(np_local_models(x, data, k, lr))
        x = x - np.sort(deltas, axis=0)[1:-1].mean(axis=0)  # n = 4, f = 1
    np.testing.assert_allclose(flat(p), np.tile(x, (N, 1)), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(optdist.bytes_sent(s), [rounds * (N - 1) * 4 * 4] * N)  # gather 4 f32
