"""A tiny heterogeneous least-squares problem with gradients in NumPy (float64) and JAX."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

import optdist

DIM = 3  # features; params are {"w": [DIM], "b": []}
EXAMPLES = 6  # per worker


def make_data(num_workers, seed=0):
    """Per-worker data [n, m, DIM + 1]; each worker has its own optimum (non-IID)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(num_workers, EXAMPLES, DIM))
    w_true = rng.normal(size=(num_workers, DIM))  # a different target model per worker
    y = np.einsum("nmd,nd->nm", x, w_true) + 0.1 * rng.normal(size=(num_workers, EXAMPLES))
    return np.concatenate([x, y[..., None]], axis=-1)


def init_params(seed=1):
    rng = np.random.default_rng(seed)
    return {"b": np.float32(rng.normal()), "w": rng.normal(size=DIM).astype(np.float32)}


def loss(params, data):
    x, y = data[:, :DIM], data[:, DIM]
    r = x @ params["w"] + params["b"] - y
    return 0.5 * jnp.mean(r * r)


def np_grad(theta, data):
    """Gradient of ``loss`` for the flat vector theta = [b, w...] (float64)."""
    x, y = data[:, :DIM], data[:, DIM]
    r = x @ theta[1:] + theta[0] - y
    return np.concatenate([[np.mean(r)], x.T @ r / len(r)])


def np_local_models(x, data, k, lr, workers=None):
    """float64 reference of one round: each worker (or those in ``workers``) takes ``k`` SGD steps from x."""
    workers = range(data.shape[0]) if workers is None else workers
    models = []
    for i in workers:
        y = x.copy()
        for _ in range(k):
            y = y - lr * np_grad(y, data[i])
        models.append(y)
    return models


def np_delayed_nesterov_arrival(x, m, buf, d, arrivals, outer_lr, mu, n_buf):
    """float64 server rule of delayed Nesterov for the ``arrivals``-th pseudo-gradient ``d`` (1-based):
    a plain step ``d / N`` per arrival, the momentum step every ``N`` arrivals. Returns ``x, m, buf``."""
    buf = buf + d
    if arrivals % n_buf == 0:
        m = mu * m + buf / n_buf
        return x - outer_lr * (mu * m + d / n_buf), m, np.zeros_like(buf)
    return x - outer_lr * d / n_buf, m, buf


def flat(params):
    """{"b", "w"} (optionally with a leading worker axis) -> [..., 1 + DIM] float64."""
    b = np.asarray(params["b"], np.float64)
    return np.concatenate([b[..., None], np.asarray(params["w"], np.float64)], axis=-1)


def run(tx, num_steps, data, params=None, *, record=False, **extra):
    """Runs ``num_steps`` full-batch steps on every worker (one jitted vmap of a scan).

    Returns final params and state (stacked over workers) and, with ``record``,
    the per-step params and states ([n, T, ...]).
    """
    params = init_params() if params is None else params
    n = data.shape[0]

    def worker(p, s, d, *extra_vals):
        kwargs = dict(zip(extra, extra_vals))

        def body(carry, _):
            p, s = carry
            u, s = tx.update(jax.grad(loss)(p, d), s, p, **kwargs)
            p = optax.apply_updates(p, u)
            return (p, s), (p, s) if record else None

        (p, s), trace = lax.scan(body, (p, s), None, length=num_steps)
        return p, s, trace

    p_w, s_w = optdist.replicate((params, tx.init(params)), n)
    return optdist.simulate(worker)(p_w, s_w, jnp.asarray(data, jnp.float32), *extra.values())
