"""EControl's feedback strength: eta must scale with the compressor's contraction (issue 18).

The rule's message ``x = eta e + g - h`` evolves as ``x' = (1 + eta) (x - C(x)) - eta^2 e + (g' - g)``
(see :func:`optdist.compressed_mean`), so ``eta`` above ~delta/2 lets it grow geometrically.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optdist
from optdist import compressors
from optdist.feedback.compressed_mean import default_econtrol_eta

N, M, D = 4, 32, 200  # workers, examples per worker, dimension: top-k 1% keeps 2 of 200


def _least_squares():
    key = jax.random.key(0)
    a = jax.random.normal(key, (N, M, D)) / np.sqrt(D)
    b = jax.random.normal(jax.random.fold_in(key, 1), (N, M))
    return a, b


def _loss(w, ab):
    a, b = ab
    return 0.5 * jnp.mean((a @ w - b) ** 2)


def _final_losses(etas, steps, lr=1.5):
    """The mean loss after ``steps`` of top-k 1% EControl + SGD, for each eta (one compile each)."""
    ab = _least_squares()
    out = []
    for eta in etas:
        kw = {} if eta == "default" else {"econtrol_eta": eta}
        feedback = eta if eta in ("ef", "ef21") else "econtrol"
        if feedback != "econtrol":
            kw = {}
        tx = optax.chain(
            optdist.compressed_mean(compressors.top_k(0.01), "data", feedback=feedback, **kw), optax.sgd(lr)
        )

        def step(w, s, ab, tx=tx):
            u, s = tx.update(jax.grad(_loss)(w, ab), s, w)
            return w + u, s

        run = optdist.simulate(step, jit=False)

        @jax.jit
        def many(w, s, run=run):
            return jax.lax.scan(lambda c, _: (run(*c, ab), None), (w, s), None, length=steps)[0]

        w0 = jnp.zeros(D)
        w, _ = many(*optdist.replicate((w0, tx.init(w0)), N))
        out.append(float(jax.vmap(_loss)(jnp.broadcast_to(w[0], (N, D)), ab).mean()))
    return out


def test_old_default_diverges_and_the_derived_default_converges():
    init = float(jax.vmap(_loss, (None, 0))(jnp.zeros(D), _least_squares()).mean())
    old, new, ef21 = _final_losses([0.1, "default", "ef21"], steps=400)
    assert old > 10 * init  # eta = 0.1 >> delta / 2 = 0.005: the messages grow geometrically
    assert new < 0.3 * init
    assert new < 1.05 * ef21  # at least as good as EF21 (eta = 0) here


def test_default_eta_follows_the_declared_contraction():
    assert compressors.top_k(0.01).contraction == 0.01
    assert default_econtrol_eta(compressors.top_k(0.01)) == pytest.approx(0.0025)
    assert default_econtrol_eta(compressors.top_k(0.2)) == pytest.approx(0.05)
    assert compressors.sign().contraction is None
    assert default_econtrol_eta(compressors.sign()) == pytest.approx(0.0025)
    # The gain (1 + eta) sqrt(1 - delta) of the message recursion stays below 1 for the default.
    for delta in (1e-4, 1e-3, 0.01, 0.1, 0.5, 1.0):
        eta = default_econtrol_eta(compressors.top_k(delta))
        assert (1 + eta) * np.sqrt(1 - delta) < 1


def _top_k_np(x, k):
    out = np.zeros_like(x)
    idx = np.argsort(-np.abs(x), kind="stable")[:k]
    out[idx] = x[idx]
    return out


def test_econtrol_rule_matches_a_float64_reference():
    """Algorithm 1's client/server updates in float64 NumPy, 6 steps of per-worker gradients."""
    eta, k, steps = 0.2, 3, 6
    rng = np.random.default_rng(0)
    grads = rng.normal(size=(steps, N, 10)) * np.arange(1, N + 1)[None, :, None]
    tx = optdist.compressed_mean(compressors.top_k(0.3), "data", feedback="econtrol", econtrol_eta=eta)
    params = jnp.zeros(10)
    step = optdist.simulate(lambda g, s: tx.update(g, s, params))
    state = optdist.replicate(tx.init(params), N)
    e, h_i, h = np.zeros((N, 10)), np.zeros((N, 10)), np.zeros(10)
    for t in range(steps):
        out, state = step(jnp.asarray(grads[t], jnp.float32), state)
        delta = np.stack([_top_k_np(eta * e[i] + grads[t, i] - h_i[i], k) for i in range(N)])
        e = e + grads[t] - h_i - delta
        h_i = h_i + delta
        h = h + delta.mean(0)
        np.testing.assert_allclose(np.asarray(out), np.broadcast_to(h, (N, 10)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(state.aggregator.error), e, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(state.aggregator.local_h), h_i, rtol=1e-5, atol=1e-5)
