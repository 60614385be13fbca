"""Benchmark: outer-loop overhead per inner step vs the bare inner optimizer.

Runs the same MLP training step (gradient + AdamW update) with and without
:func:`optdist.outer.outer_loop` around the optimizer, as one jitted
``lax.scan`` of ``steps`` inner steps, and prints time per inner step and the
ratio (outer / bare), measured side by side in one run:

* ``single``: one worker, ``axis_name=None``, plain ``jit``: the sync gate is a
  real conditional, so this is the gate's own overhead (anchor bookkeeping,
  outer step every ``H`` steps).
* ``simulate``: ``W`` workers under ``optdist.simulate`` (vmap): the gate's
  ``cond`` becomes a select, so the all-reduce and the outer step are
  computed on every step (see :mod:`optdist.outer.outer_loop`); the bare
  baseline here has no communication at all.

Usage::

  python -m experiments.benchmarks.outer_loop [--small] [--out results.json]

Timing: the least-disturbed of 3 calls after a warm-up (:mod:`.timing`, ``reduce="min"``). The
MLP, its loss and the scanned training step are shared with :mod:`.gossip`.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

import optdist
from experiments.benchmarks.report import Progress, Results, print_rows
from experiments.benchmarks.timing import machine, seconds_per_call


def mlp(sizes, key):
    """A tanh MLP's parameters ``{"w0", "b0", ...}`` for layer widths ``sizes``."""
    params = {}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        key, sub = jax.random.split(key)
        params[f"w{i}"] = jax.random.normal(sub, (a, b)) / np.sqrt(a)
        params[f"b{i}"] = jnp.zeros((b,))
    return params


def mlp_loss(params, batch):
    """Mean squared error of :func:`mlp` on ``batch = (x, y)``."""
    x, y = batch
    n = len(params) // 2
    for i in range(n):
        x = x @ params[f"w{i}"] + params[f"b{i}"]
        if i < n - 1:
            x = jnp.tanh(x)
    return jnp.mean((x - y) ** 2)


def scan_steps(tx, steps):
    """``run(params, state, batch)``: ``steps`` training steps of ``tx`` on one batch, one ``lax.scan``."""

    def run(params, state, batch):
        def body(carry, _):
            p, s = carry
            u, s = tx.update(jax.grad(mlp_loss)(p, batch), s, p)
            return (optax.apply_updates(p, u), s), None

        return lax.scan(body, (params, state), None, length=steps)[0]

    return run


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny model and few steps (smoke test)")
    parser.add_argument("--out", default=None, help="write the results as JSON here (after every row)")
    parser.add_argument("--workers", type=int, default=8)
    args = parser.parse_args(argv)

    sizes = (16, 32, 16) if args.small else (256, 512, 256)
    batch_size = 8 if args.small else 64
    steps = 20 if args.small else 100
    repeats = 3
    periods = (1, 10) if args.small else (1, 10, 100)
    key = jax.random.key(0)
    params = mlp(sizes, key)
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
    inner = optax.adamw(1e-3)
    info = machine()
    device = info["device"]
    config = {"sizes": list(sizes), "batch_size": batch_size, "steps": steps, "repeats": repeats}
    results = Results(args.out, "outer_loop", info, {**config, "workers": args.workers, "params": num_params})
    progress = Progress(2 * len(periods))

    for mode in ("single", "simulate"):
        w = 1 if mode == "single" else args.workers
        kx, ky = jax.random.split(jax.random.fold_in(key, w))
        batch = (
            jax.random.normal(kx, (w, batch_size, sizes[0])),
            jax.random.normal(ky, (w, batch_size, sizes[-1])),
        )
        axis = None if mode == "single" else "data"

        def build(tx, mode=mode, w=w, batch=batch):
            run = scan_steps(tx, steps)
            if mode == "single":
                return jax.jit(run), (params, tx.init(params), jax.tree_util.tree_map(lambda x: x[0], batch))
            return optdist.simulate(run, "data"), (*optdist.replicate((params, tx.init(params)), w), batch)

        bare_fn, bare_args = build(inner)
        for h in periods:
            fn, fargs = build(optdist.outer_loop(inner, optax.sgd(0.7, momentum=0.9, nesterov=True), h, axis))
            # Bare and outer timed back to back for each H, so drift affects both alike.
            bare = seconds_per_call(bare_fn, *bare_args, repeats=repeats, reduce="min") / steps
            t = seconds_per_call(fn, *fargs, repeats=repeats, reduce="min") / steps
            results.add(
                {
                    "mode": mode,
                    "workers": w,
                    "params": num_params,
                    "sync_every": h,
                    "bare_ms_per_step": 1e3 * bare,
                    "outer_ms_per_step": 1e3 * t,
                    "ratio": t / bare,
                    "device": device,
                    "backend": jax.default_backend(),
                }
            )
            progress.step(f"{mode} H={h}")

    columns = [
        ("mode", "mode", "<10"),
        ("W", "workers", ">4"),
        ("H", "sync_every", ">6"),
        ("bare ms", "bare_ms_per_step", ">10.3f"),
        ("outer ms", "outer_ms_per_step", ">10.3f"),
        ("ratio", "ratio", ">8.2f"),
    ]
    print_rows(
        f"outer_loop overhead per inner step (inner AdamW, {num_params} params, {device})",
        results.rows,
        columns,
    )
    return results.finish()


if __name__ == "__main__":
    main()
