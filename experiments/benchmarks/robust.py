"""Benchmark: robust aggregation time vs the plain mean on a gathered ``[n, d]`` matrix.

Usage::

  python -m optdist.robust.bench --out robust_bench.json          # n in {8, 32, 128}, d = 10M
  python -m optdist.robust.bench --small                          # seconds-long smoke run

Each rule is jitted once, warmed up, then timed ``--repeats`` times (median
wall time, ``block_until_ready``); the ratio is against ``mean`` measured in
the same run on the same device. ``f = n // 4`` Byzantine workers.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

from optdist.robust import aggregators as agg


def rules(n: int) -> dict[str, agg.Aggregator]:
    f = n // 4
    return {
        "mean": agg.mean(),
        "median": agg.median(),
        "trimmed_mean": agg.trimmed_mean(f),
        "krum": agg.krum(f),
        "multi_krum": agg.multi_krum(f, n - f),
        "geometric_median": agg.geometric_median(),
        "centered_clip(L=3)": agg.centered_clip(1.0, iters=3),
        "clipped_mean": agg.clipped_mean(1.0),
        "nnm+mean": agg.with_pre_aggregation(agg.mean(), agg.nnm(f)),
        "monna": agg.monna(f),
        "flag": agg.flag(),
    }


def _time(fn: Callable[[], jax.Array], repeats: int) -> float:
    jax.block_until_ready(fn())  # compile + warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _bench_workers(n: int, dim: int, repeats: int, only: list[str] | None) -> list[dict]:
    x = jax.jit(lambda k: jax.random.normal(k, (n, dim), jnp.float32))(jax.random.key(n))
    x = jax.block_until_ready(x)
    results, base = [], None
    for name, rule in rules(n).items():
        if only and name not in only and name != "mean":
            continue
        state = rule.init(dim)
        fn = jax.jit(lambda x, s, rule=rule: rule.aggregate(x, s)[0])
        seconds = _time(lambda fn=fn, state=state: fn(x, state), repeats)
        base = seconds if name == "mean" else base
        row = {"n": n, "dim": dim, "aggregator": name, "ms": 1e3 * seconds}
        row["ratio_vs_mean"] = seconds / base
        results.append(row)
        print(f"n={n:4d}  {name:20s} {row['ms']:10.2f} ms   x{row['ratio_vs_mean']:8.1f}", flush=True)
    return results


def run(workers: list[int], dim: int, repeats: int, only: list[str] | None) -> list[dict]:
    """Times every rule for each worker count; returns one row per (n, rule)."""
    return [row for n in workers for row in _bench_workers(n, dim, repeats, only)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--dim", type=int, default=10_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", nargs="*", default=None, help="aggregator names to time (mean always)")
    parser.add_argument("--small", action="store_true", help="smoke run: n in {8, 32}, d = 100k")
    parser.add_argument("--out", default=None, help="write results as JSON here")
    args = parser.parse_args(argv)
    if args.small:
        args.workers, args.dim, args.repeats = [8, 32], 100_000, 2
    device = jax.devices()[0]
    info = {
        "device": f"{device.platform}: {device.device_kind}",
        "host": platform.processor() or platform.machine(),
        "jax": jax.__version__,
        "dtype": "float32",
    }
    print(f"robust aggregation vs mean, d={args.dim}, {info['device']}, jax {info['jax']}")
    results = run(args.workers, args.dim, args.repeats, args.only)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"info": info, "results": results}, fh, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
