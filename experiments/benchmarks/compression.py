"""Benchmark: compress + aggregate + decode time per compressor, as a ratio to the exact mean.

Times one ``compressed_mean`` step (with error feedback where the method
uses it) on a ResNet-50-shaped gradient tree (~25.6M parameters, Flax HWIO
conv kernels) for ``--workers`` simulated workers on the default device, and
the exact-mean step (:func:`optdist.mean_gradients`) on the same tree in the
same run. Prints a table and writes JSON to ``--out``.

  python -m experiments.benchmarks.compression --out /tmp/compression_bench.json
  python -m experiments.benchmarks.compression --small --out /tmp/small.json   # seconds

Numbers are per step for all simulated workers together; on CPU they measure
compute only (a simulated collective is a reduction in memory), so they say
what compression costs, not what it saves on a network — the bytes columns
say that. Timing: median of ``--repeats`` calls after one warm-up (:mod:`.timing`); the JSON is
rewritten after every row (a run stopped early keeps its rows).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optdist
from experiments.benchmarks.report import Progress, Results, format_header, format_row
from experiments.benchmarks.timing import describe, machine, seconds_per_call
from optdist import compressed_mean, compression


def resnet50_shapes(
    width_divisor: int = 1, num_classes: int = 1000, blocks: tuple[int, ...] = (3, 4, 6, 3)
) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of a ResNet-50 (bottleneck [3, 4, 6, 3], HWIO kernels, BN scale/bias)."""
    shapes: dict[str, tuple[int, ...]] = {}
    c = 64 // width_divisor
    shapes["stem/conv"] = (7, 7, 3, c)
    shapes["stem/bn_scale"] = shapes["stem/bn_bias"] = (c,)
    cin = c
    for s, (width, num_blocks) in enumerate(zip((64, 128, 256, 512), blocks)):
        w = width // width_divisor
        for b in range(num_blocks):
            p = f"stage{s}/block{b}"
            for name, shape in (
                ("conv1", (1, 1, cin, w)),
                ("conv2", (3, 3, w, w)),
                ("conv3", (1, 1, w, 4 * w)),
            ):
                shapes[f"{p}/{name}"] = shape
                shapes[f"{p}/{name}_bn_scale"] = shapes[f"{p}/{name}_bn_bias"] = (shape[-1],)
            if b == 0:
                shapes[f"{p}/proj"] = (1, 1, cin, 4 * w)
                shapes[f"{p}/proj_bn_scale"] = shapes[f"{p}/proj_bn_bias"] = (4 * w,)
            cin = 4 * w
    shapes["head/kernel"] = (cin, num_classes)
    shapes["head/bias"] = (num_classes,)
    return shapes


def methods() -> dict[str, Callable[[str], optax.GradientTransformation]]:
    """Name -> factory(axis_name) of the transforms compared.

    Compressors are built when a row runs (not here), so a compressor that a refactor renamed or
    removed fails its own row with its error instead of the whole script.
    """

    def cm(make_compressor, feedback=None):
        return lambda axis: compressed_mean(make_compressor(), axis, feedback=feedback)

    return {
        "exact_mean": optdist.mean_gradients,
        "powersgd_r1_ef": cm(lambda: compression.powersgd(1), "ef"),
        "powersgd_r2_ef": cm(lambda: compression.powersgd(2), "ef"),
        "powersgd_r4_ef": cm(lambda: compression.powersgd(4), "ef"),
        "top_k_1%_ef": cm(lambda: compression.top_k(0.01), "ef"),
        "top_k_1%_threshold_ef": cm(lambda: compression.top_k(0.01, "threshold"), "ef"),
        "top_k_1%_ef21": cm(lambda: compression.top_k(0.01), "ef21"),
        "rand_k_1%": cm(lambda: compression.rand_k(0.01)),
        "rand_k_1%_uniform": cm(lambda: compression.rand_k(0.01, sampling="uniform")),
        "qsgd_s127_b512": cm(lambda: compression.qsgd(127, 512)),
        "terngrad": cm(compression.terngrad),
        "sign_scaled_ef": cm(compression.sign, "ef"),
        "sign_vote": cm(lambda: compression.sign(scaled=False)),
        "cast_bf16": cm(lambda: compression.cast(jnp.bfloat16)),
        "cast_fp8_e4m3": cm(lambda: compression.cast(jnp.float8_e4m3fn)),
        "demo_64_32": cm(lambda: compression.demo(64, 32)),
        # Kernel-backed compressors on their fused EF path (impl="auto": the XLA reference off GPU).
        "int8_b256_ef": cm(lambda: compression.int8(256), "ef"),
        "ternary_b256_ef": cm(lambda: compression.ternary(256), "ef"),
        "scaled_sign_b256_ef": cm(lambda: compression.scaled_sign(256), "ef"),
        "threshold_top_k_1%_ef": cm(lambda: compression.threshold_top_k(0.01), "ef"),
    }


