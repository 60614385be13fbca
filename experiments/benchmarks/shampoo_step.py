"""Full training step (forward + backward + update) of a transformer LM: Shampoo vs AdamW.

Both optimizers train the same model on the same batch, side by side in one run. Each timed call
is a ``lax.scan`` of ``--steps`` training steps, so with ``precondition_every = k`` dividing
``--steps`` exactly ``steps / k`` root refreshes happen inside it: the per-step time *is* the
amortized time (no extrapolation). Shampoo: block ``--block``, RMSProp grafting, statistics every
step, momentum 0.9, roots by ``root_method="auto"``.

  python -m experiments.benchmarks.shampoo_step --small                       # CPU smoke
  python -m experiments.benchmarks.shampoo_step --out shampoo_lm_h100.json    # ~110M params (GPU)

Timing: the best of ``--repeats`` calls after a warm-up (:mod:`.timing`, ``reduce="min"``); the JSON
is rewritten after every row.
"""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import optax
from jax import lax

import optdist
from experiments import models
from experiments.benchmarks.report import Progress, Results
from experiments.benchmarks.timing import machine, seconds_per_call

PRECISIONS = {"highest": lax.Precision.HIGHEST, "default": lax.Precision.DEFAULT}


def measure(args) -> dict:
    cfg = SimpleNamespace(
        model="transformer", dim=args.dim, heads=args.heads, layers=args.layers, seq_len=args.seq
    )
    params, apply_fn = models.build(cfg, args.vocab, 0)
    num_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    x = jax.random.randint(jax.random.key(0), (args.batch, args.seq + 1), 0, args.vocab)
    batch = (x[:, :-1], x[:, 1:])

    def loss(p):
        return models.cross_entropy(apply_fn(p, batch[0]), batch[1])

    def chunk_fn(tx):
        def chunk(p, s):
            def body(carry, _):
                p, s = carry
                u, s = tx.update(jax.grad(loss)(p), s, p)
                return (optax.apply_updates(p, u), s), None

            return lax.scan(body, (p, s), None, length=args.steps)[0]

        return jax.jit(chunk, donate_argnums=(0, 1))

    def per_step_ms(tx) -> float:
        run = chunk_fn(tx)
        fresh = jax.tree_util.tree_map(jnp.copy, params)  # the chunk donates its inputs
        holder = {"p": fresh, "s": tx.init(fresh)}

        def call():
            holder["p"], holder["s"] = run(holder["p"], holder["s"])
            return holder["p"]

        return 1e3 * seconds_per_call(call, repeats=args.repeats, reduce="min") / args.steps

    for every in args.every:
        if args.steps % every:
            raise ValueError(f"--steps={args.steps} must be a multiple of each --every value ({every}).")
    precision = PRECISIONS[args.precision]
    results = Results(args.out, "shampoo_step", machine(), {**vars(args), "num_params": int(num_params)})
    progress = Progress(1 + len(args.every))
    adamw = per_step_ms(optax.adamw(1e-3, weight_decay=1e-4))
    progress.step("adamw")
    for every in args.every:
        tx = optdist.shampoo(
            1e-3,
            block_size=args.block,
            momentum=0.9,
            weight_decay=1e-4,
            grafting="rmsprop",
            precondition_every=every,
            start_preconditioning_step=0,
            precision=precision,
        )
        ms = per_step_ms(tx)
        results.add({"precondition_every": every, "shampoo_ms": ms, "adamw_ms": adamw, "ratio": ms / adamw})
        progress.step(f"shampoo every {every}")
    return results.finish()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="CPU smoke size (~0.4M parameters)")
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--block", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--every", type=lambda s: [int(v) for v in s.split(",")], default=[10, 100])
    parser.add_argument("--precision", choices=sorted(PRECISIONS), default="default")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", default=None, help="JSON output path (rewritten after every row)")
    args = parser.parse_args(argv)
    if args.small:
        args.dim, args.heads, args.layers, args.vocab, args.seq, args.batch = 64, 4, 2, 128, 64, 16
        args.block, args.steps, args.every = 128, 20, [1, 10, 20]
    result = measure(args)
    info, num_params = result["machine"], result["config"]["num_params"]
    print(f"device {info['device']}, jax {info['jax']}, {num_params / 1e6:.1f}M parameters")
    print(f"{'refresh every':>13} {'Shampoo ms/step':>16} {'AdamW ms/step':>14} {'ratio':>6}")
    for r in result["rows"]:
        every, ms, adamw = r["precondition_every"], r["shampoo_ms"], r["adamw_ms"]
        print(f"{every:>13} {ms:>16.2f} {adamw:>14.2f} {r['ratio']:>6.2f}")
    return result


if __name__ == "__main__":
    main()
