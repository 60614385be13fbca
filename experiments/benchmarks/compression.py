"""Benchmark: compress + aggregate + decode time per compressor, as a ratio to the exact mean.

Times one ``compressed_mean`` step (with error feedback where the method
uses it) on a ResNet-50-shaped gradient tree (~25.6M parameters, Flax HWIO
conv kernels) for ``--workers`` simulated workers on the default device, and
the exact-mean step (:func:`optdist.mean_gradients`) on the same tree in the
same run. Prints a table and writes JSON to ``--out``.

  python -m optdist.compression.bench --out /tmp/compression_bench.json
  python -m optdist.compression.bench --small --out /tmp/small.json   # seconds

Numbers are per step for all simulated workers together; on CPU they measure
compute only (a simulated collective is a reduction in memory), so they say
what compression costs, not what it saves on a network — the bytes columns
say that.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optdist
from optdist import compression
from optdist.feedback.compressed_mean import compressed_mean


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
    """Name -> factory(axis_name) of the transforms compared."""
    cm = lambda comp, fb=None: lambda axis: compressed_mean(comp, axis, feedback=fb)
    return {
        "exact_mean": optdist.mean_gradients,
        "powersgd_r1_ef": cm(compression.powersgd(1), "ef"),
        "powersgd_r2_ef": cm(compression.powersgd(2), "ef"),
        "powersgd_r4_ef": cm(compression.powersgd(4), "ef"),
        "top_k_1%_ef": cm(compression.top_k(0.01), "ef"),
        "top_k_1%_threshold_ef": cm(compression.top_k(0.01, "threshold"), "ef"),
        "top_k_1%_ef21": cm(compression.top_k(0.01), "ef21"),
        "rand_k_1%": cm(compression.rand_k(0.01)),
        "rand_k_1%_uniform": cm(compression.rand_k(0.01, sampling="uniform")),
        "qsgd_s127_b512": cm(compression.qsgd(127, 512)),
        "terngrad": cm(compression.terngrad()),
        "sign_scaled_ef": cm(compression.sign(), "ef"),
        "sign_vote": cm(compression.sign(scaled=False)),
        "cast_bf16": cm(compression.cast(jnp.bfloat16)),
        "cast_fp8_e4m3": cm(compression.cast(jnp.float8_e4m3fn)),
        "demo_64_32": cm(compression.demo(64, 32)),
        # Kernel-backed compressors on their fused EF path (impl="auto": the XLA reference off GPU).
        "int8_b256_ef": cm(compression.int8(256), "ef"),
        "ternary_b256_ef": cm(compression.ternary(256), "ef"),
        "scaled_sign_b256_ef": cm(compression.scaled_sign(256), "ef"),
        "threshold_top_k_1%_ef": cm(compression.threshold_top_k(0.01), "ef"),
    }


def _time(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _row(r: dict) -> str:
    return (
        f"{r['method']:<24}{1e3 * r['seconds']:>10.1f}{r['time_ratio']:>9.2f}"
        f"{r['bytes_per_worker'] / 1e6:>11.3f}{r['bytes_ratio']:>9.4f}"
    )


def run(small: bool, workers: int, repeats: int, only: list[str] | None = None) -> dict:
    if small:  # one block per stage at 1/8 width: few leaves, so compiling is quick
        shapes = resnet50_shapes(width_divisor=8, num_classes=100, blocks=(1, 1, 1, 1))
    else:
        shapes = resnet50_shapes()
    params = {k: jnp.zeros(s, jnp.float32) for k, s in shapes.items()}
    num_params = sum(math.prod(s) for s in shapes.values())
    key = jax.random.key(0)
    grads = {
        k: jax.random.normal(jax.random.fold_in(key, i), (workers, *s), jnp.float32)
        for i, (k, s) in enumerate(shapes.items())
    }
    print(
        f"{num_params / 1e6:.1f}M params, {workers} workers, {jax.default_backend()}, jax {jax.__version__}"
    )
    print(f"{'method':<24}{'ms/step':>10}{'x exact':>9}{'MB/worker':>11}{'x bytes':>9}", flush=True)
    results = []
    for name, make in methods().items():
        if only and name not in only and name != "exact_mean":
            continue
        tx = make("data")
        state = optdist.replicate(tx.init(params), workers)
        step = optdist.simulate(lambda g, s, tx=tx: tx.update(g, s, params), "data")
        seconds = _time(step, grads, state, repeats=repeats)
        _, new_state = step(grads, state)
        sent = int(np.asarray(optdist.bytes_sent(new_state))[0])
        base = results[0] if results else {"seconds": seconds, "bytes_per_worker": sent}
        row = {
            "method": name,
            "seconds": seconds,
            "bytes_per_worker": sent,
            "time_ratio": seconds / base["seconds"],
            "bytes_ratio": sent / base["bytes_per_worker"],
        }
        results.append(row)
        print(_row(row), flush=True)  # long runs show progress
        del state, new_state
    return {
        "device": str(jax.devices()[0].device_kind),
        "platform": jax.default_backend(),
        "cpu": platform.processor() or platform.machine(),
        "jax": jax.__version__,
        "num_params": num_params,
        "workers": workers,
        "repeats": repeats,
        "small": small,
        "results": results,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="path of the JSON results")
    parser.add_argument(
        "--small", action="store_true", help="a ~0.1M-parameter, 1-block-per-stage tree (smoke test)"
    )
    parser.add_argument("--workers", type=int, default=2, help="simulated workers")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (median)")
    parser.add_argument("--only", nargs="*", help="method names to run (exact_mean always runs)")
    args = parser.parse_args(argv)
    report = run(args.small, args.workers, args.repeats, args.only)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
