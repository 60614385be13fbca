"""Gossip (D-SGD, CHOCO-SGD) and gradient tracking against float64 NumPy references of the papers' rules.

Problem: heterogeneous least squares. Worker i holds (X_i, Y_i) drawn around its own linear model,
f_i(W, b) = mean_k ||x_k W + b - y_k||^2, so the workers' optima differ and a constant-step D-SGD is
biased while gradient tracking is not.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optdist
from optdist import decentralized as dec
from tests.helpers import assert_trees_close, run_in_three_modes

N, B, D_IN, D_OUT = 8, 6, 4, 3
LR = 0.05


def _data(n=N, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, B, D_IN))
    w_true = rng.normal(size=(n, D_IN, D_OUT))  # one model per worker: heterogeneous optima
    y = np.einsum("nbi,nio->nbo", x, w_true) + 0.1 * rng.normal(size=(n, B, D_OUT))
    return np.concatenate([x, y], axis=-1)  # [n, B, D_IN + D_OUT]


BATCHES = _data()
PARAMS0 = {
    "b": np.random.default_rng(1).normal(size=(N, D_OUT)),
    "w": np.random.default_rng(2).normal(size=(N, D_IN, D_OUT)),
}


def loss(params, batch):
    x, y = batch[:, :D_IN], batch[:, D_IN:]
    return jnp.mean(jnp.sum((x @ params["w"] + params["b"] - y) ** 2, axis=-1))


def np_grad(params, batch):
    x, y = batch[:, :D_IN], batch[:, D_IN:]
    r = x @ params["w"] + params["b"] - y
    return {"b": 2 * r.sum(0) / len(x), "w": 2 * x.T @ r / len(x)}


def make_step(tx):
    def step(params, state, batch):
        grads = jax.grad(loss)(params, batch)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


def init_workers(tx, params0=PARAMS0):
    params = jax.tree_util.tree_map(lambda p: jnp.asarray(p, jnp.float32), params0)
    state = jax.vmap(tx.init)(params)
    return params, state


def run(tx, steps, batches=BATCHES, params0=PARAMS0):
    params, state = init_workers(tx, params0)
    step = optdist.simulate(make_step(tx), "data")
    batches = jnp.asarray(batches, jnp.float32)
    for _ in range(steps):
        params, state = step(params, state, batches)
    return params, state


# ---- float64 references, one worker list at a time ------------------------------------------------


def workers(tree):
    return [{k: np.asarray(v[i], np.float64) for k, v in tree.items()} for i in range(len(tree["b"]))]


def stack(ws):
    return {k: np.stack([w[k] for w in ws]) for k in ws[0]}


def mix_np(matrix, ws):
    return [{k: sum(matrix[i, j] * ws[j][k] for j in range(len(ws))) for k in ws[0]} for i in range(len(ws))]


def add(a, b, scale=1.0):
    return {k: a[k] + scale * b[k] for k in a}


def ref_dsgd(matrix, steps, order, every=1):
    """D-SGD; ``matrix`` is W, or a function of the gossip round for a time-varying graph; with
    ``every = H`` only steps H-1, 2H-1, ... gossip (round t // H), the others are local SGD steps."""
    matrix_at = matrix if callable(matrix) else (lambda t: matrix)
    xs = workers(PARAMS0)
    for t in range(steps):
        grads = [np_grad(x, BATCHES[i]) for i, x in enumerate(xs)]
        if (t + 1) % every:
            xs = [add(x, g, -LR) for x, g in zip(xs, grads)]
        elif order == "adapt_then_combine":
            xs = mix_np(matrix_at(t // every), [add(x, g, -LR) for x, g in zip(xs, grads)])
        else:
            xs = [add(m, g, -LR) for m, g in zip(mix_np(matrix_at(t // every), xs), grads)]
    return stack(xs)


def top_k_np(v, ratio):
    flat = v.reshape(-1)
    k = max(1, math.ceil(ratio * flat.size - 1e-9))
    keep = np.argsort(-np.abs(flat), kind="stable")[:k]
    out = np.zeros_like(flat)
    out[keep] = flat[keep]
    return out.reshape(v.shape)


def ref_choco(matrix, steps, ratio, gamma):
    """Koloskova et al. 2019, Algorithm 2, with an explicit copy x̂_j of every worker's public value."""
    xs = workers(PARAMS0)
    public = [{k: np.zeros_like(v) for k, v in x.items()} for x in xs]
    for _ in range(steps):
        half = [add(x, np_grad(x, BATCHES[i]), -LR) for i, x in enumerate(xs)]
        qs = [{k: top_k_np(h[k] - p[k], ratio) for k in h} for h, p in zip(half, public)]
        public = [add(p, q) for p, q in zip(public, qs)]
        mixed = mix_np(matrix, public)
        xs = [add(h, add(m, p, -1.0), gamma) for h, m, p in zip(half, mixed, public)]
    return stack(xs)


def ref_diging(matrix, steps):
    """Nedić, Olshevsky, Shi 2017: x ← W x − η y; y ← W y + g(x_new) − g(x_old), y⁰ = g(x⁰)."""
    xs = workers(PARAMS0)
    grads = [np_grad(x, BATCHES[i]) for i, x in enumerate(xs)]
    ys = grads
    for _ in range(steps):
        xs = [add(m, y, -LR) for m, y in zip(mix_np(matrix, xs), ys)]
        new_grads = [np_grad(x, BATCHES[i]) for i, x in enumerate(xs)]
        ys = [add(add(m, g), g0, -1.0) for m, g, g0 in zip(mix_np(matrix, ys), new_grads, grads)]
        grads = new_grads
    return stack(xs)


PARAM_BYTES = 4 * (D_OUT + D_IN * D_OUT)


# ---- topologies ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "graph, terms",
    [
        (dec.ring(8), 2),
        (dec.ring(2), 1),
        (dec.ring(1), 0),
        (dec.torus(2, 4), 3),  # up and down coincide on 2 rows: merged
        (dec.torus(3, 3), 4),
        (dec.exponential(8), 3),
        (dec.exponential(6), 3),
        (dec.complete(4), 3),
    ],
)
def test_topologies_are_doubly_stochastic_with_one_exchange_per_distinct_neighbour(graph, terms):
    w = graph.matrix()
    assert len(graph.perms) == terms
    np.testing.assert_allclose(w.sum(0), 1.0, atol=1e-12)
    np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-12)
    assert (w >= 0).all()
    for k in range(terms):  # sources() inverts the permutation
        assert [graph.perms[k][s] for s in graph.sources(k)] == list(range(graph.size))


def test_topology_shapes_and_spectral_gaps():
    np.testing.assert_allclose(dec.complete(5).matrix(), np.full((5, 5), 0.2))
    ring8 = dec.ring(8).matrix()
    np.testing.assert_allclose(ring8, ring8.T)
    assert ((ring8 > 0).sum(1) == 3).all() and ring8[0, 1] == ring8[0, 7] == pytest.approx(1 / 3)
    gaps = [g.spectral_gap() for g in (dec.ring(16), dec.torus(4, 4), dec.exponential(16), dec.complete(16))]
    ring_gap, torus_gap, exp_gap, complete_gap = gaps
    assert ring_gap < torus_gap <= exp_gap + 1e-12 < complete_gap == pytest.approx(1.0)


def test_one_peer_exponential_rounds_average_exactly_in_log2_n_steps():
    schedule = dec.one_peer_exponential(8)
    assert len(schedule.rounds) == 3 and all(len(r.perms) == 1 for r in schedule.rounds)
    product = schedule.matrix(2) @ schedule.matrix(1) @ schedule.matrix(0)
    np.testing.assert_allclose(product, np.full((8, 8), 1 / 8), atol=1e-15)
    assert not np.allclose(schedule.matrix(1) @ schedule.matrix(0), 1 / 8)  # two rounds are not enough
    assert len(dec.one_peer_exponential(6).rounds) == 3 and len(dec.one_peer_exponential(1).rounds) == 1


def test_custom_topology_validation():
    with pytest.raises(ValueError, match="sum to 1"):
        dec.custom(3, 0.5, [(0.6, (1, 2, 0))])
    with pytest.raises(ValueError, match="not a permutation"):
        dec.custom(3, 0.5, [(0.5, (1, 1, 0))])
    merged = dec.custom(3, 0.25, [(0.25, (1, 2, 0)), (0.25, (1, 2, 0)), (0.25, (0, 1, 2))])
    assert merged.self_weight == 0.5 and merged.weights == (0.5,)


# ---- D-SGD ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("order", ["adapt_then_combine", "combine_then_adapt"])
def test_dsgd_matches_float64_reference_and_counts_bytes(order):
    steps = 4
    tx = optax.chain(optax.sgd(LR), optdist.gossip("ring", "data", order=order))
    params, state = run(tx, steps)
    assert_trees_close(params, ref_dsgd(dec.ring(N).matrix(), steps, order), rtol=1e-5, atol=1e-5)
    # two ring neighbours, the full parameters to each, every step
    np.testing.assert_array_equal(optdist.bytes_sent(state), steps * 2 * PARAM_BYTES)


def test_time_varying_dsgd_matches_float64_reference_with_one_exchange_per_step():
    steps = 5  # more than one cycle of the 3 rounds
    tx = optax.chain(optax.sgd(LR), optdist.gossip("one_peer_exponential", "data"))
    params, state = run(tx, steps)
    schedule = dec.one_peer_exponential(N)
    assert_trees_close(params, ref_dsgd(schedule.matrix, steps, "adapt_then_combine"), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(optdist.bytes_sent(state), steps * PARAM_BYTES)  # one peer per step


@pytest.mark.parametrize("topology", ["ring", "one_peer_exponential"])
def test_local_steps_between_gossip_rounds_match_the_reference(topology):
    """gossip_every=3: two local SGD steps, then a gossip step; a time-varying graph advances per round."""
    steps, every = 8, 3  # gossip at steps 2 and 5
    tx = optax.chain(
        optax.sgd(LR), optdist.gossip(topology, "data", order="combine_then_adapt", gossip_every=every)
    )
    params, state = run(tx, steps)
    matrix = dec.ring(N).matrix() if topology == "ring" else dec.one_peer_exponential(N).matrix
    assert_trees_close(params, ref_dsgd(matrix, steps, "combine_then_adapt", every), rtol=1e-5, atol=1e-5)
    terms = 2 if topology == "ring" else 1
    np.testing.assert_array_equal(optdist.bytes_sent(state), 2 * terms * PARAM_BYTES)  # two rounds only


def test_time_varying_round_is_a_real_branch_in_every_mode():
    """One round per step runs (a cond, not a select of all rounds), and the modes agree."""
    tx = optax.chain(optax.sgd(LR), optdist.gossip("one_peer_exponential", "data"))
    init = init_workers(tx)
    batches = jnp.asarray(BATCHES, jnp.float32)
    jaxpr = jax.make_jaxpr(optdist.simulate(make_step(tx), "data", jit=False))(*init, batches)
    assert "cond" in {eqn.primitive.name for eqn in jaxpr.jaxpr.eqns}
    results = run_in_three_modes(make_step(tx), init, batches, steps=4)
    for name in ("data_parallel", "pmap"):
        assert_trees_close(results[name][0], results["simulate"][0], rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(optdist.bytes_sent(results[name][1]), 4 * PARAM_BYTES)


def test_gossip_preserves_the_mean_and_reaches_consensus_on_every_topology():
    x0 = {"v": jax.random.normal(jax.random.key(0), (N, 50))}
    for graph in (
        "ring",
        "torus",
        "exponential",
        dec.custom(N, 0.5, [(0.5, tuple(np.roll(np.arange(N), 3)))]),
    ):
        tx = optdist.gossip(graph, "data")
        step = optdist.simulate(
            lambda p, s, tx=tx: optax.apply_updates(p, tx.update({"v": 0 * p["v"]}, s, p)[0]), "data"
        )
        x, s = x0, jax.vmap(tx.init)(x0)
        spread0 = float(jnp.linalg.norm(x["v"] - x["v"].mean(0)))
        for _ in range(120):  # the shift-by-3 graph mixes slowest: |λ₂| = cos(π/8) ≈ 0.92
            x = step(x, s)
        np.testing.assert_allclose(x["v"].mean(0), x0["v"].mean(0), atol=1e-5)
        assert float(jnp.linalg.norm(x["v"] - x["v"].mean(0))) < 1e-3 * spread0, graph


# ---- CHOCO-SGD ------------------------------------------------------------------------------------


CHOCO = optax.chain(
    optax.sgd(LR), optdist.gossip("ring", "data", optdist.compressors.top_k(0.25), consensus_step_size=0.5)
)


def test_choco_matches_float64_reference_and_counts_compressed_bytes():
    steps = 4
    params, state = run(CHOCO, steps)
    assert_trees_close(params, ref_choco(dec.ring(N).matrix(), steps, 0.25, 0.5), rtol=1e-5, atol=1e-5)
    # top-25%: b keeps 1 of 3, w 3 of 12 values, each with an int32 index, to two neighbours
    payload = (1 + 3) * (4 + 4)
    np.testing.assert_array_equal(optdist.bytes_sent(state), steps * 2 * payload)


def test_choco_runs_the_same_in_the_three_execution_modes():
    results = run_in_three_modes(make_step(CHOCO), init_workers(CHOCO), jnp.asarray(BATCHES, jnp.float32))
    for name in ("data_parallel", "pmap"):
        assert_trees_close(results[name][0], results["simulate"][0], rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(
            optdist.bytes_sent(results[name][1]), optdist.bytes_sent(results["simulate"][1])
        )


def test_gossip_with_several_workers_per_device_equals_simulation():
    """16 workers on 8 devices: ppermute spans the devices and the vmap axis inside each."""
    batches = jnp.asarray(_data(16, seed=3), jnp.float32)
    params0 = {k: jnp.asarray(np.concatenate([v, v[::-1] + 1]), jnp.float32) for k, v in PARAMS0.items()}
    tx = optax.chain(optax.sgd(LR), optdist.gossip("exponential", "data"))
    state0 = jax.vmap(tx.init)(params0)
    sim = optdist.simulate(make_step(tx), "data")(params0, state0, batches)
    dp = optdist.data_parallel(make_step(tx), jax.make_mesh((8,), ("data",)), "data")(
        params0, state0, batches
    )
    assert_trees_close(dp[0], sim[0], rtol=1e-6, atol=1e-6)


def test_choco_with_aggressive_compression_reaches_exact_consensus_and_keeps_the_mean():
    """Pure averaging with top-10%: CHOCO-gossip converges linearly to the exact mean at 5x fewer bytes."""
    x0 = {"v": jax.random.normal(jax.random.key(1), (N, 200))}
    tx = optdist.gossip("ring", "data", optdist.compressors.top_k(0.1), consensus_step_size=0.3)

    def step(p, s):
        updates, s = tx.update({"v": jnp.zeros_like(p["v"])}, s, p)
        return optax.apply_updates(p, updates), s

    run_step = optdist.simulate(step, "data")
    x, s = x0, jax.vmap(tx.init)(x0)
    spread0 = float(jnp.linalg.norm(x["v"] - x["v"].mean(0)))
    for _ in range(400):
        x, s = run_step(x, s)
    np.testing.assert_allclose(x["v"].mean(0), x0["v"].mean(0), atol=1e-4)
    assert float(jnp.linalg.norm(x["v"] - x["v"].mean(0))) < 1e-3 * spread0
    exact_bytes = 400 * 2 * 200 * 4
    assert optdist.bytes_sent(s)[0] * 5 == exact_bytes  # 20 values + 20 indices of 200 floats


@pytest.mark.parametrize(
    "compressor",
    [
        optdist.compressors.top_k(0.25),
        optdist.compressors.sign(scaled=True),
        optdist.compressors.rand_k(0.25),
        optdist.compressors.qsgd(4, bucket_size=16),
        optdist.compressors.int8(rounding="nearest"),
        optdist.compressors.threshold_top_k(0.25),
    ],
    ids=lambda c: c.name,
)
def test_codec_decodes_to_the_compressors_own_message(compressor):
    """decode(encode(x)) is what the collective protocol says this worker's message decodes to."""
    x = {"a": jax.random.normal(jax.random.key(2), (64,)), "s": jnp.ones(())}
    key = jax.random.key(3)
    decoded = compressor.codec.decode(compressor.codec.encode(x, key), x, key)
    assert jax.tree_util.tree_structure(decoded) == jax.tree_util.tree_structure(x)
    np.testing.assert_array_equal(decoded["s"], x["s"])  # scalars travel raw
    deterministic = compressor.name.startswith(("top_k", "sign")) or "rounding=nearest" in compressor.name
    if deterministic:  # the same message (int8(rounding="nearest") is now named qsgd(..., rounding=nearest))
        local = compressor.aggregate(x, compressor.init(x), key, 0, optdist.Channel(None)).local
        np.testing.assert_allclose(decoded["a"], local["a"], rtol=1e-6, atol=1e-7)
    else:  # randomized: a compressed (not identical) message of the same scale
        assert not np.allclose(decoded["a"], x["a"]) and np.isfinite(decoded["a"]).all()


# ---- gradient tracking ----------------------------------------------------------------------------


def diging(topology="ring"):
    return optax.chain(
        optdist.gradient_tracking(topology, "data"),
        optax.sgd(LR),
        optdist.gossip(topology, "data", order="combine_then_adapt"),
    )


def test_gradient_tracking_equals_diging_float64_reference():
    steps = 4
    params, state = run(diging(), steps)
    assert_trees_close(params, ref_diging(dec.ring(N).matrix(), steps), rtol=1e-5, atol=1e-5)
    # parameters and tracker both gossip to two neighbours
    np.testing.assert_array_equal(optdist.bytes_sent(state), steps * 2 * 2 * PARAM_BYTES)


@pytest.mark.parametrize("topology", ["exponential", "one_peer_exponential"])
def test_gradient_tracking_converges_to_the_global_optimum_where_dsgd_stalls(topology):
    x = BATCHES[..., :D_IN].reshape(-1, D_IN)
    y = BATCHES[..., D_IN:].reshape(-1, D_OUT)
    design = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    optimum = np.linalg.lstsq(design, y, rcond=None)[0]  # minimizer of the average loss
    w_star, b_star = optimum[:D_IN], optimum[D_IN]

    def distance(params):
        return max(
            float(np.abs(np.asarray(params["w"]) - w_star).max()),
            float(np.abs(np.asarray(params["b"]) - b_star).max()),
        )

    tracked, _ = run(diging(topology), 400)
    plain, _ = run(optax.chain(optax.sgd(LR), optdist.gossip(topology, "data")), 400)
    assert distance(tracked) < 1e-4
    assert distance(plain) > 1e-2  # the heterogeneity bias of constant-step D-SGD


# ---- errors ---------------------------------------------------------------------------------------


def test_clear_errors():
    with pytest.raises(ValueError, match="topology must be one of"):
        optdist.gossip("star", "data")
    with pytest.raises(ValueError, match="order must be one of"):
        optdist.gossip("ring", "data", order="mix_first")
    with pytest.raises(ValueError, match="needs a compressor"):
        optdist.gossip("ring", "data", consensus_step_size=0.5)
    with pytest.raises(ValueError, match="consensus_step_size"):
        optdist.gossip("ring", "data", optdist.compressors.top_k(0.1), consensus_step_size=0.0)
    with pytest.raises(ValueError, match="needs a fixed graph"):
        optdist.gossip(
            "one_peer_exponential", "data", optdist.compressors.top_k(0.1), consensus_step_size=0.5
        )
    with pytest.raises(ValueError, match="no point-to-point form"):
        optdist.gossip("ring", "data", optdist.compressors.powersgd(2))
    params = {"v": jnp.ones((3,))}
    tx = optdist.gossip("ring", "data")
    with pytest.raises(ValueError, match="needs|params"):
        tx.update(params, tx.init(params))
    with pytest.raises(optdist.UnboundAxisError, match="not bound"):
        tx.update(params, tx.init(params), params)
    wrong_size = optdist.gossip(dec.ring(4), "data")
    with pytest.raises(ValueError, match="is for 4 workers but the axis has 8"):
        optdist.simulate(lambda p, s: wrong_size.update(p, s, p), "data")(
            {"v": jnp.ones((8, 3))}, jax.vmap(wrong_size.init)({"v": jnp.ones((8, 3))})
        )


@pytest.mark.parametrize(
    "tx, expected",
    [
        (optdist.gossip("ring", "data"), 2),  # two neighbours, one float32 buffer each
        (optdist.gossip("exponential", "data"), 3),
        (optdist.gossip("ring", "data", optdist.compressors.top_k(0.25), consensus_step_size=0.5), 4),
        (optdist.gradient_tracking("ring", "data"), 2),
    ],
    ids=["ring", "exponential", "choco_top_k", "tracking"],
)
def test_one_collective_permute_per_term_and_dtype_however_many_leaves(tx, expected):
    """Leaves are packed per dtype before sending (CHOCO's top-k payload: float32 values, int32 indices)."""
    params = {f"w{i}": jnp.ones((16, 4)) for i in range(6)}
    lowered = jax.pmap(lambda g, s: tx.update(g, s, g), "data").lower(
        *optdist.replicate((params, tx.init(params)), 8)
    )
    assert lowered.as_text().count('"stablehlo.collective_permute"') == expected
