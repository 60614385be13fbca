"""Games and float64 NumPy references for the min-max tests (written from the papers' equations)."""

import jax.numpy as jnp
import numpy as np


def bilinear_game(dim=3, workers=4, seed=0, spread=0.5):
    """Worker m's game f_m(x, y) = x^T A_m y + b_m^T x + c_m^T y; the mean of (A_m, b_m, c_m) is (A, b, c).

    A is well conditioned (singular values in [0.5, 1.5]), so the saddle z* = (-A^-T c, -A^-1 b) is
    unique. Returns (A, b, c) and the stacked per-worker arrays [workers, ...] (float64).
    """
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    v, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    a = u @ np.diag(np.linspace(0.5, 1.5, dim)) @ v.T
    b, c = rng.normal(size=dim), rng.normal(size=dim)
    noise = [spread * rng.normal(size=s) for s in ((workers, dim, dim), (workers, dim), (workers, dim))]
    noise = [n - n.mean(0) for n in noise]
    return (a, b, c), (a + noise[0], b + noise[1], c + noise[2])


def saddle(a, b, c):
    return -np.linalg.solve(a.T, c), -np.linalg.solve(a, b)


def operator(z, a, b, c):
    """F(x, y) = (grad_x f, -grad_y f) = (A y + b, -(A^T x + c))."""
    x, y = z
    return (a @ y + b, -(a.T @ x + c))


def jax_operator(params, batch):
    """This worker's F_m; batch = (A_m, b_m, c_m)."""
    a, b, c = batch
    x, y = params
    return (a @ y + b, -(a.T @ x + c))


def gap(z, a, b, c, radius=1.0):
    """Restricted gap max_{|y - y*| <= R} f(x, y) - min_{|x - x*| <= R} f(x, y) (closed form)."""
    x, y = z
    xs, ys = saddle(a, b, c)
    gy = a.T @ x + c  # f(x, .) is linear in y with this slope
    gx = a @ y + b
    upper = b @ x + gy @ ys + radius * np.linalg.norm(gy)
    lower = c @ y + gx @ xs - radius * np.linalg.norm(gx)
    return upper - lower


# ---- float64 references: one function per rule, the iterates where the operator is evaluated ----


def _rate(lr, t):
    return lr(t) if callable(lr) else lr


def _proj(p, z):
    return z if p is None else tuple(p(v) for v in z)


def _sub(z, r, v):
    return tuple(zi - r * vi for zi, vi in zip(z, v))


def reference_gda(z0, op, lr, steps):
    z, out = z0, []
    for t in range(steps):
        z = _sub(z, _rate(lr, t), op(z))
        out.append(z)
    return out


def reference_extragradient(z0, op, lr, steps, proj=None):
    """X_{t+1/2} = P(X_t - g V(X_t)); X_{t+1} = P(X_t - g V(X_{t+1/2})). Returns (X_{t+1}, X_{t+1/2})."""
    z, out = z0, []
    for t in range(steps):
        g = _rate(lr, t)
        half = _proj(proj, _sub(z, g, op(z)))
        z = _proj(proj, _sub(z, g, op(half)))
        out.append((z, half))
    return out


def reference_single_call(kind, z0, op, lr, steps, proj=None):
    """The half iterates X_{t+1/2} of past EG / optimistic / reflected gradient (Hsieh et al. 2019, S. 3)."""
    x = z0  # X_t
    x_prev = z0  # X_{t-1}
    v_prev = tuple(np.zeros_like(v) for v in z0)  # V_{t-1/2}
    halves = []
    for t in range(steps):
        g = _rate(lr, t)
        if kind == "past_extragradient":
            half = _proj(proj, _sub(x, g, v_prev))
            v = op(half)
            x_new = _proj(proj, _sub(x, g, v))
        elif kind == "reflected_gradient":
            half = tuple(2 * a - b for a, b in zip(x, x_prev))
            v = op(half)
            x_new = _proj(proj, _sub(x, g, v))
        else:  # optimistic gradient
            half = _proj(proj, _sub(x, g, v_prev))
            v = op(half)
            x_new = tuple(h + g * p - g * c for h, p, c in zip(half, v_prev, v))
        halves.append(half)
        x_prev, x, v_prev = x, x_new, v
    return halves


def reference_masha(z0, ops, lr, tau, bits, messages):
    """MASHA's iterates, one entry per operator call (the point of the next call).

    ``ops``: the workers' operators; ``bits``: b_k per iteration; ``messages(k, deltas) -> the decoded
    mean of the workers' messages`` (the compressor and the feedback, given Delta_m = g (F_m(z^{k+1/2})
    - F_m(w^k))). Returns the list of evaluation points, starting with the second call.
    """
    m = len(ops)
    mean = lambda vs: tuple(sum(v[i] for v in vs) / m for i in range(len(z0)))  # noqa: E731
    z = w = z0
    local_w = [op(w) for op in ops]
    f_w = mean(local_w)
    points = []

    def bar(z, w):
        return tuple(tau * a + (1 - tau) * b for a, b in zip(z, w))

    half = _sub(bar(z, w), lr, f_w)
    points.append(half)
    for k, b in enumerate(bits):
        deltas = [tuple(lr * (fh - fw) for fh, fw in zip(op(half), lw)) for op, lw in zip(ops, local_w)]
        q = messages(k, deltas)
        z = tuple(h - qi for h, qi in zip(half, q))
        if b:
            w = z
            points.append(w)  # the refresh call
            local_w = [op(w) for op in ops]
            f_w = mean(local_w)
        half = _sub(bar(z, w), lr, f_w)
        points.append(half)
    return points


def stacked(batch):
    return tuple(jnp.asarray(x, jnp.float32) for x in batch)
