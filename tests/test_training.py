"""Flax integration: nnx.Optimizer and linen TrainState around optdist chains, and optdist.training.

Every nnx / linen path is checked against the plain optax path (``(params, opt_state)`` and
``tx.update`` by hand) under ``optdist.simulate`` and ``optdist.data_parallel`` on the 8 CPU
devices: same parameters, same exact byte counts.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen, nnx
from flax.training.train_state import TrainState

import optdist
from optdist import training

W = 8
MESH = jax.make_mesh((8,), ("data",))
RUNNERS = {
    "simulate": lambda f: optdist.simulate(f, "data"),
    "data_parallel": lambda f: optdist.data_parallel(f, MESH, "data"),
}


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.hidden = nnx.Linear(4, 8, rngs=rngs)
        self.out = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
        return self.out(jax.nn.relu(self.hidden(x)))


def model_loss(model, x, y):
    return jnp.mean((model(x) - y) ** 2)


def data(workers=W, per_worker=2, seed=1):
    kx, ky = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (workers * per_worker, 4))
    y = jax.random.normal(ky, (workers * per_worker, 2))
    return optdist.shard_batch((x, y), workers)


def leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def assert_leaves_close(a, b, rtol=1e-6, atol=1e-7):
    a, b = leaves(a), leaves(b)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


def run_nnx(tx, mode, steps, workers=W, models=None, **step_kw):
    """nnx path: nnx.Optimizer inside optdist.training.nnx_train_step; returns (params, optimizer, m)."""
    if models is None:
        model = MLP(nnx.Rngs(0))
        graphdef, state = nnx.split((model, nnx.Optimizer(model, tx, wrt=nnx.Param)))
        state_w = optdist.replicate(state, workers)
    else:
        graphdef, state_w = nnx.split(models)
    step = RUNNERS[mode](training.nnx_train_step(graphdef, model_loss, axis_name="data", **step_kw))
    batch = data(workers)
    history = []
    for _ in range(steps):
        state_w, metrics = step(state_w, *batch)
        history.append(training.summarize(metrics))
    model_w, optimizer_w = nnx.merge(graphdef, state_w)
    return nnx.as_pure(nnx.state(model_w, nnx.Param)), optimizer_w, history


def run_plain(tx, mode, steps, workers=W, params_w=None):
    """optax path on pure parameters: (params, opt_state), tx.update and apply_updates by hand."""
    graphdef, params = nnx.split(MLP(nnx.Rngs(0)), nnx.Param)
    params = nnx.as_pure(params)

    def loss(p, x, y):
        return model_loss(nnx.merge(graphdef, p), x, y)

    def step(p, s, x, y):
        updates, s = tx.update(jax.grad(loss)(p, x, y), s, p)
        return optax.apply_updates(p, updates), s

    if params_w is None:
        params_w = optdist.replicate(params, workers)
    state_w = jax.vmap(tx.init)(params_w)
    run = RUNNERS[mode](step)
    batch = data(workers)
    for _ in range(steps):
        params_w, state_w = run(params_w, state_w, *batch)
    return params_w, state_w


@pytest.mark.parametrize("mode", sorted(RUNNERS))
def test_nnx_optimizer_with_compressed_chain_matches_plain_optax(mode):
    tx = optax.chain(
        optdist.compressed_mean(optdist.compressors.top_k(0.3), "data", feedback="ef"), optax.adam(1e-2)
    )
    params, optimizer_w, history = run_nnx(tx, mode, 3)
    ref_params, ref_state = run_plain(tx, mode, 3)
    assert_leaves_close(params, ref_params)
    assert isinstance(optimizer_w, nnx.Optimizer)
    np.testing.assert_array_equal(optdist.bytes_sent(optimizer_w.opt_state), optdist.bytes_sent(ref_state))
    assert history[-1]["bytes_sent"] == int(optdist.bytes_sent(ref_state)[0]) > 0
    assert np.asarray(optimizer_w.step[...]).tolist() == [3] * W  # nnx.Optimizer counts its steps
    assert history[-1]["loss"] < history[0]["loss"]


# Outer loops replace the parameters on a sync step; their update is new - old, which
# nnx.Optimizer.update adds (optax.apply_updates), exactly as the plain path does.
@pytest.mark.parametrize("mode", sorted(RUNNERS))
def test_nnx_optimizer_outer_loop_matches_plain_optax(mode):
    tx = optdist.diloco(0.01, sync_every=2, axis_name="data")
    params, optimizer_w, history = run_nnx(tx, mode, 4, param_spread=True)
    ref_params, ref_state = run_plain(tx, mode, 4)
    assert_leaves_close(params, ref_params)
    np.testing.assert_array_equal(optdist.bytes_sent(optimizer_w.opt_state), optdist.bytes_sent(ref_state))
    # Steps 1 and 3 are local (workers drift apart on their own batches, nothing is sent);
    # steps 2 and 4 synchronize (all-reduce of the pseudo-gradients; workers agree again, up to
    # the rounding of adding new - old to each worker's own parameters).
    spreads = [h["param_spread"] for h in history]
    sent = [h["bytes_sent"] for h in history]
    assert spreads[0] > 1e-4 and spreads[2] > 1e-4
    assert spreads[1] < 1e-6 and spreads[3] < 1e-6
    assert sent[0] == 0 and sent[1] > 0 and sent[2] == sent[1] and sent[3] == 2 * sent[1]


@pytest.mark.parametrize("mode,workers", [("simulate", 8), ("data_parallel", 16)])
def test_nnx_vmap_per_worker_models_with_gossip(mode, workers):
    """Per-worker models built with nnx.vmap (a different init each), decentralized training."""
    tx = optax.chain(optax.sgd(0.1), optdist.gossip("ring", "data"))

    @nnx.vmap
    def make(key):
        model = MLP(nnx.Rngs(key))
        return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

    models = make(jax.random.split(jax.random.key(0), workers))
    init_params = nnx.as_pure(nnx.state(models[0], nnx.Param))
    params, optimizer_w, history = run_nnx(tx, mode, 3, workers, models=models, param_spread=True)
    ref_params, ref_state = run_plain(tx, mode, 3, workers, params_w=init_params)
    assert_leaves_close(params, ref_params)
    np.testing.assert_array_equal(optdist.bytes_sent(optimizer_w.opt_state), optdist.bytes_sent(ref_state))
    # The gathered spread is that of the stacked parameters, and gossip shrinks it.
    stacked = leaves(params)
    spread = max(float(np.abs(p - p.mean(0)).max()) for p in stacked)
    np.testing.assert_allclose(history[-1]["param_spread"], spread, rtol=1e-5)
    assert history[-1]["param_spread"] < history[0]["param_spread"]
    # Ring gossip: each worker sends its parameters to its two neighbours once per step (float32).
    n_params = sum(int(np.prod(p.shape[1:])) for p in stacked)
    assert history[-1]["bytes_sent"] == 3 * 2 * 4 * n_params


class LinenMLP(linen.Module):
    @linen.compact
    def __call__(self, x):
        return linen.Dense(2, name="out")(jax.nn.relu(linen.Dense(8, name="hidden")(x)))


def linen_setup(tx, workers=W):
    module = LinenMLP()
    params = module.init(jax.random.key(0), jnp.zeros((1, 4)))["params"]
    state = TrainState.create(apply_fn=module.apply, params=params, tx=tx)

    def loss(p, x, y):
        return jnp.mean((module.apply({"params": p}, x) - y) ** 2)

    return optdist.replicate(state, workers), loss


def test_linen_train_state_apply_gradients_matches_train_step(mode="simulate"):
    tx = optax.chain(optdist.powersgd(1, "data", min_compression_rate=1.0), optax.adam(1e-2))
    state_w, loss = linen_setup(tx)

    def linen_step(state, x, y):  # the usual linen step, one worker's view
        return state.apply_gradients(grads=jax.grad(loss)(state.params, x, y))

    run = RUNNERS[mode](linen_step)
    ref = RUNNERS[mode](training.train_step(loss, tx, axis_name="data"))
    params_w, opt_w = state_w.params, state_w.opt_state
    for _ in range(3):
        state_w = run(state_w, *data())
        params_w, opt_w, metrics = ref(params_w, opt_w, *data())
    assert_leaves_close(state_w.params, params_w)
    np.testing.assert_array_equal(state_w.step, [3] * W)
    np.testing.assert_array_equal(optdist.bytes_sent(state_w.opt_state), optdist.bytes_sent(opt_w))
    assert training.summarize(metrics)["bytes_sent"] == int(optdist.bytes_sent(opt_w)[0]) > 0


@pytest.mark.parametrize("mode", sorted(RUNNERS))
def test_seeded_spsa_gets_loss_fn_through_nnx_optimizer_and_linen_train_state(mode):
    """seeded_spsa needs ``loss_fn=``: nnx.Optimizer.update forwards it; TrainState.apply_gradients
    does not, so the linen step calls tx.update through optdist.training.apply_gradients. The two
    paths start from the same parameter values (same leaf order), so they must agree exactly."""
    tx = optax.chain(optdist.seeded_spsa("data", clip=20.0), optax.sgd(1e-2))
    state_w, loss = linen_setup(tx)
    model = MLP(nnx.Rngs(0))
    values = nnx.as_pure(nnx.state(model, nnx.Param))
    linen_params = {name: dict(values[name]) for name in ("hidden", "out")}  # same names as nnx
    state_w = state_w.replace(params=optdist.replicate(linen_params, W))
    one = optdist.unreplicate(state_w)
    with pytest.raises(ValueError, match="loss_fn"):  # kwargs of apply_gradients replace fields
        one.apply_gradients(grads=jax.tree_util.tree_map(jnp.zeros_like, one.params))

    def linen_step(state, x, y):
        return training.apply_gradients(state, None, loss_fn=lambda p: loss(p, x, y))

    run = RUNNERS[mode](linen_step)
    for _ in range(3):
        state_w = run(state_w, *data())
    params, optimizer_w, history = run_nnx(tx, mode, 3, gradients=False, pass_loss_fn=True)
    assert_leaves_close(params, state_w.params, rtol=0, atol=0)
    assert all(
        jax.tree_util.tree_leaves(optdist.is_replicated(state_w.params))
    )  # every worker rebuilds the estimate
    np.testing.assert_array_equal(state_w.step, [3] * W)
    # One int8 projection per worker and step, all-gathered: 7 bytes sent per step.
    np.testing.assert_array_equal(optdist.bytes_sent(state_w.opt_state), [3 * (W - 1)] * W)
    np.testing.assert_array_equal(optdist.bytes_sent(optimizer_w.opt_state), [3 * (W - 1)] * W)
    assert [h["bytes_sent"] for h in history] == [7, 14, 21]
    assert history[-1]["loss"] < history[0]["loss"]


def test_train_step_metrics_are_the_workers_statistics():
    """Gathered metrics equal NumPy statistics of the per-worker values, 2 workers per device."""
    workers = 16
    tx = optdist.local_sgd(optax.sgd(0.1), 3, "data")
    state_w, loss = linen_setup(tx, workers)
    params_w, opt_w = state_w.params, state_w.opt_state
    local = training.train_step(loss, tx)  # no axis: each worker's own loss
    gathered = training.train_step(loss, tx, axis_name="data", param_spread=True)
    both = lambda p, s, x, y: (local(p, s, x, y)[2]["loss"], gathered(p, s, x, y))  # noqa: E731
    run = RUNNERS["data_parallel"](both)
    batch = data(workers)
    for _ in range(2):
        own, (params_w, opt_w, metrics) = run(params_w, opt_w, *batch)
    own = np.asarray(own, np.float64)
    np.testing.assert_allclose(np.asarray(metrics["loss"]), np.full(workers, own.mean()), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(metrics["loss_spread"]), own.max() - own.min(), rtol=1e-5)
    spread = max(float(np.abs(p - p.mean(0)).max()) for p in leaves(params_w))
    assert spread > 1e-4  # local steps: the workers have drifted apart
    np.testing.assert_allclose(np.asarray(metrics["param_spread"]), spread, rtol=1e-5)
    summary = training.summarize(metrics)
    assert summary["bytes_sent"] == 0  # no sync yet (sync_every=3)
    np.testing.assert_allclose(summary["loss"], own.mean(), rtol=1e-6)
    assert set(summary) == {"loss", "loss_spread", "param_spread", "bytes_sent"}


def test_train_step_has_aux_and_single_worker():
    def loss_aux(p, x, y):
        err = jnp.mean((x @ p["w"] - y) ** 2)
        return err, {"err2": 2 * err}

    tx = optax.sgd(0.1)
    params = {"w": jnp.ones((4, 2))}
    x, y = jax.tree_util.tree_map(lambda a: a[0], data())
    new, _, metrics = jax.jit(training.train_step(loss_aux, tx, has_aux=True))(params, tx.init(params), x, y)
    err, grads = jax.value_and_grad(lambda p: loss_aux(p, x, y)[0])(params)
    np.testing.assert_allclose(new["w"], params["w"] - 0.1 * grads["w"], rtol=1e-6)
    np.testing.assert_allclose(metrics["loss"], err, rtol=1e-6)
    np.testing.assert_allclose(metrics["aux"]["err2"], 2 * err, rtol=1e-6)
    assert training.summarize(metrics) == {"loss": pytest.approx(float(err)), "bytes_sent": 0}


def test_bad_options_are_named():
    tx = optax.sgd(0.1)
    with pytest.raises(ValueError, match="param_spread"):
        training.train_step(model_loss, tx, param_spread=True)
    with pytest.raises(ValueError, match="has_aux"):
        training.train_step(model_loss, tx, has_aux=True, gradients=False)
    with pytest.raises(TypeError, match="pass_loss_fn"):
        training.train_step(model_loss, tx, pass_loss_fn="yes")
    with pytest.raises(TypeError, match="TrainState"):
        training.apply_gradients({"params": 1}, None)
    with pytest.raises(ValueError, match="scalar"):
        training.worker_metrics(jnp.ones(3))
    graphdef, state = nnx.split(MLP(nnx.Rngs(0)))  # the model alone, no optimizer
    with pytest.raises(TypeError, match="nnx.split\\(\\(model, optimizer\\)\\)"):
        training.nnx_train_step(graphdef, model_loss)(state, *jax.tree_util.tree_map(lambda a: a[0], data()))


def test_readme_first_example():
    """The README's first example (kept in /work/briefs/readme_example.md for the README)."""
    namespace = {}
    exec(compile(README_FIRST_EXAMPLE, "readme_first_example", "exec"), namespace)
    loss, optimizer_w = namespace["loss"], namespace["optimizer_w"]
    assert float(loss.mean()) < 2.3  # below the 10-class chance loss after 50 steps
    sent = optdist.bytes_sent(optimizer_w.opt_state)
    assert sent.shape == (8,) and (sent == sent[0]).all() and sent[0] > 0


