"""Kernel benchmark: ``python -m experiments.benchmarks.kernels [--small] [--sizes 2**20] [--out x.json]``.

For each kernel and size it prints the median time, the achieved bandwidth (bytes of every input read
once + every output written once, i.e. the ideal traffic) or TFLOP/s, the ratio of the XLA path's time
to this path's time (``> 1``: faster than XLA) and the achieved bandwidth as a fraction of a measured
device-to-device elementwise copy in the same run. Also ``lax.top_k`` (1%) against the threshold top-k,
``eigh`` against the Newton roots for batches of SPD blocks, and PowerSGD's fused passes (rank 4) on
``--powersgd`` batches ``BxRxC``. Results go to ``--out`` as JSON, rewritten after every row. Timing:
median of ``--reps`` calls after two warm-ups (:mod:`.timing`).

GPU numbers come only from a GPU: on CPU the Pallas path runs in interpret mode (``--small`` is a smoke
run of the script, not a measurement).
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from experiments.benchmarks.report import Progress, Results
from experiments.benchmarks.timing import machine, seconds_per_call
from optdist_kernels import powersgd, quantize, roots, topk

_GB = 1e9


def _time(fn, *args, reps: int) -> float:
    """Median seconds of ``fn(*args)`` (jitted; compile and one warm-up excluded)."""
    return seconds_per_call(fn, *args, repeats=reps, warmup=2)


def _row(results: Results, **row) -> None:
    results.add(row)
    parts = [f"{row['kernel']:<28}", f"{row['size']:>14}", f"{row['impl']:<8}"]
    if "error" in row:
        parts.append("ERROR " + row["error"][:100])
    else:
        parts.append(f"{row['ms']:9.3f} ms")
        if "gbps" in row:
            parts.append(f"{row['gbps']:8.1f} GB/s")
        if "tflops" in row:
            parts.append(f"{row['tflops']:7.2f} TFLOP/s")
        for name in ("vs_xla", "vs_copy", "residual", "kept"):
            if row.get(name) is not None:
                parts.append(f"{name}={row[name]:.3g}")
    print("  ".join(parts), flush=True)


def _bench_pair(results, kernel, size, make_fn, args, nbytes, copy_gbps, reps, flops=None, extra=None):
    """Times the XLA and Pallas versions of one function; records ratios."""
    xla_ms = None
    for impl in ("xla", "pallas"):
        try:
            fn = jax.jit(make_fn(impl))
            sec = _time(fn, *args, reps=reps)
        except Exception as exc:  # noqa: BLE001 - a kernel that fails to lower is reported, not fatal
            _row(results, kernel=kernel, size=size, impl=impl, error=f"{type(exc).__name__}: {exc}")
            continue
        row = dict(kernel=kernel, size=size, impl=impl, ms=sec * 1e3)
        if nbytes:
            row["gbps"] = nbytes / sec / _GB
            row["vs_copy"] = row["gbps"] / copy_gbps
        if flops:
            row["tflops"] = flops / sec / 1e12
        if impl == "xla":
            xla_ms = row["ms"]
        row["vs_xla"] = xla_ms / row["ms"] if xla_ms else None
        if extra is not None:
            row.update(extra(fn(*args)))
        _row(results, **row)


def _copy_gbps(n: int, reps: int) -> float:
    x = jnp.ones((n,), jnp.float32)
    sec = _time(jax.jit(lambda x: -x), x, reps=reps)
    return 8 * n / sec / _GB


def bench_quantize(results, sizes, reps, progress):
    for n in sizes:
        copy = _copy_gbps(n, reps)
        _row(results, kernel="copy (-x)", size=n, impl="xla", ms=8 * n / copy / _GB * 1e3, gbps=copy)
        g = jax.random.normal(jax.random.key(0), (n,), jnp.float32)
        e = 0.1 * jax.random.normal(jax.random.key(1), (n,), jnp.float32)
        key = jax.random.key(2)
        for scheme, rounding in (
            ("int8", "nearest"),
            ("int8", "stochastic"),
            ("ternary", "stochastic"),
            ("sign", "nearest"),
        ):
            cfg = quantize.Config(scheme, rounding, "max", 127, 256)
            rows, _ = quantize.layout(n, 256)
            code_bytes = rows * cfg.width * np.dtype(quantize._WORD_DTYPE[scheme]).itemsize
            nbytes = 8 * n + code_bytes + 4 * rows + 4 * n  # read g, e; write codes, scales, e_new
            make = lambda impl, s=scheme, r=rounding: (
                lambda gg, ee, kk: quantize.ef_quantize(gg, ee, kk, scheme=s, rounding=r, impl=impl)
            )
            _bench_pair(
                results, f"ef_quantize[{scheme},{rounding}]", n, make, (g, e, key), nbytes, copy, reps
            )
            payload, _ = quantize.ef_quantize(g, e, key, scheme=scheme, rounding=rounding, impl="xla")
            acc = jnp.zeros((n,), jnp.float32)
            make = lambda impl, s=scheme: lambda p, a: quantize.decode_accumulate(p, a, scheme=s, impl=impl)
            nbytes = code_bytes + 4 * rows + 8 * n  # read codes, scales, acc; write the sum
            _bench_pair(results, f"decode_accumulate[{scheme}]", n, make, (payload, acc), nbytes, copy, reps)
        del g, e
        progress.step(f"quantize n={n}")


def _exact_topk(g, e, k):
    """The ``lax.top_k`` path of the same fused function (full sort-based selection)."""
    p = (g + e).reshape(-1)
    _, idx = lax.top_k(jnp.abs(p), k)
    return {"values": p[idx], "indices": idx}, p.at[idx].set(0.0)


def bench_topk(results, sizes, reps, progress, ratio=0.01):
    for n in sizes:
        copy = _copy_gbps(n, reps)
        g = jax.random.normal(jax.random.key(0), (n,), jnp.float32)
        e = 0.1 * jax.random.normal(jax.random.key(1), (n,), jnp.float32)
        key = jax.random.key(2)
        k = max(1, int(ratio * n))
        cap = int(k * 1.1)
        nbytes = 8 * n + 4 * n + 8 * cap  # read g, e; write e_new and the payload
        kept = lambda out, k=k: {"kept": float(out[0]["count"]) / k}
        make = lambda impl, k=k: lambda gg, ee, kk: topk.ef_threshold_topk(gg, ee, kk, k, impl=impl)
        _bench_pair(
            results, f"ef_threshold_topk[{ratio:g}]", n, make, (g, e, key), nbytes, copy, reps, extra=kept
        )
        try:
            sec = _time(jax.jit(_exact_topk, static_argnums=2), g, e, k, reps=reps)
            row = dict(kernel=f"lax.top_k EF[{ratio:g}]", size=n, impl="xla", ms=sec * 1e3)
            row["gbps"] = (8 * n + 4 * n + 8 * k) / sec / _GB
            row["vs_copy"] = row["gbps"] / copy
            _row(results, **row)
        except Exception as exc:  # noqa: BLE001
            _row(results, kernel="lax.top_k EF", size=n, impl="xla", error=f"{type(exc).__name__}: {exc}")
        del g, e
        progress.step(f"top-k n={n}")


def bench_powersgd(results, configs, reps, progress, rank=4):
    """PowerSGD's fused passes on ``[B, R, C]`` batches (rank ``r``): EF add + projection, decode +
    residual (ideal traffic: each full-size array read or written once), and Gram–Schmidt."""
    for b, rows, cols in configs:
        n = b * rows * cols
        copy = _copy_gbps(n, reps)
        ks = jax.random.split(jax.random.key(0), 3)
        g = jax.random.normal(ks[0], (b, rows, cols), jnp.float32)
        e = 0.1 * jax.random.normal(ks[1], (b, rows, cols), jnp.float32)
        q = jax.random.normal(ks[2], (b, cols, rank), jnp.float32)
        size = f"{b}x{rows}x{cols},r{rank}"
        small = 4 * b * (rows + cols) * rank
        make = lambda impl: lambda gg, ee, qq: powersgd.ef_project(gg, ee, qq, impl=impl)
        _bench_pair(results, "powersgd_ef_project", size, make, (g, e, q), 12 * n + small, copy, reps)
        m, p = powersgd.ef_project(g, e, q, impl="xla")
        p = powersgd.gram_schmidt(p, impl="xla")
        make = lambda impl: lambda mm, pp, qq: powersgd.decode_residual(mm, pp, qq, impl=impl)
        _bench_pair(results, "powersgd_decode_residual", size, make, (m, p, q), 12 * n + small, copy, reps)
        make = lambda impl: lambda pp: powersgd.gram_schmidt(pp, impl=impl)
        _bench_pair(
            results, "powersgd_gram_schmidt", f"{b}x{rows},r{rank}", make, (p,), 2 * small, copy, reps
        )
        del g, e, m
        progress.step(f"powersgd {size}")


def _eigh_root(a, p):
    w, v = jnp.linalg.eigh(a)
    w = jnp.maximum(w, 0.0) + 1e-6 * jnp.linalg.norm(a, axis=(1, 2))[:, None]
    return jnp.matmul(v * w[:, None, :] ** (-1.0 / p), jnp.swapaxes(v, 1, 2), precision=lax.Precision.HIGHEST)


def bench_roots(results, configs, reps, progress, p=4, iters=20):
    for b, m in configs:
        w = jax.random.normal(jax.random.key(0), (b, m, 2 * m), jnp.float32)
        a = jnp.matmul(w, jnp.swapaxes(w, 1, 2), precision=lax.Precision.HIGHEST) / (2 * m)
        a = a + 1e-3 * jnp.eye(m)
        flops = b * iters * 4 * 2 * m**3  # coupled Newton, p = 4: four m x m matmuls per iteration
        size = f"{b}x{m}^2"
        resid = lambda out: {"residual": float(jnp.max(out[1]))}
        for method in ("coupled_newton", "newton_schulz"):
            make = lambda impl, meth=method: (
                lambda aa: roots.batched_inverse_pth_root(aa, p, method=meth, iters=iters, impl=impl)
            )
            fl = flops * (5 / 4 if method == "newton_schulz" else 1)
            _bench_pair(
                results, f"inverse_root[{method}]", size, make, (a,), 0, 1.0, reps, flops=fl, extra=resid
            )
        try:
            sec = _time(jax.jit(_eigh_root, static_argnums=1), a, p, reps=reps)
            _row(results, kernel="inverse_root[eigh]", size=size, impl="xla", ms=sec * 1e3)
        except Exception as exc:  # noqa: BLE001
            _row(
                results,
                kernel="inverse_root[eigh]",
                size=size,
                impl="xla",
                error=f"{type(exc).__name__}: {exc}",
            )
        progress.step(f"roots {size}")


def _parse_sizes(text: str) -> list[int]:
    """``"4096,2**20"`` -> ``[4096, 1048576]``."""
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        base, _, exp = item.partition("**")
        out.append(int(base) ** int(exp) if exp else int(base))
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--small", action="store_true", help="tiny sizes: a quick smoke run (CPU)")
    parser.add_argument("--sizes", default="2**20,2**24,2**26,2**28", help="element counts (comma-separated)")
    parser.add_argument("--topk-sizes", default="2**24,2**26", help="element counts for top-k")
    parser.add_argument(
        "--roots", default="1024x128,256x64,16x1024", help="root batches BxM, comma-separated"
    )
    parser.add_argument(
        "--powersgd", default="1x4096x4096,64x512x512,16x768x3072", help="PowerSGD batches BxRxC"
    )
    parser.add_argument("--only", default="quantize,topk,roots,powersgd", help="which groups to run")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--out", default=None, help="JSON output path (rewritten after every row)")
    args = parser.parse_args(argv)
    if args.small:
        args.sizes, args.topk_sizes, args.roots, args.reps = "4096,20000", "20000", "2x16,2x32", 2
        args.powersgd = "2x40x96"
    only = set(args.only.split(","))
    info = {**machine(), "interpret": jax.default_backend() != "gpu"}
    sizes, topk_sizes = _parse_sizes(args.sizes), _parse_sizes(args.topk_sizes)
    root_configs = [tuple(int(v) for v in c.split("x")) for c in args.roots.split(",") if c.strip()]
    psgd_configs = [tuple(int(v) for v in c.split("x")) for c in args.powersgd.split(",") if c.strip()]
    groups = {"quantize": sizes, "topk": topk_sizes, "roots": root_configs, "powersgd": psgd_configs}
    config = {name: [str(v) for v in items] for name, items in groups.items() if name in only}
    results = Results(args.out, "kernels", info, {**config, "reps": args.reps})
    print(json.dumps(info), flush=True)
    progress = Progress(sum(len(items) for name, items in groups.items() if name in only))
    if "quantize" in only:
        bench_quantize(results, sizes, args.reps, progress)
    if "topk" in only:
        bench_topk(results, topk_sizes, args.reps, progress)
    if "roots" in only:
        bench_roots(results, root_configs, args.reps, progress)
    if "powersgd" in only:
        bench_powersgd(results, psgd_configs, args.reps, progress)
    return results.finish()


if __name__ == "__main__":
    main()
