"""Memory traffic of one compressed-mean step on the XLA path, against its algorithmic floor.

For every compressor in ``optdist.compressors`` and each feedback variant (None / EF, plus EF21 and
EControl for the classic biased compressors; PowerSGD with EF), this compiles one step exactly as a
user chains it::

  tx = optdist.compressed_mean(compressor, "data", feedback=feedback)
  step = optdist.simulate(lambda g, s: tx.update(g, s, params), "data")   # W simulated workers

on a ResNet-50-shaped gradient tree (Flax HWIO conv kernels, BN scales and biases). The default is
the stem, the first stage's first bottleneck block and a 100-class head (17 leaves, 0.11M
parameters): compile time grows with the number of leaves, and this keeps the whole grid near two
minutes on two CPU cores. ``--blocks 1,1,1,1`` / ``--width-divisor`` / ``--num-classes`` scale it
up; ``--full`` is the issue's 25.6M-parameter, 161-leaf tree. It reports per step, for all ``W``
simulated workers together:

* ``xla_bytes``: XLA's own ``compiled.cost_analysis()["bytes accessed"]`` (counts a loop body once);
* ``hlo_bytes``: bytes accessed counted from the optimized HLO (``compiled.as_text()``) with every
  ``while`` loop's trip count applied (:mod:`experiments.benchmarks.hlo_cost`);
* ``floor_bytes``: the algorithmic floor of one fused pass (:data:`FLOOR_FORMULA`)::

      floor = W*G            read every worker's gradient
            + 2*dS           read and write the method's extra state once (EF residual e_i, EF21 h_i
                             and h, PowerSGD's Q, DeMo's momentum): dS = its state bytes minus the
                             exact mean's
            + 2*W*P          write each worker's payload, read it back for the mean
            + W*G            write each worker's estimate (the mean's own output)

  with ``G`` the gradient bytes per worker and ``P`` the bytes one worker sends, read from the byte
  counter (at ``W = 2`` a ring all-reduce and an all-gather both send exactly one payload, so ``P``
  is the payload size); for the exact mean the gradient is the payload (``P = 0``, floor ``2*W*G``);
* ``hlo_ratio`` = hlo_bytes / floor (and ``xla_ratio``), and ``time_ratio``: the step's median time
  over the exact mean's, measured in the same run (the exact mean is timed again after every row; a
  row's baseline is the mean of the exact timings just before and after it, all of them in the JSON).

Bytes accessed are deterministic for a given jax / XLA version and backend; times on a shared CPU are
not. Nothing here changes a compressor: the figures measure the library as it is.

  python -m experiments.benchmarks.compression_cost --out cost.json          # ~2 min on 2 CPU cores
  python -m experiments.benchmarks.compression_cost --small                  # seconds (smoke)
  python -m experiments.benchmarks.compression_cost --full --out cost.json   # the 25.6M tree
  XLA_FLAGS=--xla_force_host_platform_device_count=2 \
    python -m experiments.benchmarks.compression_cost --execution shard_map   # one worker per device

Under ``--execution shard_map`` the collectives are real (XLA:CPU, for one, then promotes a bf16
all-reduce to float32 around it: converts the simulated step does not have).
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import optdist
from experiments.benchmarks import hlo_cost
from experiments.benchmarks.compression import resnet50_shapes
from experiments.benchmarks.report import Progress, Results, format_header, format_row, print_rows
from experiments.benchmarks.timing import describe, machine, seconds_per_call

C = optdist.compressors

FLOOR_FORMULA = (
    "floor = W*G (read gradients) + 2*dS (read+write the method's extra state) "
    "+ 2*W*P (write payloads, read them for the mean) + W*G (write the estimates); "
    "G = gradient bytes per worker, P = bytes one worker sends (the payload at W=2), "
    "dS = state bytes beyond the exact mean's; exact mean: P = 0"
)

ALL_FEEDBACKS = (None, "ef", "ef21", "econtrol")

# (name, compressor factory, feedback variants run by default). Factories run when their row runs, so a
# compressor that a refactor renamed, merged or removed fails its own rows only (with its error).
COMPRESSORS: list[tuple[str, Callable[[], Any], tuple[str | None, ...]]] = [
    ("cast_bf16", lambda: C.cast(jnp.bfloat16), (None, "ef")),
    ("cast_fp16", lambda: C.cast(jnp.float16), (None, "ef")),
    ("cast_fp8_e4m3", lambda: C.cast(jnp.float8_e4m3fn), (None, "ef")),
    ("sign_vote", lambda: C.sign(scaled=False), (None, "ef")),
    ("sign_scaled", lambda: C.sign(), (None, "ef")),
    ("scaled_sign_b256", lambda: C.sign(bucket_size=256), ALL_FEEDBACKS),
    ("int8_b256", lambda: C.qsgd(127, 256, scale="max", rounding="nearest", fused=True), (None, "ef")),
    ("ternary_b256", lambda: C.terngrad(None, bucket_size=256), (None, "ef")),
    ("qsgd_s127_b512", lambda: C.qsgd(127, 512), (None, "ef")),
    ("terngrad", lambda: C.terngrad(), (None, "ef")),
    ("top_k_1%", lambda: C.top_k(0.01), ALL_FEEDBACKS),
    ("top_k_1%_threshold", lambda: C.top_k(0.01, "threshold"), (None, "ef")),
    ("threshold_top_k_1%", lambda: C.top_k(0.01, "fused_threshold", 4096), (None, "ef")),
    ("rand_k_1%", lambda: C.rand_k(0.01), (None, "ef")),
    ("demo_64_32", lambda: C.demo(64, 32), (None, "ef")),
    ("powersgd_r1", lambda: C.powersgd(1), ("ef",)),
    ("powersgd_r4", lambda: C.powersgd(4), ("ef",)),
]

COLUMNS = [
    ("method", "method", "<28"),
    ("xla MB", "xla_mb", ">10.2f"),
    ("hlo MB", "hlo_mb", ">10.2f"),
    ("floor MB", "floor_mb", ">10.2f"),
    ("hlo/floor", "hlo_ratio", ">10.2f"),
    ("xla/floor", "xla_ratio", ">10.2f"),
    ("loops", "loops", ">6d"),
    ("ms", "ms", ">9.2f"),
    ("t/exact", "time_ratio", ">8.2f"),
]


def floor_bytes(grad_bytes: int, workers: int, extra_state_bytes: int, payload_bytes: int) -> int:
    """The algorithmic floor of :data:`FLOOR_FORMULA` (all arguments in bytes; ``grad_bytes`` per worker)."""
    return 2 * workers * grad_bytes + 2 * max(extra_state_bytes, 0) + 2 * workers * payload_bytes


def _tree_bytes(tree: Any) -> int:
    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree) if hasattr(x, "dtype"))


def plan(feedbacks: Sequence[str | None] | None, only: Sequence[str] | None) -> list[tuple[str, Any, Any]]:
    """The ``(row name, compressor factory, feedback)`` rows to run, the exact mean not included.

    ``feedbacks`` replaces each compressor's default variants (PowerSGD keeps EF only); ``only`` keeps
    the rows whose name contains one of its strings.
    """
    rows = []
    for name, make, default in COMPRESSORS:
        chosen = default if feedbacks is None or name.startswith("powersgd") else tuple(feedbacks)
        for fb in chosen:
            row = f"{name}+{fb}" if fb else name
            if not only or any(s in row for s in only):
                rows.append((row, make, fb))
    return rows


def _tree(args) -> dict[str, tuple[int, ...]]:
    if args.full:
        return resnet50_shapes()
    if args.small:
        return resnet50_shapes(width_divisor=16, num_classes=10, blocks=(1,))
    blocks = tuple(int(b) for b in args.blocks.split(","))
    return resnet50_shapes(width_divisor=args.width_divisor, num_classes=args.num_classes, blocks=blocks)


def measure_step(
    tx, params, grads, workers: int, repeats: int, execution: str = "simulate"
) -> tuple[dict, Callable[[], float]]:
    """Compiles one step of ``tx`` (simulated workers, or ``shard_map`` with one worker per device): its
    bytes (XLA's, trip-counted; under ``shard_map`` one device's program times ``workers``, every device
    running the same program), sent bytes and time, and a function that times it again."""
    state = optdist.replicate(tx.init(params), workers)
    fn = lambda g, s: tx.update(g, s, params)  # noqa: E731
    devices = 1
    if execution == "shard_map":
        devices = workers
        mesh = jax.make_mesh((workers,), ("data",), devices=jax.devices()[:workers])
        step = jax.jit(optdist.data_parallel(fn, mesh, "data"))
    else:
        step = optdist.simulate(fn, "data")
    start = time.perf_counter()
    compiled = step.lower(grads, state).compile()
    compile_s = time.perf_counter() - start
    cost = hlo_cost.bytes_accessed(compiled.as_text())

    def timer() -> float:
        return seconds_per_call(compiled, grads, state, repeats=repeats)

    seconds = timer()
    _, new_state = compiled(grads, state)
    measured = {
        "xla_bytes": devices * hlo_cost.xla_bytes_accessed(compiled),
        "hlo_bytes": devices * cost.total,
        "hlo_bytes_once": devices * cost.once,
        "loops": sum(1 for _, trips, _ in cost.loops if trips > 1),
        "loop_trip_counts": sorted({trips for _, trips, _ in cost.loops}),
        "unknown_trip_counts": len(cost.unknown_trip_counts),
        "state_bytes": _tree_bytes(state),
        "sent_bytes_per_worker": int(np.asarray(optdist.bytes_sent(new_state))[0]),
        "seconds": seconds,
        "compile_seconds": compile_s,
    }
    return measured, timer


def run(args) -> dict:
    shapes = _tree(args)
    w = args.workers
    params = {k: jnp.zeros(s, jnp.float32) for k, s in shapes.items()}
    num_params = sum(math.prod(s) for s in shapes.values())
    grad_bytes = 4 * num_params
    key = jax.random.key(0)
    grads = {
        k: jax.random.normal(jax.random.fold_in(key, i), (w, *s), jnp.float32)
        for i, (k, s) in enumerate(shapes.items())
    }
    feedbacks = None
    if args.feedbacks:
        feedbacks = [None if f == "none" else f for f in args.feedbacks.split(",")]
    rows = plan(feedbacks, args.only)
    info = machine()
    config = {
        "num_params": num_params,
        "leaves": len(shapes),
        "workers": w,
        "repeats": args.repeats,
        "tree": "full" if args.full else "small" if args.small else f"1/{args.width_divisor} {args.blocks}",
        "floor_formula": FLOOR_FORMULA,
        "execution": args.execution,
    }
    results = Results(args.out, "compression_cost", info, config)
    workers = f"{w} simulated workers" if args.execution == "simulate" else f"{w} devices (shard_map)"
    print(f"{num_params:,} params in {len(shapes)} leaves, {workers}, {describe(info)}")
    print(FLOOR_FORMULA)
    print(format_header(COLUMNS), flush=True)
    progress = Progress(len(rows) + 1)
    measure = lambda tx: measure_step(tx, params, grads, w, args.repeats, args.execution)  # noqa: E731
    exact, exact_timer = measure(optdist.mean_gradients("data"))
    exact_times = [exact["seconds"]]
    progress.step("exact_mean")

    def make_row(name: str, m: dict, payload: int) -> dict:
        floor = floor_bytes(grad_bytes, w, m["state_bytes"] - exact["state_bytes"], payload)
        return {
            "method": name,
            **m,
            "floor_bytes": floor,
            "hlo_ratio": m["hlo_bytes"] / floor,
            "xla_ratio": m["xla_bytes"] / floor,
            "xla_mb": m["xla_bytes"] / 1e6,
            "hlo_mb": m["hlo_bytes"] / 1e6,
            "floor_mb": floor / 1e6,
            "ms": 1e3 * m["seconds"],
        }

    exact_row = results.add(make_row("exact_mean", exact, 0))
    exact_row["time_ratio"] = 1.0
    print(format_row(exact_row, COLUMNS), flush=True)
    for name, make, fb in rows:
        try:
            tx = optdist.compressed_mean(make(), "data", feedback=fb)
            m, _ = measure(tx)
            # The exact mean is timed again after every row: each row's baseline is the mean of the exact
            # timings just before and just after it, so drift on a shared machine affects both alike.
            exact_times.append(exact_timer())
            row = make_row(name, m, m["sent_bytes_per_worker"])
            row["exact_seconds_adjacent"] = 0.5 * (exact_times[-2] + exact_times[-1])
            row["time_ratio"] = m["seconds"] / row["exact_seconds_adjacent"]
            print(format_row(results.add(row), COLUMNS), flush=True)
        except Exception as exc:  # noqa: BLE001 - one compressor failing to build or compile fails its row
            results.add({"method": name, "error": f"{type(exc).__name__}: {exc}"})
            print(f"{name:<28}ERROR {type(exc).__name__}: {str(exc)[:200]}", flush=True)
        progress.step(name)

    exact_row["seconds"] = float(np.median(exact_times))
    exact_row["ms"] = 1e3 * exact_row["seconds"]
    spread = f"{1e3 * min(exact_times):.2f}-{1e3 * max(exact_times):.2f}"
    print()
    print_rows(
        f"compressed_mean step cost ({num_params:,} params, {workers}; each time ratio is "
        f"against the exact mean timed next to it: median {exact_row['ms']:.2f} ms, range {spread} ms)",
        [r for r in results.rows if "seconds" in r],
        COLUMNS,
    )
    return results.finish(exact_mean_seconds=exact_times)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="JSON output path (rewritten after every row)")
    parser.add_argument("--workers", type=int, default=2, help="simulated workers (2: P is the payload)")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per step (median)")
    parser.add_argument("--width-divisor", type=int, default=1, help="ResNet-50 channel widths / this")
    parser.add_argument(
        "--blocks", default="1", help="bottleneck blocks of the first stages (ResNet-50: 3,4,6,3)"
    )
    parser.add_argument("--num-classes", type=int, default=100)
    parser.add_argument("--full", action="store_true", help="the 25.6M-parameter ResNet-50 tree")
    parser.add_argument("--small", action="store_true", help="a tiny tree (smoke run, seconds)")
    parser.add_argument(
        "--feedbacks", default=None, help="comma list of none,ef,ef21,econtrol for every compressor"
    )
    parser.add_argument("--only", nargs="*", default=None, help="run rows whose name contains one of these")
    parser.add_argument(
        "--execution",
        choices=("simulate", "shard_map"),
        default="simulate",
        help="simulated workers (vmap), or shard_map with one worker per device (needs --workers devices)",
    )
    args = parser.parse_args(argv)
    if args.feedbacks and not set(args.feedbacks.split(",")) <= {"none", "ef", "ef21", "econtrol"}:
        parser.error(f"--feedbacks takes none, ef, ef21, econtrol; got {args.feedbacks!r}")
    if args.workers < 1 or args.repeats < 1:
        parser.error("--workers and --repeats must be >= 1")
    if args.execution == "shard_map" and jax.device_count() < args.workers:
        parser.error(
            f"--execution shard_map runs one worker per device: --workers {args.workers} needs that many "
            f"devices, this process has {jax.device_count()} (on CPU: "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={args.workers})"
        )
    return run(args)


if __name__ == "__main__":
    main()
