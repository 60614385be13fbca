"""Min-max methods on a distributed bilinear game: distance to the saddle and restricted ergodic gap
against operator calls and bytes sent per worker.

  python -m experiments.games [--config=experiments/configs/bilinear_game.py] [--workdir=runs/bilinear_game]

Every method runs on ``num_workers`` simulated workers (``optdist.simulate``), each with its own game
f_m; the byte counts are the library's (``optdist.bytes_sent``). Prints one line per method (final
distance, ergodic gap, bytes to ``epsilon``) and writes ``metrics.json`` and ``plot.png`` to the workdir.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from absl import app, flags, logging
from ml_collections import config_flags

import optdist
from optdist import compressors, minmax

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def make_game(config):
    """(A, b, c) of the mean game and the stacked per-worker (A_m, b_m, c_m), float64."""
    rng = np.random.default_rng(config.seed)
    d, n = config.dim, config.num_workers
    u, _ = np.linalg.qr(rng.normal(size=(d, d)))
    v, _ = np.linalg.qr(rng.normal(size=(d, d)))
    a = u @ np.diag(np.linspace(0.5, 1.5, d)) @ v.T
    b, c = rng.normal(size=d), rng.normal(size=d)
    s = config.spread / np.sqrt(d)
    noise = [s * rng.normal(size=shape) for shape in ((n, d, d), (n, d), (n, d))]
    noise = [x - x.mean(0) for x in noise]
    return (a, b, c), (a + noise[0], b + noise[1], c + noise[2])


def saddle(game, reg):
    a, b, c = game
    d = a.shape[0]
    mat = np.block([[reg * np.eye(d), a], [-a.T, reg * np.eye(d)]])
    z = np.linalg.solve(mat, -np.concatenate([b, -c]))
    return z[:d], z[d:]


def restricted_gap(x, y, game, reg, radius=1.0):
    """max_{|y' - y*| <= R} f(x, y') - min_{|x' - x*| <= R} f(x', y) of the mean game (reg = 0)."""
    a, b, c = game
    xs, ys = saddle(game, reg)
    gy, gx = a.T @ x + c, a @ y + b
    return (b @ x + gy @ ys + radius * np.linalg.norm(gy)) - (c @ y + gx @ xs - radius * np.linalg.norm(gx))


def method(name, config):
    """(transform, evaluations per step, needs operator_fn)."""
    ax, lr = "data", config.learning_rate
    tau = 1.0 - config.ratio
    if name == "gda":
        return optax.chain(optdist.mean_gradients(ax), optax.sgd(lr)), 1, False
    if name == "extragradient":
        return minmax.extragradient(config.extragradient_lr, ax), 2, True
    if name in ("past_extragradient", "optimistic_gradient", "reflected_gradient"):
        return getattr(minmax, name)(lr, ax), 1, False
    if name in ("masha1", "masha1_independent"):  # rand-k drawn once for all workers, or per worker
        rand_k = compressors.rand_k(config.ratio, shared=name == "masha1")
        return minmax.masha1(config.masha_lr, rand_k, ax, tau=tau), 1, False
    if name in ("masha1_int8", "masha2_int8"):
        # int8 codes on a shared scale, all-reduced (a quarter of the float32 all-reduce's bytes):
        # stochastic rounding (unbiased) for MASHA1, nearest (biased, with MASHA2's error feedback).
        masha, rounding = (
            (minmax.masha1, "stochastic") if name == "masha1_int8" else (minmax.masha2, "nearest")
        )
        int8 = compressors.quantize(8, rounding=rounding, exchange="summed")
        return masha(config.masha_int8_lr, int8, ax, tau=config.masha_int8_tau), 1, False
    if name == "masha2":
        return minmax.masha2(config.masha_lr, compressors.top_k(config.ratio), ax, tau=tau), 1, False
    if name == "local_gda":
        return minmax.local_gda(lr, config.local_gda_h, ax), 1, False
    raise ValueError(f"unknown method {name!r}; choose from {config.methods}.")


def run_method(name, config, batch, reg):
    tx, per_step, needs_fn = method(name, config)
    d = config.dim
    z0 = (jnp.zeros(d), jnp.zeros(d))

    def operator(params, batch):
        a, b, c = batch
        x, y = params
        return (a @ y + b + reg * x, -(a.T @ x + c) + reg * y)

    def chunk(params, state, batch):
        def body(carry, _):
            p, s = carry
            op = lambda q: operator(q, batch)  # noqa: E731
            extra = dict(operator_fn=op) if needs_fn else {}
            updates, s = tx.update(op(p), s, p, **extra)
            p = optax.apply_updates(p, updates)
            return (p, s), (p, s)

        return jax.lax.scan(body, (params, state), None, length=config.calls // per_step)[1]

    params_w, state_w = optdist.replicate((z0, tx.init(z0)), config.num_workers)
    start = time.perf_counter()
    path, states = optdist.simulate(chunk, "data")(params_w, state_w, batch)
    jax.block_until_ready(path)
    seconds = time.perf_counter() - start
    x, y = (np.asarray(p[0], np.float64) for p in path)  # worker 0 (gossip-free: all agree at syncs)
    nbytes = np.asarray(optdist.bytes_sent(states), np.float64)
    nbytes = nbytes[0] if nbytes.ndim == 2 else nbytes  # [workers, steps] -> worker 0
    calls = per_step * np.arange(1, len(x) + 1)
    return x, y, nbytes, calls, seconds


def run(config, workdir):
    os.makedirs(workdir, exist_ok=True)
    reg = float(config.reg)
    game, workers = make_game(config)
    batch = tuple(jnp.asarray(v, jnp.float32) for v in workers)
    xs, ys = saddle(game, reg)
    scale = np.sqrt(np.sum(xs**2) + np.sum(ys**2))
    results = {}
    for name in config.methods.split(","):
        x, y, nbytes, calls, seconds = run_method(name, config, batch, reg)
        dist = np.sqrt(np.sum((x - xs) ** 2, 1) + np.sum((y - ys) ** 2, 1)) / scale
        keep = slice(config.log_every - 1, None, config.log_every)
        entry = dict(
            calls=calls[keep].tolist(),
            bytes_per_worker=nbytes[keep].tolist(),
            distance=[float(v) if np.isfinite(v) else None for v in dist[keep]],
            seconds=seconds,
        )
        if reg == 0.0:  # ergodic average of the evaluated iterates
            ex, ey = np.cumsum(x, 0) / np.arange(1, len(x) + 1)[:, None], None
            ey = np.cumsum(y, 0) / np.arange(1, len(y) + 1)[:, None]
            gaps = [
                restricted_gap(ex[i], ey[i], game, reg) for i in range(keep.start, len(x), config.log_every)
            ]
            entry["ergodic_gap"] = [float(g) if np.isfinite(g) else None for g in gaps]
        hit = np.nonzero(dist <= config.epsilon)[0]
        entry["bytes_to_epsilon"] = float(nbytes[hit[0]]) if len(hit) else None
        entry["calls_to_epsilon"] = int(calls[hit[0]]) if len(hit) else None
        results[name] = entry
        logging.info(
            "%-20s distance %.2e  gap %s  bytes to eps %s  (%.1f s)",
            name,
            dist[-1],
            f"{entry['ergodic_gap'][-1]:.2e}"
            if entry.get("ergodic_gap") and entry["ergodic_gap"][-1]
            else "-",
            entry["bytes_to_epsilon"],
            seconds,
        )
        print(
            f"{name:20s} final distance {dist[-1]:.2e}  bytes to {config.epsilon:g}: "
            f"{entry['bytes_to_epsilon']}  calls: {entry['calls_to_epsilon']}",
            flush=True,
        )
    out = dict(config=config.to_dict(), results=results)
    with open(os.path.join(workdir, "metrics.json"), "w") as f:
        json.dump(out, f, indent=1)
    fig, axes = plt.subplots(1, 3 if reg == 0.0 else 2, figsize=(15 if reg == 0.0 else 10, 4))
    for name, r in results.items():
        dist = np.array([np.nan if v is None else v for v in r["distance"]])
        axes[0].semilogy(r["calls"], dist, label=name)
        axes[1].semilogy(r["bytes_per_worker"], dist, label=name)
        if "ergodic_gap" in r:
            gaps = np.array([np.nan if v is None else v for v in r["ergodic_gap"]])
            axes[2].loglog(r["calls"], gaps, label=name)
    axes[0].set(xlabel="operator calls per worker", ylabel="|z - z*| / |z*|", ylim=(1e-8, 1e3))
    axes[1].set(xlabel="bytes sent per worker", ylabel="|z - z*| / |z*|", ylim=(1e-8, 1e3))
    if reg == 0.0:
        axes[2].set(
            xlabel="operator calls per worker",
            ylabel="restricted gap of the ergodic average",
            ylim=(1e-4, 1e3),
        )
    axes[0].legend(fontsize=7)
    fig.suptitle(f"bilinear game, dim {config.dim} per player, {config.num_workers} workers")
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "plot.png"), dpi=110)
    plt.close(fig)
    return out


def main(argv):
    del argv
    f = flags.FLAGS
    path = config_flags.get_config_filename(f["config"]).split(":")[0]
    run(f.config, f.workdir or os.path.join("runs", os.path.splitext(os.path.basename(path))[0]))


if __name__ == "__main__":
    config_flags.DEFINE_config_file(
        "config", os.path.join(os.path.dirname(__file__), "configs", "bilinear_game.py"), "Game config."
    )
    flags.DEFINE_string("workdir", None, "Output folder (default: runs/<config name>).")
    app.run(main)
