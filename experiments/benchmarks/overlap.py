"""Benchmark: does DiLoCo's overlapped sync (``overlap=True``) hide the sync behind compute?

One chunk of ``H`` training steps (inner AdamW on an MLP; the last step syncs) under
``optdist.data_parallel`` over every local device, timed three ways side by side in one run:

* ``bare``: the inner optimizer alone (no outer loop, no communication);
* ``plain``: ``optdist.diloco(..., overlap=False)``: the sync's all-reduce waits for the step's gradient;
* ``overlapped``: ``overlap=True``: the sync reads the parameters the step started from, so XLA may run
  its all-reduce while the forward/backward pass computes (async collectives on GPU / TPU).

``hidden`` = (plain - overlapped) / (plain - bare): the fraction of the sync's cost that the overlap
removed (1: fully hidden; 0: none, as on XLA:CPU, which runs collectives synchronously; None, printed
``-``, when the timed sync cost nothing: plain <= bare). Each row
also records whether, in the optimized HLO, any collective of the step depends on the gradient
(:func:`optdist.comm.dependence.compiled_collective_dependence`): the overlapped program must say no.

Usage (needs >= 2 devices; on one device it records why it did not run)::

  python -m experiments.benchmarks.overlap [--small] [--out overlap.json]
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m experiments.benchmarks.overlap --small

Timing: the least-disturbed of ``--repeats`` calls after a warm-up (:mod:`.timing`, ``reduce="min"``).
"""

from __future__ import annotations

import argparse

import jax
import numpy as np
import optax

import optdist
from experiments.benchmarks.outer_loop import mlp, mlp_loss, scan_steps
from experiments.benchmarks.report import Progress, Results, print_rows
from experiments.benchmarks.timing import machine, seconds_per_call
from optdist.comm.dependence import compiled_collective_dependence


def _gradient_dependence(tx, mesh, params, batch, workers) -> bool:
    """Whether any collective of one compiled step reads something computed from the gradient."""
    step = optdist.data_parallel(lambda g, s, p: tx.update(g, s, p), mesh, "data")
    grads = jax.grad(mlp_loss)(params, jax.tree_util.tree_map(lambda x: x[0], batch))
    args = optdist.replicate((grads, tx.init(params), params), workers)
    text = jax.jit(step, keep_unused=True).lower(*args).compile().as_text()
    found = compiled_collective_dependence(text, range(len(jax.tree_util.tree_leaves(grads))))
    return any(depends for _, _, depends in found)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny model (smoke test)")
    parser.add_argument("--out", default=None, help="write the results as JSON here (after every row)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sync-every", type=int, nargs="+", default=None, help="H values")
    args = parser.parse_args(argv)

    sizes = (16, 64, 16) if args.small else (1024, 4096, 4096, 1024)
    batch_size = 8 if args.small else 256
    periods = args.sync_every or ([2] if args.small else [1, 4])
    devices = jax.devices()
    w = len(devices)
    info = machine()
    key = jax.random.key(0)
    params = mlp(sizes, key)
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
    config = {"sizes": list(sizes), "batch_size": batch_size, "workers": w, "params": num_params}
    results = Results(args.out, "overlap", info, config)
    if w < 2:
        results.add({"skipped": f"one device ({devices[0]}): a sync needs at least two to overlap anything"})
        print(f"overlap: skipped, only one device ({devices[0]})")
        return results.finish()
    mesh = jax.make_mesh((w,), ("data",), devices=devices)
    kx, ky = jax.random.split(key)
    batch = (
        jax.random.normal(kx, (w, batch_size, sizes[0])),
        jax.random.normal(ky, (w, batch_size, sizes[-1])),
    )
    inner = optax.adamw(1e-3)
    progress = Progress(len(periods))

    def timed(tx, h):
        run = optdist.data_parallel(scan_steps(tx, h), mesh, "data")
        state = optdist.replicate((params, tx.init(params)), w)
        return seconds_per_call(run, *state, batch, repeats=args.repeats, reduce="min")

    for h in periods:
        outer = {
            overlap: optdist.diloco(
                inner_lr=1e-3, outer_lr=0.7, sync_every=h, axis_name="data", overlap=overlap
            )
            for overlap in (False, True)
        }
        bare, plain, overlapped = timed(inner, h), timed(outer[False], h), timed(outer[True], h)
        results.add(
            {
                "sync_every": h,
                "bare_ms": 1e3 * bare,
                "plain_ms": 1e3 * plain,
                "overlapped_ms": 1e3 * overlapped,
                "hidden": (plain - overlapped) / (plain - bare) if plain > bare else None,  # undefined
                "plain_depends_on_gradient": _gradient_dependence(outer[False], mesh, params, batch, w),
                "overlapped_depends_on_gradient": _gradient_dependence(outer[True], mesh, params, batch, w),
                "device": info["device"],
                "backend": jax.default_backend(),
            }
        )
        progress.step(f"H={h}")

    columns = [
        ("H", "sync_every", ">4"),
        ("bare ms", "bare_ms", ">10.3f"),
        ("plain ms", "plain_ms", ">10.3f"),
        ("overlap ms", "overlapped_ms", ">11.3f"),
        ("hidden", "hidden", ">8.2f"),
        ("plain dep", "plain_depends_on_gradient", ">10"),
        ("overlap dep", "overlapped_depends_on_gradient", ">12"),
    ]
    title = f"DiLoCo sync overlap: {w} devices, {num_params} params, chunk of H steps ({info['device']})"
    print_rows(title, results.rows, columns)
    return results.finish()


if __name__ == "__main__":
    main()