README_FIRST_EXAMPLE = """
import jax
import jax.numpy as jnp
import optax
from flax import nnx

import optdist


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.hidden = nnx.Linear(64, 32, rngs=rngs)
        self.out = nnx.Linear(32, 10, rngs=rngs)

    def __call__(self, x):
        return self.out(jax.nn.relu(self.hidden(x)))


def model_loss(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


tx = optax.chain(optdist.mean_gradients("data"), optax.adam(1e-2))
model = MLP(nnx.Rngs(0))
optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
graphdef, state = nnx.split((model, optimizer))  # a pytree: it can carry a worker axis


def train_step(state, x, y):  # one worker's view
    model, optimizer = nnx.merge(graphdef, state)
    loss, grads = nnx.value_and_grad(model_loss)(model, x, y)  # this worker's gradient
    optimizer.update(model, grads)  # tx.update (all-reduce mean, then Adam) and apply
    return nnx.state((model, optimizer)), loss


x = jax.random.normal(jax.random.key(0), (256, 64))
y = jax.random.randint(jax.random.key(1), (256,), 0, 10)
state_w = optdist.replicate(state, 8)  # leading worker axis
step = optdist.simulate(train_step, "data")  # 8 workers via vmap
for _ in range(50):
    state_w, loss = step(state_w, *optdist.shard_batch((x, y), 8))
model_w, optimizer_w = nnx.merge(graphdef, state_w)  # 8 stacked models and optimizers
print(loss.mean(), optdist.bytes_sent(optimizer_w.opt_state))  # per-worker bytes so far
"""
