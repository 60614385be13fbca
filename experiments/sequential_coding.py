r"""Simulated run time of gradient coding across rounds (issue 17): uncoded, GC, SR-SGC and M-SGC.

    python -m experiments.sequential_coding [--workers 32] [--jobs 200] [--quick]

Every scheme computes the same ``J`` gradients (jobs) on the same seeded per-worker clock, and the
master of :func:`optdist.stragglers.sequential.straggler_record` decides each round whom to wait for
(``(1 + mu)`` times the fastest worker, or everyone when the stragglers would exceed what the scheme
tolerates). Every sequential schedule is then run on that record and checked to decode every job by
its deadline, so a run time counts only schemes that delivered every gradient.

The clock (:func:`delay_profile`, fixed here, not fitted to any scheme): each worker is a two-state
Markov chain, slow with probability ``p_slow`` after a normal round and back to normal with
probability ``p_recover`` (bursts of mean length ``1 / p_recover``); computing a fraction ``f`` of a
job's data takes ``latency + f n c``, with ``c`` lognormal (``sigma``) around 1 in the normal state and
``slowdown`` times that when slow. A scheme's load ``f`` is its stated one (GC ``(s + 1)/n``, the
sequential codes' ``code.load``).

Each scheme's parameters (GC ``s``; SR-SGC / M-SGC ``(B, W, lambda)`` with delay ``T <= max_delay``;
``mu`` for all) are chosen on a training clock (seed 0) and evaluated on fresh clocks (seeds 1..),
the paper's protocol of picking each scheme's best parameters for the cluster.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math

import numpy as np

from optdist.stragglers import gradient_coding as gc
from optdist.stragglers import sequential as sq

MUS = (0.25, 0.5, 1.0)


def delay_profile(
    seed: int,
    rounds: int,
    n: int,
    p_slow: float = 0.02,
    p_recover: float = 0.5,
    slowdown: float = 5.0,
    sigma: float = 0.1,
) -> np.ndarray:
    """Compute times ``c`` ``[rounds, n]`` of ``1/n`` of a job's data: lognormal around 1, ``slowdown`` x
    in a worker's slow rounds (Markov bursts; the chain starts in its stationary distribution)."""
    rng = np.random.default_rng(seed)
    slow = np.zeros((rounds, n), bool)
    state = rng.random(n) < p_slow / (p_slow + p_recover)  # the chain's stationary share
    for r in range(rounds):
        slow[r] = state
        flip = rng.random(n)
        state = np.where(state, flip >= p_recover, flip < p_slow)
    return np.exp(sigma * rng.normal(size=(rounds, n))) * np.where(slow, slowdown, 1.0)


def round_times(load: float, compute: np.ndarray, latency: float) -> np.ndarray:
    """Seconds per worker and round for a scheme that computes ``load`` of a job's data per round."""
    return latency + load * compute.shape[1] * compute


def _scheme_load(code) -> float:
    return 1.0 / code if isinstance(code, int) else code.load


def runtime(code, compute: np.ndarray, jobs: int, mu: float, latency: float) -> float:
    """Total simulated seconds to deliver ``jobs`` gradients; ``code`` is ``n`` (uncoded: ``n`` workers,
    wait for all), a ``GradientCode`` or a ``SequentialCode``. Raises if a job fails to decode."""
    delay = code.delay if isinstance(code, sq.SequentialCode) else 0
    rounds = jobs + delay
    times = round_times(_scheme_load(code), compute[:rounds], latency)
    record, durations = sq.straggler_record(None if isinstance(code, int) else code, times, mu)
    if isinstance(code, sq.SequentialCode):
        decoded = sq.schedule(code, record).decoded_round
        if np.any(decoded < 0):
            raise RuntimeError(f"{code.scheme} {code[1:5]}: a job failed to decode")
    elif isinstance(code, gc.GradientCode) and record.sum(axis=1).max() > code.stragglers:
        raise RuntimeError("gradient coding: more stragglers than s in a round")
    return float(durations.sum())


