"""Overhead of simulated workers: N workers under vmap vs one worker with an N-times batch.

Both sides compute the same total work (N x b examples per step, one
optimizer update of the same model) on the same device, side by side in one
run; the ratio is the cost of simulating N workers (per-worker optimizer
state and updates, the mean's collective lowered to a reduction).

  python -m experiments.benchmarks.simulate_overhead [--workers 1,8,64] [--batch 16] [--out results.json]

Two simulated forms side by side: today's stacked run (every leaf ``[W, ...]``) and the shared run of
:mod:`optdist.sharing` (parameters and Adam state held once; gradients still per worker).

Timing: the best of 3 samples, each the mean of ``--repeats`` back-to-back calls, after a warm-up
(:mod:`.timing`, ``number=repeats, reduce="min"``); the JSON is rewritten after every row.
"""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import jax
import optax

import optdist
from experiments import models
from experiments.benchmarks.report import Progress, Results, print_rows
from experiments.benchmarks.timing import describe, machine, seconds_per_call
from optdist import sharing
from optdist.execution import leaf_axes


def _time(fn, *args, repeats: int) -> float:
    return seconds_per_call(fn, *args, repeats=3, number=repeats, reduce="min")


def measure(model: str, workers: int, batch: int, steps: int, repeats: int) -> dict:
    cfg = SimpleNamespace(model=model, hidden=128, dim=64, heads=4, layers=2, seq_len=64)
    vocab = 128 if model == "transformer" else 10
    params, apply_fn = models.build(cfg, vocab, 0)
    key = jax.random.key(0)
    if model == "transformer":
        x = jax.random.randint(key, (workers * batch, 65), 0, vocab)
        data = (x[:, :-1], x[:, 1:])
    else:
        data = (
            jax.random.normal(key, (workers * batch, 64)),
            jax.random.randint(key, (workers * batch,), 0, 10),
        )

    def loss(p, batch):
        return models.cross_entropy(apply_fn(p, batch[0]), batch[1])

    def make_chunk(tx):
        def chunk(p, s, batch):
            def body(carry, _):
                p, s = carry
                u, s = tx.update(jax.grad(loss)(p, batch), s, p)
                return (optax.apply_updates(p, u), s), None

            return jax.lax.scan(body, (p, s), None, length=steps)[0]

        return chunk

    sim_tx = optax.chain(optdist.mean_gradients("data"), optax.adam(1e-3))
    chunk = make_chunk(sim_tx)
    sim_args = (
        *optdist.replicate((params, sim_tx.init(params)), workers),
        optdist.shard_batch(data, workers),
    )
    # The shared path: parameters and Adam state held once (optdist.sharing), gradients per worker.
    layout = sharing.shared_layout(chunk, *sim_args, axis_name="data", carry={0: 0, 1: 1})
    shared = optdist.simulate(chunk, "data", in_axes=layout.in_axes, out_axes=layout.out_axes)
    shared_args = (*sharing.compact(sim_args[:2], layout.in_axes[:2]), sim_args[2])
    one_tx = optax.adam(1e-3)
    one = jax.jit(make_chunk(one_tx))
    t_sim = _time(optdist.simulate(chunk, "data"), *sim_args, repeats=repeats) / steps
    t_shared = _time(shared, *shared_args, repeats=repeats) / steps
    t_one = _time(one, params, one_tx.init(params), data, repeats=repeats) / steps
    return {
        "model": model,
        "workers": workers,
        "batch_per_worker": batch,
        "simulated_step_ms": 1e3 * t_sim,
        "shared_step_ms": 1e3 * t_shared,
        "single_big_batch_step_ms": 1e3 * t_one,
        "ratio": t_sim / t_one,
        "shared_ratio": t_shared / t_one,
        "shared_leaves": sum(ax is None for ax in leaf_axes(layout.in_axes[:2], sim_args[:2])),
        "leaves": len(jax.tree_util.tree_leaves(sim_args[:2])),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="8", help="comma-separated worker counts, e.g. 1,2,4,8,16,32,64")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", default="mlp,transformer")
    parser.add_argument("--out", default=None, help="JSON output path (rewritten after every row)")
    args = parser.parse_args(argv)
    info = machine()
    results = Results(args.out, "simulate_overhead", info, vars(args))
    runs = [(m, int(w)) for m in args.models.split(",") for w in args.workers.split(",")]
    progress = Progress(len(runs))
    for name, workers in runs:
        results.add(measure(name, workers, args.batch, args.steps, args.repeats))
        progress.step(f"{name} W={workers}")
    columns = [
        ("model", "model", "<12"),
        ("workers", "workers", ">8"),
        ("sim ms/step", "simulated_step_ms", ">13.3f"),
        ("shared ms/step", "shared_step_ms", ">15.3f"),
        ("1x big ms/step", "single_big_batch_step_ms", ">16.3f"),
        ("ratio", "ratio", ">8.2f"),
        ("shared ratio", "shared_ratio", ">13.2f"),
    ]
    print_rows(f"device: {describe(info)}", results.rows, columns)
    return results.finish()


if __name__ == "__main__":
    main()
