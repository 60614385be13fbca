"""Shampoo benchmark: step time vs AdamW, and matrix-root time and accuracy per method.

Run ``python -m experiments.benchmarks.shampoo_roots`` (the issue's configuration: 24 parameters of
2048x2048, block 1024, statistics every step, RMSProp grafting, root block batches 16x1024²,
64x512², 512x128²) or ``--small`` for a seconds-long smoke run. Prints tables and writes JSON to
``--out``.

Step times are measured side by side in one run for the optimizer update alone (jitted, state
donated): ``t_plain`` (statistics + preconditioning + grafting, no root refresh) and ``t_refresh``
(the same plus the roots); the time amortized over ``precondition_every = k`` is
``((k - 1) t_plain + t_refresh) / k``. ``flop_floor_ms`` is the statistics + preconditioning matmul
FLOPs (``8 b^3`` per ``b x b`` block) divided by the batched-matmul rate measured at the same
precision, so ``t_plain / flop_floor_ms`` shows how close the update is to the matmul bound.

Timing: median of the repeats after one warm-up (:mod:`.timing`). The JSON is rewritten after every
row; each row's ``table`` is ``"steps"`` or ``"roots"``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from experiments.benchmarks.report import Progress, Results
from experiments.benchmarks.timing import machine, seconds_per_call
from optdist import matrix_inverse_pth_root, scale_by_shampoo

PRECISIONS = {"highest": lax.Precision.HIGHEST, "default": lax.Precision.DEFAULT}


def _time(fn: Callable[[], Any], reps: int) -> float:
    """Median wall time in ms of ``fn()`` (one warm-up call compiles it)."""
    return 1e3 * seconds_per_call(fn, repeats=reps)


def _params(num: int, dim: int) -> dict[str, jax.Array]:
    keys = jax.random.split(jax.random.key(0), num)
    return {f"w{i:02d}": 0.02 * jax.random.normal(k, (dim, dim)) for i, k in enumerate(keys)}


def _update_timer(tx: optax.GradientTransformation, params, grads, reps: int, refresh: bool) -> float:
    update = jax.jit(tx.update, donate_argnums=(1,))
    holder = {"state": tx.init(params)}
    count = 0 if refresh else 1  # start_preconditioning_step=0: step 0 refreshes, step 1 does not

    def step():
        state = holder["state"]
        if hasattr(state, "count") and hasattr(state, "preconditioners"):
            state = state._replace(count=jnp.asarray(count, jnp.int32))
        out, holder["state"] = update(grads, state, params)
        return out

    return _time(step, reps)


def _matmul_rate(blocks: int, b: int, precision, reps: int) -> float:
    """Batched ``[blocks, b, b]`` f32 matmul rate in FLOP/s at ``precision``."""
    x = jax.random.normal(jax.random.key(1), (blocks, b, b))
    mm = jax.jit(lambda a: jnp.matmul(a, a, precision=precision))
    ms = _time(lambda: mm(x), reps)
    return 2.0 * blocks * b**3 / (ms * 1e-3)


def bench_steps(
    num: int,
    dim: int,
    block: int,
    reps: int,
    ks: list[int],
    results: Results,
    progress: Progress | None = None,
) -> list[dict[str, Any]]:
    params = _params(num, dim)
    grads = jax.tree_util.tree_map(lambda p: jax.random.normal(jax.random.key(2), p.shape), params)
    adamw_ms = _update_timer(optax.adamw(1e-3), params, grads, reps, refresh=False)
    blocks = num * (-(-dim // block)) ** 2
    rows = []
    configs = [  # (name, precision, statistics dtype, preconditioner dtype)
        ("highest", PRECISIONS["highest"], None, None),
        ("default", PRECISIONS["default"], None, None),
        ("highest+bf16_stats", PRECISIONS["highest"], jnp.bfloat16, None),
        ("highest+int16_stats+int8_pre", PRECISIONS["highest"], jnp.int16, jnp.int8),
    ]
    for name, precision, stat_dtype, pre_dtype in configs:
        tx = scale_by_shampoo(
            block,
            grafting="rmsprop",
            beta2=0.999,
            start_preconditioning_step=0,
            precondition_every=2,
            statistics_every=1,
            precision=precision,
            statistics_dtype=stat_dtype,
            preconditioner_dtype=pre_dtype,
        )
        plain = _update_timer(tx, params, grads, reps, refresh=False)
        refresh = _update_timer(tx, params, grads, max(1, reps // 3), refresh=True)
        rate = _matmul_rate(blocks, min(block, dim), precision, reps)
        floor = 8.0 * blocks * min(block, dim) ** 3 / rate * 1e3
        for k in ks:
            amortized = ((k - 1) * plain + refresh) / k
            row = results.add(
                dict(
                    table="steps",
                    config=name,
                    precondition_every=k,
                    shampoo_ms=amortized,
                    adamw_ms=adamw_ms,
                    ratio=amortized / adamw_ms,
                    plain_ms=plain,
                    refresh_ms=refresh,
                    flop_floor_ms=floor,
                    plain_over_floor=plain / floor,
                    matmul_tflops=rate / 1e12,
                )
            )
            rows.append(row)
        if progress is not None:
            progress.step(f"steps {name}")
    return rows


def _spd_batch(count: int, m: int, seed: int) -> np.ndarray:
    """Gradient-statistics-like SPD matrices: X X^T with X of m x 2m (condition ~1e2-1e3)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(count, m, 2 * m)).astype(np.float32)
    x *= np.logspace(0, -1.5, m, dtype=np.float32)[None, :, None]
    return x @ np.swapaxes(x, 1, 2) / (2 * m)


