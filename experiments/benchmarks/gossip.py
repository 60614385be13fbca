"""Benchmark: a gossip step vs the all-reduce step on the same model, side by side in one run.

Every row runs the same MLP training step (gradient + SGD) for ``W`` workers as one jitted
``lax.scan`` of ``steps`` steps; only the communication differs:

* ``exact_mean``: ``mean_gradients`` (one ring all-reduce), the baseline of every ratio;
* ``dsgd_ring`` / ``dsgd_exponential`` / ``dsgd_one_peer_exp``: gossip of the parameters (2 /
  ``⌈log₂ W⌉`` / 1 ppermutes per step);
* ``choco_topk10`` / ``choco_threshold_topk10``: CHOCO-SGD on the ring, top-10% compressed changes
  (``lax.top_k``, or the sort-free threshold top-k);
* ``gradient_tracking``: DIGing on the ring (tracker and parameters gossiped: 4 ppermutes).

Modes: ``simulate`` (``W`` workers under ``vmap`` on one device) and, when there are ``W`` devices,
``data_parallel`` (``shard_map``, real ``ppermute``/all-reduce between devices; on CPU run with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``). Bytes are per worker per step, exact.

Usage::

  python -m experiments.benchmarks.gossip [--small] [--out results.json]

Timing: the least-disturbed of the repeats after a warm-up (:mod:`.timing`, ``reduce="min"``); the
JSON is rewritten after every row.
"""

from __future__ import annotations

import argparse

import jax
import numpy as np
import optax

import optdist
from experiments.benchmarks.outer_loop import mlp, scan_steps
from experiments.benchmarks.report import Progress, Results, print_rows
from experiments.benchmarks.timing import machine, seconds_per_call


def methods(axis: str) -> dict[str, optax.GradientTransformation]:
    sgd = optax.sgd(0.05)
    return {
        "exact_mean": optax.chain(optdist.mean_gradients(axis), sgd),
        "dsgd_ring": optax.chain(sgd, optdist.gossip("ring", axis)),
        "dsgd_exponential": optax.chain(sgd, optdist.gossip("exponential", axis)),
        "dsgd_one_peer_exp": optax.chain(sgd, optdist.gossip("one_peer_exponential", axis)),
        "choco_topk10": optax.chain(
            sgd, optdist.gossip("ring", axis, optdist.compressors.top_k(0.1), consensus_step_size=0.3)
        ),
        "choco_threshold_topk10": optax.chain(
            sgd,
            optdist.gossip("ring", axis, optdist.compressors.threshold_top_k(0.1), consensus_step_size=0.3),
        ),
        "gradient_tracking": optax.chain(
            optdist.gradient_tracking("ring", axis),
            sgd,
            optdist.gossip("ring", axis, order="combine_then_adapt"),
        ),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny model and few steps (smoke test)")
    parser.add_argument("--out", default=None, help="write the results as JSON here (after every row)")
    parser.add_argument("--workers", type=int, default=8)
    args = parser.parse_args(argv)

    sizes = (16, 32, 16) if args.small else (256, 1024, 256)
    batch_size, steps, repeats = (8, 5, 2) if args.small else (32, 20, 3)
    w = args.workers
    key = jax.random.key(0)
    params = mlp(sizes, key)
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
    kx, ky = jax.random.split(key)
    batch = (
        jax.random.normal(kx, (w, batch_size, sizes[0])),
        jax.random.normal(ky, (w, batch_size, sizes[-1])),
    )
    modes = ["simulate"] + (
        ["data_parallel"] if jax.device_count() >= w and jax.device_count() % w == 0 else []
    )
    info = machine()
    device = info["device"]
    config = {"sizes": list(sizes), "batch_size": batch_size, "steps": steps, "repeats": repeats}
    config.update(workers=w, params=num_params, modes=modes)
    results = Results(args.out, "gossip", info, config)
    progress = Progress(len(modes) * (1 + len(methods("data"))))
    for mode in modes:
        base_ms = None
        for name, tx in [("warm_up", methods("data")["exact_mean"]), *methods("data").items()]:
            run = scan_steps(tx, steps)
            if mode == "simulate":
                fn = optdist.simulate(run, "data")
            else:
                fn = optdist.data_parallel(run, jax.make_mesh((w,), ("data",)), "data")
            init = (*optdist.replicate((params, tx.init(params)), w), batch)
            ms = 1e3 * seconds_per_call(fn, *init, repeats=repeats, reduce="min") / steps
            _, state = fn(*init)
            progress.step(f"{mode} {name}")
            if name == "warm_up":  # the first timed step of a run is slower (caches, clocks): discard it
                continue
            base_ms = ms if base_ms is None else base_ms
            results.add(
                {
                    "mode": mode,
                    "method": name,
                    "workers": w,
                    "params": num_params,
                    "ms_per_step": ms,
                    "ratio_to_exact_mean": ms / base_ms,
                    "bytes_per_step": int(optdist.bytes_sent(state)[0]) // steps,
                    "device": device,
                    "backend": jax.default_backend(),
                }
            )

    columns = [
        ("mode", "mode", "<15"),
        ("method", "method", "<24"),
        ("ms/step", "ms_per_step", ">10.3f"),
        ("ratio", "ratio_to_exact_mean", ">8.2f"),
        ("bytes/step", "bytes_per_step", ">12d"),
    ]
    title = f"gossip step time vs all-reduce ({w} workers, SGD on a {num_params}-parameter MLP, {device})"
    print_rows(title, results.rows, columns)
    return results.finish()


if __name__ == "__main__":
    main()
