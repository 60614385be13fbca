"""Benchmark: robust aggregation time vs the plain mean on a gathered ``[n, d]`` matrix.

Usage::

  python -m experiments.benchmarks.robust --out robust_bench.json    # n in {8, 32, 128}, d = 10M
  python -m experiments.benchmarks.robust --small                    # seconds-long smoke run

Each rule is jitted once, warmed up, then timed ``--repeats`` times (median
wall time, ``block_until_ready``, :mod:`.timing`); the ratio is against ``mean`` measured in
the same run on the same device. ``f = n // 4`` Byzantine workers. The JSON is rewritten after
every row.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from experiments.benchmarks.report import Progress, Results
from experiments.benchmarks.timing import describe, machine, seconds_per_call
from optdist.robust import aggregators as agg


def rules(n: int) -> dict[str, Callable[[], Any]]:
    """Name -> factory of the robust rules timed (``f = n // 4``); ``mean`` is the baseline."""
    f = n // 4
    return {
        "mean": agg.mean,
        "median": agg.median,
        "trimmed_mean": lambda: agg.trimmed_mean(f),
        "krum": lambda: agg.krum(f),
        "multi_krum": lambda: agg.multi_krum(f, n - f),
        "geometric_median": agg.geometric_median,
        "centered_clip(L=3)": lambda: agg.centered_clip(1.0, iters=3),
        "clipped_mean": lambda: agg.clipped_mean(1.0),
        "nnm+mean": lambda: agg.with_pre_aggregation(agg.mean(), agg.nnm(f)),
        "monna": lambda: agg.monna(f),
        "flag": agg.flag,
    }


def _chosen(n: int, only: list[str] | None) -> list[tuple[str, Callable[[], Any]]]:
    return [(k, v) for k, v in rules(n).items() if not only or k in only or k == "mean"]


def _bench_workers(n: int, dim: int, repeats: int, only, results: Results, progress: Progress) -> None:
    x = jax.jit(lambda k: jax.random.normal(k, (n, dim), jnp.float32))(jax.random.key(n))
    x = jax.block_until_ready(x)
    base = None
    for name, make in _chosen(n, only):
        rule = make()
        state = rule.init(dim)
        fn = jax.jit(lambda x, s, rule=rule: rule.aggregate(x, s)[0])
        seconds = seconds_per_call(fn, x, state, repeats=repeats)
        base = seconds if name == "mean" else base
        row = results.add(
            {"n": n, "dim": dim, "aggregator": name, "ms": 1e3 * seconds, "ratio_vs_mean": seconds / base}
        )
        print(f"n={n:4d}  {name:20s} {row['ms']:10.2f} ms   x{row['ratio_vs_mean']:8.1f}", flush=True)
        progress.step(f"n={n} {name}")


def run(workers: list[int], dim: int, repeats: int, only: list[str] | None, out: str | None = None) -> dict:
    """Times every rule for each worker count: one row per (n, rule); returns the results payload."""
    info = machine()
    config = {"workers": workers, "dim": dim, "repeats": repeats, "dtype": "float32"}
    results = Results(out, "robust", info, config)
    print(f"robust aggregation vs mean, d={dim}, {describe(info)}")
    progress = Progress(sum(len(_chosen(n, only)) for n in workers))
    for n in workers:
        _bench_workers(n, dim, repeats, only, results, progress)
    return results.finish()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--dim", type=int, default=10_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", nargs="*", default=None, help="aggregator names to time (mean always)")
    parser.add_argument("--small", action="store_true", help="smoke run: n in {8, 32}, d = 100k")
    parser.add_argument("--out", default=None, help="write results as JSON here (after every row)")
    args = parser.parse_args(argv)
    if args.small:
        args.workers, args.dim, args.repeats = [8, 32], 100_000, 2
    return run(args.workers, args.dim, args.repeats, args.only, args.out)


if __name__ == "__main__":
    main()
