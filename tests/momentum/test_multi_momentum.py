"""Multi-momentum: one cluster is SGD with momentum, a float64 NumPy reference of the per-cluster
buffers and their average, the cluster id through extra args or a schedule, and named errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optdist
from optdist.momentum import multi_momentum, scale_by_multi_momentum


def _grads(rng, steps):
    return [{"a": rng.normal(size=(3,)), "b": rng.normal(size=(2, 2))} for _ in range(steps)]


def _flat(tree):
    return np.concatenate([np.ravel(tree["a"]), np.ravel(tree["b"])])


def test_one_cluster_is_sgd_with_momentum():
    rng = np.random.default_rng(0)
    grads = [jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), g) for g in _grads(rng, 6)]
    params = jax.tree_util.tree_map(jnp.zeros_like, grads[0])
    ours, theirs = multi_momentum(0.1, 1, 0.9), optax.sgd(0.1, momentum=0.9)
    s, r = ours.init(params), theirs.init(params)
    for g in grads:
        a, s = ours.update(g, s, params, cluster=0)
        b, r = theirs.update(g, r, params)
        jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)  # bit-identical


def ref_multi_momentum(grads, clusters, k, beta, lr):
    """m_c <- beta m_c + g for this step's cluster c; update -lr * mean_k m_k (float64)."""
    m = np.zeros((k, grads[0].size))
    out = []
    for g, c in zip(grads, clusters):
        m[c] = beta * m[c] + g
        out.append(-lr * m.mean(axis=0))
    return np.array(out)


def test_matches_float64_reference():
    rng = np.random.default_rng(1)
    grads = _grads(rng, 10)
    clusters = [0, 2, 2, 1, 0, 3, 2, 0, 1, 1]
    want = ref_multi_momentum([_flat(g) for g in grads], clusters, 4, 0.8, 0.05)
    with jax.enable_x64(True):
        tx = multi_momentum(0.05, 4, 0.8)
        params = jax.tree_util.tree_map(lambda x: jnp.zeros_like(jnp.asarray(x)), grads[0])
        state = tx.init(params)

        def run(state, xs):
            def body(s, x):
                g, c = x
                u, s = tx.update(g, s, params, cluster=c)  # a traced cluster id
                return s, u

            return jax.lax.scan(body, state, xs)

        stacked = jax.tree_util.tree_map(lambda *x: jnp.stack([jnp.asarray(v) for v in x]), *grads)
        _, outs = jax.jit(run)(state, (stacked, jnp.asarray(clusters, jnp.int32)))
        assert outs["a"].dtype == jnp.float64
    got = np.concatenate([np.asarray(outs["a"]), np.asarray(outs["b"]).reshape(10, -1)], axis=1)
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-14)


def test_schedule_gives_the_cluster_and_a_call_overrides_it():
    rng = np.random.default_rng(2)
    grads = [jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), g) for g in _grads(rng, 5)]
    params = jax.tree_util.tree_map(jnp.zeros_like, grads[0])
    scheduled = scale_by_multi_momentum(3, 0.5, cluster_schedule=lambda t: t % 3)
    explicit = scale_by_multi_momentum(3, 0.5)
    s, e = scheduled.init(params), explicit.init(params)
    for t, g in enumerate(grads):
        a, s = scheduled.update(g, s)
        b, e = explicit.update(g, e, cluster=t % 3)
        jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)
    a, _ = scheduled.update(grads[0], s, cluster=2)  # the extra argument wins over the schedule
    b, _ = explicit.update(grads[0], e, cluster=2)
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


def test_per_worker_clusters_before_the_mean():
    """Each worker's batch from its own cluster (cluster=worker index): per-worker buffers, then the
    mean over workers; equals the NumPy recursion run per worker and averaged."""
    w, d, beta = 4, 3, 0.7
    rng = np.random.default_rng(3)
    g = rng.normal(size=(6, w, d)).astype(np.float32)
    tx = optax.chain(scale_by_multi_momentum(w, beta), optdist.mean_gradients("data"))
    params = {"w": jnp.zeros(d)}
    state_w = optdist.replicate(tx.init(params), w)

    def run(state, gs):
        def body(s, x):
            u, s = tx.update({"w": x}, s, cluster=optdist.worker_index("data"))
            return s, u["w"]

        return jax.lax.scan(body, state, gs)[1]

    outs = np.asarray(optdist.simulate(run)(state_w, jnp.asarray(np.swapaxes(g, 0, 1))))
    m = np.zeros((w, w, d))  # [worker, cluster, d]
    for t in range(6):
        for i in range(w):
            m[i, i] = beta * m[i, i] + g[t, i]
        want = m.mean(axis=1).mean(axis=0)
        np.testing.assert_allclose(outs[:, t], np.broadcast_to(want, (w, d)), rtol=1e-5, atol=1e-6)


def test_errors_are_named():
    params = {"w": jnp.zeros(2)}
    tx = scale_by_multi_momentum(3)
    state = tx.init(params)
    with pytest.raises(ValueError, match="cluster"):
        tx.update(params, state)
    with pytest.raises(ValueError, match=r"cluster=3 is out of range.*\[0, 2\]"):
        tx.update(params, state, cluster=3)
    with pytest.raises(TypeError, match="cluster"):
        tx.update(params, state, cluster=jnp.zeros(2, jnp.int32))
    with pytest.raises(ValueError, match="num_clusters"):
        scale_by_multi_momentum(0)
    with pytest.raises(ValueError, match="beta"):
        scale_by_multi_momentum(2, beta=1.0)
    with pytest.raises(ValueError, match="learning_rate"):
        multi_momentum(-1.0, 2)
    with pytest.raises(TypeError, match="cluster_schedule"):
        scale_by_multi_momentum(2, cluster_schedule=3)
    with pytest.raises(TypeError, match="parameters"):
        tx.init({"w": jnp.zeros(2, jnp.int32)})
    # a traced id out of range cannot raise: the output is NaN (skip_nonfinite skips the step)
    out, _ = jax.jit(lambda s, c: tx.update(params, s, cluster=c))(state, jnp.asarray(5))
    assert np.isnan(np.asarray(out["w"])).all()