def candidates(n: int, max_delay: int, quick: bool):
    """Every scheme's parameter grid: ``(scheme, params, code)``."""
    lams = sorted({1, 2, 3, 4, n // 8, n // 4, n // 2} - {0}) if quick else range(1, n)
    yield "uncoded", (), n
    for s in range(1, n // 2 + 1):
        yield "gc", (s,), gc.cyclic_code(n, s, tabulate=False)
    for w, b, lam in itertools.product(range(2, max_delay + 2), range(1, max_delay + 1), lams):
        if b < w and w - 2 + b <= max_delay:
            yield "msgc", (b, w, lam), sq.multiplexed_code(n, b, w, lam)
        if b < w and (w - 1) % b == 0 and b <= max_delay and math.ceil(b * lam / (w - 1 + b)) < n:
            yield "srsgc", (b, w, lam), sq.selective_repeat_code(n, b, w, lam)


def compare(
    n: int = 32,
    jobs: int = 200,
    seeds=(1, 2, 3, 4, 5),
    max_delay: int = 6,
    latency: float = 0.2,
    quick: bool = False,
    **clock,
) -> dict:
    """Best parameters per scheme on seed 0, then run time on each evaluation seed (``clock``: keyword
    arguments of :func:`delay_profile`)."""
    rounds = jobs + max_delay
    train = delay_profile(0, rounds, n, **clock)
    best: dict[str, tuple] = {}
    for scheme, params, code in candidates(n, max_delay, quick):
        for mu in MUS if scheme != "uncoded" else (0.0,):
            t = runtime(code, train, jobs, mu, latency)
            if scheme not in best or t < best[scheme][0]:
                best[scheme] = (t, params, mu, code)
    out = {
        "workers": n,
        "jobs": jobs,
        "seeds": list(seeds),
        "latency": latency,
        "clock": clock,
        "schemes": {},
    }
    for scheme, (t_train, params, mu, code) in best.items():
        times = [runtime(code, delay_profile(s, rounds, n, **clock), jobs, mu, latency) for s in seeds]
        out["schemes"][scheme] = {
            "params": list(params),
            "mu": mu,
            "load": _scheme_load(code),
            "train_time": t_train,
            "times": times,
            "mean_time": float(np.mean(times)),
        }
    gc_times = np.array(out["schemes"]["gc"]["times"])
    for row in out["schemes"].values():
        row["vs_gc"] = float(np.mean(np.array(row["times"]) / gc_times))
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=32)
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--quick", action="store_true", help="a coarser lambda grid")
    parser.add_argument("--latency", type=float, default=0.2, help="per-round seconds independent of load")
    parser.add_argument("--slowdown", type=float, default=5.0, help="compute-time factor of a slow round")
    parser.add_argument("--p-slow", type=float, default=0.02, help="P(normal -> slow) per round")
    parser.add_argument("--out", default=None, help="write the result as JSON here")
    args = parser.parse_args(argv)
    result = compare(
        args.workers,
        args.jobs,
        latency=args.latency,
        quick=args.quick,
        slowdown=args.slowdown,
        p_slow=args.p_slow,
    )
    print(
        f"{args.workers} workers, {args.jobs} jobs, latency {args.latency}, slowdown {args.slowdown}, "
        f"p_slow {args.p_slow}; parameters chosen on seed 0, "
        f"times on seeds {result['seeds']}"
    )
    print("| scheme | (B, W, lambda) or s | mu | load | mean time | time / GC |")
    print("| --- | --- | --- | --- | --- | --- |")
    for scheme, row in result["schemes"].items():
        print(
            f"| {scheme} | {tuple(row['params'])} | {row['mu']} | {row['load']:.4f} | "
            f"{row['mean_time']:.1f} | {row['vs_gc']:.3f} |"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