def _reference(a: np.ndarray, p: int, eps: float) -> np.ndarray:
    w, v = np.linalg.eigh(a.astype(np.float64))
    w = np.maximum(w, 0.0)
    w = w + eps * w[..., -1:]
    return np.einsum("...ij,...j,...kj->...ik", v, w ** (-1.0 / p), v)


ROOT_CONFIGS = [
    (m, pn)
    for m in ("eigh", "coupled_newton", "newton_schulz")
    for pn in PRECISIONS
    if (m, pn) != ("eigh", "default")
]


def bench_roots(
    batches: list[tuple[int, int]],
    reps: int,
    results: Results,
    progress: Progress | None = None,
    p: int = 4,
    check: int = 2,
) -> list[dict[str, Any]]:
    rows = []
    for count, m in batches:
        a_np = _spd_batch(count, m, seed=m)
        ref = _reference(a_np[:check], p, 1e-6)
        a = jnp.asarray(a_np)
        for method, pname in ROOT_CONFIGS:
            precision = PRECISIONS[pname]
            fn = jax.jit(
                lambda x, method=method, precision=precision: matrix_inverse_pth_root(
                    x, p, method, precision=precision
                )
            )
            ms = _time(lambda fn=fn, a=a: fn(a), reps)
            root, err = fn(a)
            root = np.asarray(root[:check], np.float64)
            rel = np.linalg.norm(root - ref, axis=(1, 2)) / np.linalg.norm(ref, axis=(1, 2))
            row = results.add(
                dict(
                    table="roots",
                    batch=f"{count}x{m}^2",
                    method=method,
                    precision=pname,
                    ms=ms,
                    residual=float(np.max(np.asarray(err))),
                    rel_error_vs_f64=float(rel.max()),
                )
            )
            rows.append(row)
            if progress is not None:
                progress.step(f"roots {count}x{m}^2 {method} {pname}")
    return rows


def _print_table(rows: list[dict[str, Any]], title: str) -> None:
    if not rows:
        return
    print(f"\n== {title} ==")
    cols = list(rows[0])
    print(" | ".join(f"{c:>14}" for c in cols))
    for r in rows:
        print(" | ".join(f"{v:>14.4g}" if isinstance(v, float) else f"{v!s:>14}" for v in r.values()))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="seconds-long smoke configuration")
    parser.add_argument("--out", default=None, help="JSON output path (rewritten after every row)")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--skip-steps", action="store_true")
    parser.add_argument("--skip-roots", action="store_true")
    args = parser.parse_args(argv)
    if args.small:
        num, dim, block, reps = 4, 128, 64, args.reps or 3
        batches = [(4, 128), (16, 64), (64, 32)]
    else:
        num, dim, block, reps = 24, 2048, 1024, args.reps or 10
        batches = [(16, 1024), (64, 512), (512, 128)]
    info = machine()
    config = dict(num_params=num, dim=dim, block_size=block, grafting="rmsprop", reps=reps, batches=batches)
    results = Results(args.out, "shampoo_roots", info, config)
    print(f"device {info['device']}, jax {info['jax']}, {num} params of {dim}x{dim}, block {block}")
    total = (0 if args.skip_steps else 4) + (0 if args.skip_roots else len(batches) * len(ROOT_CONFIGS))
    progress = Progress(total)
    if not args.skip_steps:
        steps = bench_steps(num, dim, block, reps, [1, 10, 100], results, progress)
        _print_table(steps, "optimizer update: Shampoo vs AdamW (ms, amortized over k)")
    if not args.skip_roots:
        roots = bench_roots(batches, reps, results, progress)
        _print_table(roots, "inverse 4th roots per method")
    return results.finish()


if __name__ == "__main__":
    main()