COLUMNS = [
    ("method", "method", "<24"),
    ("ms/step", "ms", ">10.1f"),
    ("x exact", "time_ratio", ">9.2f"),
    ("MB/worker", "mb_per_worker", ">11.3f"),
    ("x bytes", "bytes_ratio", ">9.4f"),
]


def bench_tree(small: bool) -> dict[str, tuple[int, ...]]:
    """The benchmark's tree: the ResNet-50 shapes, or (``small``) 1 block per stage at 1/8 width."""
    if small:  # one block per stage at 1/8 width: few leaves, so compiling is quick
        shapes = resnet50_shapes(width_divisor=8, num_classes=100, blocks=(1, 1, 1, 1))
    else:
        shapes = resnet50_shapes()
    return shapes


def run(small: bool, workers: int, repeats: int, only: list[str] | None = None, out: str | None = None):
    """Times every method (the exact mean first); returns the :class:`Results` payload."""
    shapes = bench_tree(small)
    params = {k: jnp.zeros(s, jnp.float32) for k, s in shapes.items()}
    num_params = sum(math.prod(s) for s in shapes.values())
    key = jax.random.key(0)
    grads = {
        k: jax.random.normal(jax.random.fold_in(key, i), (workers, *s), jnp.float32)
        for i, (k, s) in enumerate(shapes.items())
    }
    info = machine()
    config = {"num_params": num_params, "workers": workers, "repeats": repeats, "small": small}
    results = Results(out, "compression", info, config)
    print(f"{num_params / 1e6:.1f}M params, {workers} workers, {describe(info)}")
    print(format_header(COLUMNS), flush=True)
    chosen = [(n, m) for n, m in methods().items() if not only or n in only or n == "exact_mean"]
    progress = Progress(len(chosen))
    base = None
    for name, make in chosen:
        try:
            tx = make("data")
        except Exception as exc:  # noqa: BLE001 - a compressor that no longer builds fails its row only
            results.add({"method": name, "error": f"{type(exc).__name__}: {exc}"})
            print(f"{name:<24}ERROR {type(exc).__name__}: {exc}", flush=True)
            progress.step(name)
            continue
        state = optdist.replicate(tx.init(params), workers)
        step = optdist.simulate(lambda g, s, tx=tx: tx.update(g, s, params), "data")
        seconds = seconds_per_call(step, grads, state, repeats=repeats)
        _, new_state = step(grads, state)
        sent = int(np.asarray(optdist.bytes_sent(new_state))[0])
        base = base or {"seconds": seconds, "bytes_per_worker": sent}
        row = results.add(
            {
                "method": name,
                "seconds": seconds,
                "ms": 1e3 * seconds,
                "bytes_per_worker": sent,
                "mb_per_worker": sent / 1e6,
                "time_ratio": seconds / base["seconds"],
                "bytes_ratio": sent / base["bytes_per_worker"],
            }
        )
        print(format_row(row, COLUMNS), flush=True)
        progress.step(name)
        del state, new_state
    return results.finish()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="path of the JSON results (rewritten after each row)")
    parser.add_argument(
        "--small", action="store_true", help="a ~0.1M-parameter, 1-block-per-stage tree (smoke test)"
    )
    parser.add_argument("--workers", type=int, default=2, help="simulated workers")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (median)")
    parser.add_argument("--only", nargs="*", help="method names to run (exact_mean always runs)")
    args = parser.parse_args(argv)
    return run(args.small, args.workers, args.repeats, args.only, args.out)


if __name__ == "__main__":
    main()
