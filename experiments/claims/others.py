"""Shampoo, Byzantine robustness, gradient tracking, CHOCO-SGD and seeded SPSA claims."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optdist
from experiments.claims.base import (
    Claim,
    digits_config,
    heterogeneous_least_squares,
    ls_loss,
    register,
    run_full_batch,
    steps_to,
    train_digits,
)

ADAMW = dict(optimizer="adamw", learning_rate=3e-3)

# --------------------------------------------------------------------------- #
# Shampoo: fewer steps than AdamW to AdamW's final loss.


def _shampoo(quick: bool) -> dict:
    adamw = train_digits(digits_config(quick, method="exact_mean", **ADAMW))
    sh = train_digits(
        digits_config(
            quick,
            method="shampoo",
            **{"hparams.shampoo.learning_rate": 3e-3, "hparams.shampoo.weight_decay": 1e-4},
        )
    )
    target = adamw["final"]["test_loss"]
    # also tried (reported, not judged): the digits_shampoo config's cadence, preconditioner every step
    every1 = train_digits(
        digits_config(
            quick,
            method="shampoo",
            **{
                "hparams.shampoo.learning_rate": 3e-3,
                "hparams.shampoo.weight_decay": 1e-4,
                "hparams.shampoo.precondition_every": 1,
                "hparams.shampoo.start_preconditioning_step": 1,
            },
        )
    )
    return {
        "every1_steps": steps_to(every1["history"], "test_loss", target),
        "every1_final_loss": every1["final"]["test_loss"],
        "target_loss": target,
        "adamw_steps": steps_to(adamw["history"], "test_loss", target),
        "shampoo_steps": steps_to(sh["history"], "test_loss", target),
        "adamw_accuracy": adamw["final"]["test_accuracy"],
        "shampoo_accuracy": sh["final"]["test_accuracy"],
        "shampoo_final_loss": sh["final"]["test_loss"],
    }


register(
    Claim(
        name="shampoo_fewer_steps",
        paper="Shi et al.: A Distributed Data-Parallel PyTorch Implementation of the Distributed Shampoo "
        "Optimizer (2023)",
        claim="Shampoo (AdaGrad-family Kronecker preconditioner with grafting) reaches a target in fewer "
        "steps than the standard diagonal-adaptive recipe",
        paper_figure="ImageNet ResNet-50: Shampoo reaches the SGD-Nesterov baseline's accuracy in fewer "
        "epochs (their ablation; abstract: 'Shampoo's superiority over standard training recipes')",
        criterion="Shampoo reaches AdamW's final test loss at an earlier evaluation (every 25 steps) than "
        "AdamW itself does",
        config=lambda q: (
            f"digits MLP (hidden {128 if q else 256}), 8 workers, exact mean, "
            f"{300 if q else 1000} steps; AdamW(3e-3, wd 1e-4) vs the shampoo method "
            "(experiments.methods.SHAMPOO_DEFAULTS: gradient EMA 0.9, L^-1/2 G R^-1/2, RMSProp graft, "
            "block 128, preconditioner every 10 steps from step 10; lr 3e-3, wd 1e-4)"
        ),
        run=_shampoo,
        passes=lambda m: m["shampoo_steps"] is not None and m["shampoo_steps"] < m["adamw_steps"],
        ours=lambda m: (
            f"steps to test loss {m['target_loss']:.3f}: AdamW {m['adamw_steps']}, Shampoo "
            f"{m['shampoo_steps']} (final acc {100 * m['adamw_accuracy']:.1f}% vs "
            f"{100 * m['shampoo_accuracy']:.1f}%, final loss {m['shampoo_final_loss']:.3f}); also tried "
            f"preconditioning every step: {m['every1_steps']} steps, final loss {m['every1_final_loss']:.3f}"
        ),
    )
)

# --------------------------------------------------------------------------- #
# Robust aggregation under attack.

ROBUST_RULES = {
    "mean": {"hparams.robust.aggregator": "mean"},
    # aggregators.monna(f) = NNM(f) then trimmed mean(f): MoNNA's server form / "Fixing by Mixing"
    "monna": {"hparams.robust.aggregator": "monna", "hparams.robust.worker_momentum": True},
    # Learning from History: centered clipping (tau 0.5, 3 iterations) of worker momenta
    "centered_clip": {"hparams.robust.aggregator": "centered_clip", "hparams.robust.worker_momentum": True},
}


def _robust(quick: bool, rule: str) -> dict:
    clean = train_digits(digits_config(quick, method="robust", **ROBUST_RULES["mean"]))
    out = {"clean_mean": clean["final"]["test_accuracy"]}
    # also reported (not judged): the robust rule without an attack, to tell the rule's own cost apart
    out[f"clean_{rule}"] = train_digits(digits_config(quick, method="robust", **ROBUST_RULES[rule]))["final"][
        "test_accuracy"
    ]
    for attack in ("sign_flip", "alie"):  # the mean's runs are cached: shared by both claims
        for name in ("mean", rule):
            cfg = digits_config(
                quick, method="robust", **{**ROBUST_RULES[name], "hparams.robust.attack": attack}
            )
            out[f"{attack}_{name}"] = train_digits(cfg)["final"]["test_accuracy"]
    return out


def _robust_passes(m, rule):
    robust_ok = all(m[f"{a}_{rule}"] >= m["clean_mean"] - 0.03 for a in ("sign_flip", "alie"))
    return robust_ok and m["sign_flip_mean"] <= m["clean_mean"] - 0.2


def _robust_ours(m, rule, label):
    return (
        f"no attack {100 * m['clean_mean']:.1f}%; sign flip: mean {100 * m['sign_flip_mean']:.1f}%, {label} "
        f"{100 * m[f'sign_flip_{rule}']:.1f}%; ALIE: mean {100 * m['alie_mean']:.1f}%, {label} "
        f"{100 * m[f'alie_{rule}']:.1f}%; {label} without attack {100 * m[f'clean_{rule}']:.1f}%"
    )


_ROBUST_CRITERION = (
    "f=2 of 8: the robust rule within 3 points of the attack-free mean under both sign flip (x4) and "
    "ALIE; the plain mean under sign flip >= 20 points below the attack-free mean (the attack is real)"
)


def _robust_config(q, rule_text):
    return (
        f"digits MLP, 8 workers (first 2 Byzantine), lr 0.05, {300 if q else 1000} steps; robust method: "
        f"mean (server momentum 0.9) vs {rule_text} on worker momentum 0.9 (optax.trace)"
    )


register(
    Claim(
        name="robust_monna_nnm",
        paper="Farhadkhani et al.: Robust Collaborative Learning with Linear Gradient Overhead (MoNNA, ICML "
        "2023); Allouah et al.: Fixing by Mixing (NNM, AISTATS 2023)",
        claim="worker momentum + nearest-neighbour mixing (then a trimmed mean) keeps training accurate "
        "with f Byzantine workers, where the plain mean breaks",
        paper_figure="MoNNA / NNM image-classification experiments: accuracy close to the attack-free run "
        "under ALIE, sign flipping, ... (their figures; no single number)",
        criterion=_ROBUST_CRITERION,
        config=lambda q: _robust_config(q, "aggregators.monna(2) (= NNM(2) then trimmed mean(2))"),
        run=lambda q: _robust(q, "monna"),
        passes=lambda m: _robust_passes(m, "monna"),
        ours=lambda m: _robust_ours(m, "monna", "MoNNA"),
    )
)

register(
    Claim(
        name="robust_centered_clip",
        paper="Karimireddy, He, Jaggi: Learning from History for Byzantine Robust Optimization (ICML 2021)",
        claim="centered clipping of worker momenta (started from the previous aggregate) is robust to f "
        "Byzantine workers, including time-coupled attacks such as ALIE",
        paper_figure="MNIST / CIFAR-10 with ALIE, IPM, sign flip: CC + momentum near the attack-free "
        "accuracy (their Table 2 / figures; numbers not re-checked here)",
        criterion=_ROBUST_CRITERION,
        config=lambda q: _robust_config(q, "centered_clip(tau=0.5, 3 iterations; the method's defaults)"),
        run=lambda q: _robust(q, "centered_clip"),
        passes=lambda m: _robust_passes(m, "centered_clip"),
        ours=lambda m: _robust_ours(m, "centered_clip", "CC"),
    )
)

# --------------------------------------------------------------------------- #
# Decentralized: gradient tracking vs D-SGD, CHOCO-SGD.


def _rel(x_w, x_star):
    x = np.asarray(x_w, np.float64)
    return float(np.max(np.linalg.norm(x - x_star, axis=-1)) / np.linalg.norm(x_star))


def _gradient_tracking(quick: bool) -> dict:
    a, b, x_star = heterogeneous_least_squares(n=8, m=20, d=10, seed=3)
    steps, lr = (1000, 0.05) if quick else (3000, 0.05)
    data = (jnp.asarray(a), jnp.asarray(b))
    dsgd = optax.chain(optax.sgd(lr), optdist.gossip("ring", "data"))
    gt = optax.chain(
        optdist.gradient_tracking("ring", "data"),
        optax.sgd(lr),
        optdist.gossip("ring", "data", order="combine_then_adapt"),
    )
    out = {"steps": steps}
    for name, tx in {"dsgd": dsgd, "gt": gt}.items():
        x_w, _, _ = run_full_batch(tx, ls_loss, jnp.zeros(10), data, steps)
        out[name] = _rel(x_w, x_star)
    return out


register(
    Claim(
        name="gradient_tracking_vs_dsgd",
        paper="Nedic, Olshevsky, Shi: DIGing (SIAM J. Optim. 2017); seed: Efficient Gradient Tracking "
        "Algorithms ... with Inexact Communication (VRA-DGT)",
        claim="with heterogeneous local objectives and a constant step, D-SGD stalls at a bias while "
        "gradient tracking converges (linearly) to the exact optimum",
        paper_figure="DIGing: geometric convergence for strongly convex objectives; VRA-DGT: O(1/k) with "
        "inexact communication (abstract)",
        criterion="every worker's relative distance to x*: gradient tracking <= 1e-3 and <= 0.01 x D-SGD's",
        config=lambda q: (
            "heterogeneous least squares, 8 workers on a ring, d=10, full gradients, SGD(0.05), "
            f"{1000 if q else 3000} steps; gossip(ring) vs gradient_tracking + gossip(combine_then_adapt)"
        ),
        run=_gradient_tracking,
        passes=lambda m: m["gt"] <= 1e-3 and m["gt"] <= 0.01 * m["dsgd"],
        ours=lambda m: (
            f"max_i ||x_i - x*||/||x*|| after {m['steps']} steps: D-SGD {m['dsgd']:.2e}, "
            f"gradient tracking {m['gt']:.1e}"
        ),
    )
)


def _choco(quick: bool) -> dict:
    d = 50
    a, b, x_star = heterogeneous_least_squares(n=8, m=80, d=d, seed=4)
    steps, lr = (2000, 0.02) if quick else (6000, 0.02)
    data = (jnp.asarray(a), jnp.asarray(b))
    out = {"steps": steps}
    for name, comp in {"dsgd": None, "choco": optdist.compressors.top_k(0.1)}.items():
        kw = {} if comp is None else {"consensus_step_size": 0.3}
        tx = optax.chain(optax.sgd(lr), optdist.gossip("ring", "data", comp, **kw))
        x_w, s_w, _ = run_full_batch(tx, ls_loss, jnp.zeros(d), data, steps)
        out[name] = _rel(x_w, x_star)
        out[name + "_bytes"] = int(np.asarray(optdist.bytes_sent(s_w))[0])
        # also tried (reported, not judged): 3x the steps, to tell a slower transient from a worse limit
        x_w, _, _ = run_full_batch(tx, ls_loss, jnp.zeros(d), data, 3 * steps)
        out[name + "_3x"] = _rel(x_w, x_star)
    return out


register(
    Claim(
        name="choco_sgd",
        paper="Koloskova, Stich, Jaggi: Decentralized Stochastic Optimization and Gossip Algorithms with "
        "Compressed Communication (CHOCO-SGD, ICML 2019)",
        claim="CHOCO-SGD with compressed gossip (top-k) converges like exact-gossip D-SGD while sending a "
        "fraction of the bytes",
        paper_figure="logistic-regression experiments: CHOCO-SGD with top-1% / rand-1% / qsgd converges "
        "about like exact D-SGD per iteration with far fewer bits (no single number; details not "
        "re-checked)",
        criterion="CHOCO (top-10%) max relative distance to x* <= 2 x exact-gossip D-SGD's, with <= 0.3 x "
        "its bytes",
        config=lambda q: (
            "heterogeneous least squares, 8 workers on a ring, d=50, full gradients, SGD(0.02), "
            f"{2000 if q else 6000} steps; gossip(ring) vs gossip(ring, top_k(0.1), consensus step 0.3)"
        ),
        run=_choco,
        passes=lambda m: m["choco"] <= 2 * m["dsgd"] and m["choco_bytes"] <= 0.3 * m["dsgd_bytes"],
        ours=lambda m: (
            f"max_i ||x_i - x*||/||x*||: D-SGD {m['dsgd']:.2e}, CHOCO {m['choco']:.2e}; bytes "
            f"{m['choco_bytes']:,} vs {m['dsgd_bytes']:,}; also tried 3x the steps: "
            f"D-SGD {m['dsgd_3x']:.2e}, CHOCO {m['choco_3x']:.2e}"
        ),
    )
)

# --------------------------------------------------------------------------- #
# Seeded SPSA: one byte per worker per step.


def _linear_loss(params, x, y):
    logits = x @ params["w"] + params["b"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _spsa(quick: bool) -> dict:
    from experiments import data as data_lib

    ds = data_lib.load_digits(0)
    n, batch = 8, 64
    steps = 1000 if quick else 4000
    tx = optax.chain(optdist.seeded_spsa("data", perturbation_scale=1e-3, clip=20.0), optax.sgd(0.02))
    params = {"w": jnp.zeros((64, 10)), "b": jnp.zeros(10)}

    def step(p, s, xb, yb):
        u, s = tx.update(None, s, p, loss_fn=lambda q: _linear_loss(q, xb, yb))
        return optax.apply_updates(p, u), s

    run = optdist.simulate(step, "data", jit=False)
    idx = np.random.default_rng(1).integers(0, len(ds.x_train), size=(steps, n, batch))

    @jax.jit
    def scan(carry, xs, ys):
        return jax.lax.scan(lambda c, b: (run(*c, *b), None), carry, (xs, ys))[0]

    p_w, s_w = scan(optdist.replicate((params, tx.init(params)), n), ds.x_train[idx], ds.y_train[idx])
    w0 = jax.tree_util.tree_map(lambda p: p[0], p_w)
    spread = max(float(jnp.max(jnp.abs(p - p[0]))) for p in jax.tree_util.tree_leaves(p_w))
    return {
        "steps": steps,
        "initial_loss": math.log(10.0),
        "final_loss": float(_linear_loss(w0, ds.x_test, ds.y_test)),
        "bytes_per_step": float(np.asarray(optdist.bytes_sent(s_w))[0]) / steps,
        "worker_spread": spread,
        "workers": n,
    }


register(
    Claim(
        name="seeded_spsa",
        paper="Zelikman et al.: Just One Byte (per gradient): Low-Bandwidth Decentralized LM Finetuning "
        "Using Shared Randomness (2023)",
        claim="workers exchange one byte (an int8 projected gradient) per step, rebuild each other's "
        "perturbations from shared seeds, stay identical and still train",
        paper_figure="'machines only exchange single-byte projected gradients' (abstract); proof-of-concept "
        "fine-tuning runs",
        criterion="bytes per worker per step = 1 byte to each of the n-1 peers; all workers' parameters "
        "identical; test loss <= 0.7 x the initial ln(10)",
        config=lambda q: (
            f"digits logistic regression (d=650), 8 workers x 64, seeded_spsa(eps 1e-3, int8, clip "
            f"20) + SGD(0.02), {1000 if q else 4000} steps"
        ),
        run=_spsa,
        passes=lambda m: (
            m["bytes_per_step"] == m["workers"] - 1
            and m["worker_spread"] == 0.0
            and m["final_loss"] <= 0.7 * m["initial_loss"]
        ),
        ours=lambda m: (
            f"{m['bytes_per_step']:g} B/worker/step, worker spread {m['worker_spread']:g}, test loss "
            f"{m['initial_loss']:.3f} -> {m['final_loss']:.3f}"
        ),
    )
)
