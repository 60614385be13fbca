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

  python -m optdist.outer.bench [--small] [--out results.json]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

import optdist
from optdist._report import print_rows, write_json
from optdist.outer.outer_loop import outer_loop


def _mlp(sizes, key):
    params = {}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        key, sub = jax.random.split(key)
        params[f"w{i}"] = jax.random.normal(sub, (a, b)) / np.sqrt(a)
        params[f"b{i}"] = jnp.zeros((b,))
    return params


def _loss(params, batch):
    x, y = batch
    n = len(params) // 2
    for i in range(n):
        x = x @ params[f"w{i}"] + params[f"b{i}"]
        if i < n - 1:
            x = jnp.tanh(x)
    return jnp.mean((x - y) ** 2)


def _scan_steps(tx, steps):
    def run(params, state, batch):
        def body(carry, _):
            p, s = carry
            u, s = tx.update(jax.grad(_loss)(p, batch), s, p)
            return (optax.apply_updates(p, u), s), None

        return lax.scan(body, (params, state), None, length=steps)[0]

    return run


def _time(fn, args, repeats):
    out = fn(*args)
    jax.block_until_ready(out)  # compile + warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.min(times))  # least-disturbed run


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny model and few steps (smoke test)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--workers", type=int, default=8)
    args = parser.parse_args(argv)

    sizes = (16, 32, 16) if args.small else (256, 512, 256)
    batch_size = 8 if args.small else 64
    steps = 20 if args.small else 100
    repeats = 3
    periods = (1, 10) if args.small else (1, 10, 100)
    key = jax.random.key(0)
    params = _mlp(sizes, key)
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
    inner = optax.adamw(1e-3)
    device = jax.devices()[0].device_kind
    rows = []

    for mode in ("single", "simulate"):
        w = 1 if mode == "single" else args.workers
        kx, ky = jax.random.split(jax.random.fold_in(key, w))
        batch = (
            jax.random.normal(kx, (w, batch_size, sizes[0])),
            jax.random.normal(ky, (w, batch_size, sizes[-1])),
        )
        axis = None if mode == "single" else "data"

        def build(tx, mode=mode, w=w, batch=batch):
            run = _scan_steps(tx, steps)
            if mode == "single":
                return jax.jit(run), (params, tx.init(params), jax.tree_util.tree_map(lambda x: x[0], batch))
            return optdist.simulate(run, "data"), (*optdist.replicate((params, tx.init(params)), w), batch)

        bare_fn, bare_args = build(inner)
        for h in periods:
            fn, fargs = build(outer_loop(inner, optax.sgd(0.7, momentum=0.9, nesterov=True), h, axis))
            # Bare and outer timed back to back for each H, so drift affects both alike.
            bare = _time(bare_fn, bare_args, repeats) / steps
            t = _time(fn, fargs, repeats) / steps
            rows.append(
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

    columns = [
        ("mode", "mode", "<10"),
        ("W", "workers", ">4"),
        ("H", "sync_every", ">6"),
        ("bare ms", "bare_ms_per_step", ">10.3f"),
        ("outer ms", "outer_ms_per_step", ">10.3f"),
        ("ratio", "ratio", ">8.2f"),
    ]
    print_rows(
        f"outer_loop overhead per inner step (inner AdamW, {num_params} params, {device})", rows, columns
    )
    write_json(rows, args.out)
    return rows


if __name__ == "__main__":
    main()
