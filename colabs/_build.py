"""Writes the six optdist Colab notebooks in this folder (run: ``python colabs/_build.py``).

The notebooks are generated so they stay reviewable (this file is the source) and are committed without
outputs. ``tests/test_notebooks.py`` executes every one in a real Jupyter kernel started outside the
repository, as a user's Colab would.
"""

from __future__ import annotations

import pathlib
import sys
import textwrap

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = pathlib.Path(__file__).resolve().parent


def md(text: str):
    return new_markdown_cell(textwrap.dedent(text).strip("\n"))


def code(text: str):
    return new_code_cell(textwrap.dedent(text).strip("\n"))


INSTALL_MD = md(
    """
    **Running this in Colab.** The first code cell installs optdist when (and only when) it runs in
    Colab; anywhere else it does nothing, so install optdist yourself first
    (`pip install -e ".[experiments]"` from a clone of the repository). In Colab, put the repository at
    `/content/optdist` before running it, e.g. `!git clone <the repository's URL> /content/optdist` in a
    cell, or upload a zip of it and unzip it there; or set the environment variable `OPTDIST_SOURCE` to
    anything `pip install` accepts (a `git+https://...` URL, a wheel). The notebook needs only optdist,
    numpy, matplotlib and scikit-learn (all but optdist preinstalled in Colab) and runs on a CPU runtime.
    """
)

INSTALL = code(
    """
    # Colab only: install optdist from a checkout of its repository (a no-op anywhere else).
    import importlib.util
    import os
    import subprocess
    import sys

    if "google.colab" in sys.modules and importlib.util.find_spec("optdist") is None:
        source = os.environ.get("OPTDIST_SOURCE", "/content/optdist")
        if "://" not in source and not os.path.exists(source):
            raise RuntimeError(
                f"optdist is not installed and {source!r} does not exist: clone the repository first "
                "(!git clone <the repository's URL> /content/optdist) or set OPTDIST_SOURCE to a pip spec."
            )
        subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", source])
    """
)

DIGITS = code(
    '''
    # Data: scikit-learn's bundled 8x8 digits (1797 images, no download), and a small MLP in plain JAX.
    digits = load_digits()
    x_all = (digits.data / 16.0).astype(np.float32)
    y_all = digits.target.astype(np.int32)
    order = np.random.default_rng(0).permutation(len(x_all))
    x_train, y_train = x_all[order[:1500]], y_all[order[:1500]]
    x_test, y_test = x_all[order[1500:]], y_all[order[1500:]]


    def init_mlp(key, sizes=(64, 64, 10)):
        keys = jax.random.split(key, len(sizes) - 1)
        return [
            {"w": jax.random.normal(k, (m, n)) * np.sqrt(2.0 / m), "b": jnp.zeros(n)}
            for k, m, n in zip(keys, sizes[:-1], sizes[1:])
        ]


    def mlp(params, x):
        for layer in params[:-1]:
            x = jax.nn.relu(x @ layer["w"] + layer["b"])
        return x @ params[-1]["w"] + params[-1]["b"]


    def loss_fn(params, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(mlp(params, x), y).mean()


    @jax.jit
    def test_metrics(params):
        logits = mlp(params, x_test)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y_test).mean()
        return loss, (logits.argmax(-1) == y_test).mean()


    print(f"train {x_train.shape}, test {x_test.shape}, MLP parameters:",
          sum(p.size for p in jax.tree_util.tree_leaves(init_mlp(jax.random.key(0)))))
    '''
)

IMPORTS = code(
    """
    import functools
    import time

    import jax
    import jax.numpy as jnp
    import matplotlib.pyplot as plt
    import numpy as np
    import optax
    from sklearn.datasets import load_digits

    import optdist

    print("jax", jax.__version__, "| optdist", optdist.__version__, "| devices", jax.devices())
    """
)

TRAIN = code(
    '''
    NUM_WORKERS, BATCH = 8, 32  # 8 simulated workers, 32 examples each per step


    def train(tx, steps=200, seed=0, log_every=10):
        """Trains the MLP with the per-worker transform `tx` on simulated workers; returns a history."""
        params = init_mlp(jax.random.key(seed))

        def train_step(params, opt_state, xb, yb):  # one worker's view
            loss, grads = jax.value_and_grad(loss_fn)(params, xb, yb)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        step = optdist.simulate(train_step, "data", jit=False)  # vmap over a leading worker axis

        @jax.jit
        def run_chunk(params_w, state_w, xs, ys):  # `log_every` steps as one compiled lax.scan
            def body(carry, batch):
                params_w, state_w, loss = step(*carry, *batch)
                return (params_w, state_w), loss.mean()

            (params_w, state_w), losses = jax.lax.scan(body, (params_w, state_w), (xs, ys))
            return params_w, state_w, losses.mean()

        params_w, state_w = optdist.replicate((params, tx.init(params)), NUM_WORKERS)
        # batches[t, i] is worker i's batch at step t (optdist.shard_batch splits one batch the same way)
        idx = np.random.default_rng(seed).integers(0, len(x_train), size=(steps, NUM_WORKERS, BATCH))
        hist = {"step": [], "loss": [], "bytes": []}
        start = time.perf_counter()
        for t in range(0, steps, log_every):
            chunk = idx[t : t + log_every]
            params_w, state_w, loss = run_chunk(params_w, state_w, x_train[chunk], y_train[chunk])
            hist["step"].append(t + len(chunk))
            hist["loss"].append(float(loss))  # mean over the chunk's steps and the workers
            hist["bytes"].append(int(optdist.bytes_sent(state_w)[0]))  # worker 0's bytes so far
        mean_params = jax.tree_util.tree_map(lambda p: p.mean(0), params_w)
        hist["test_loss"], hist["test_acc"] = (float(v) for v in test_metrics(mean_params))
        hist["seconds"] = time.perf_counter() - start
        return hist
    '''
)


def quickstart():
    return [
        md(
            """
            # optdist quickstart: compressed gradients with Adam on 8 simulated workers

            optdist's methods are ordinary `optax` transforms that receive **one worker's** gradient and
            talk to the other workers over a named axis (`"data"`). The same train step runs on simulated
            workers on one CPU (`optdist.simulate`, a `vmap`), on devices (`optdist.data_parallel`, a
            `shard_map`) or under `pmap`; and every communicating transform counts, exactly, the bytes a
            worker sends, which `optdist.bytes_sent(state)` reads back from the optimizer state.

            Below: data-parallel training of a small MLP on scikit-learn's digits with Adam behind five
            different gradient exchanges, plotted as loss against bytes sent per worker.
            """
        ),
        INSTALL_MD,
        INSTALL,
        IMPORTS,
        DIGITS,
        md(
            """
            ## A train step, from one worker's point of view

            `train_step` computes the worker's own gradient and hands it to the transform; the transform
            does the communication. `optdist.replicate` stacks parameters and optimizer state along a
            leading worker axis, and `optdist.simulate` maps the step over it (the README shows the same
            step under `optdist.data_parallel` on devices). To keep Python out of the loop, `train` runs
            10 steps at a time as one compiled `lax.scan` and reads the byte counter in between.
            """
        ),
        TRAIN,
        md(
            r"""
            ## Five ways to exchange gradients

            With $n$ workers and a $d$-element float32 gradient:

            * **all-reduce mean** (`optdist.mean_gradients`): the exact mean $\frac1n\sum_i g_i$; a ring
              all-reduce sends $2\frac{n-1}{n}\cdot 4d$ bytes per worker and step.
            * **PowerSGD rank 2** (`optdist.powersgd`): each weight matrix $M\in\mathbb R^{a\times b}$ is
              replaced by a rank-2 approximation $PQ^\top$ from one step of subspace iteration
              ($P = MQ$, orthogonalize, $Q = M^\top P$, two all-reduces of $r(a+b)$ numbers) with error
              feedback [Vogels et al. 2019].
            * **top-k 1% + EF** (`optdist.compressed_mean(optdist.compressors.top_k(0.01), ...,
              feedback="ef")`): each worker sends its 1% largest entries (values and indices) of
              $p_i = g_i + e_i$ and keeps the rest as the error $e_i \leftarrow p_i - C(p_i)$
              [Stich et al. 2018; Seide et al. 2014].
            * **scaled sign + EF** (`compressors.sign()`): one bit per entry plus a scale
              $\|p\|_1/d$ [Bernstein et al. 2018; Karimireddy et al. 2019].
            * **QSGD 8-bit** (`compressors.qsgd()`): unbiased stochastic rounding to 127 levels per
              bucket, stored as int8 [Alistarh et al. 2017]. Its messages cannot be summed in transit, so
              they are all-gathered: a worker sends its payload to each of the $n-1$ others.

            Adam runs after the exchange, on the same (identical on every worker) aggregate.
            """
        ),
        code(
            """
            lr = 3e-3
            methods = {
                "all-reduce mean": optdist.mean_gradients("data"),
                "PowerSGD rank 2": optdist.powersgd(2, "data"),
                "top-k 1% + EF": optdist.compressed_mean(optdist.compressors.top_k(0.01), "data", feedback="ef"),
                "sign + EF": optdist.compressed_mean(optdist.compressors.sign(), "data", feedback="ef"),
                "QSGD 8-bit": optdist.compressed_mean(optdist.compressors.qsgd(), "data"),
            }
            runs = {}
            for name, exchange in methods.items():
                runs[name] = train(optax.chain(exchange, optax.adam(lr)), steps=200)
                r = runs[name]
                print(f"{name:16s} train loss {r['loss'][-1]:.3f}  test acc {r['test_acc']:.3f}  "
                      f"bytes/worker {r['bytes'][-1] / 2**20:8.3f} MiB  ({r['seconds']:.1f} s)")
            """
        ),
        md(
            r"""
            The counts are exact. For the all-reduce, every array of $E$ float32 entries costs a worker
            $2(n-1)\lceil E/n\rceil\cdot 4$ bytes per step (ring reduce-scatter + all-gather):
            """
        ),
        code(
            """
            leaves = jax.tree_util.tree_leaves(init_mlp(jax.random.key(0)))
            ring = sum(2 * (NUM_WORKERS - 1) * -(-p.size // NUM_WORKERS) * 4 for p in leaves)
            per_step = runs["all-reduce mean"]["bytes"][0] / runs["all-reduce mean"]["step"][0]
            print(f"all-reduce: {per_step:.0f} bytes per step and worker; ring formula: {ring}")
            assert per_step == ring
            for name, r in runs.items():
                print(f"{name:16s} {runs['all-reduce mean']['bytes'][-1] / max(r['bytes'][-1], 1):6.1f}x fewer bytes")
            """
        ),
        md(
            """
            Compression ratios per message are not savings per worker: top-k 1% sends values *and*
            indices, and, like sign and QSGD, it is all-gathered ($n-1$ messages per worker) where the
            fp32 mean is all-reduced ($\\approx 2$ messages' worth). At $n=8$, 8-bit QSGD saves nothing
            over the fp32 ring all-reduce; PowerSGD's factors *are* summable, so it keeps the all-reduce.
            """
        ),
        md("## Loss against bytes sent"),
        code(
            """
            fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(12, 4.2))
            for name, r in runs.items():
                ax0.plot(r["bytes"], r["loss"], label=name)
                ax1.plot(r["step"], r["loss"], label=name)
            ax0.set(xscale="log", yscale="log", xlabel="bytes sent per worker", ylabel="train loss (batch)",
                    title="Digits MLP, 8 workers: loss vs communication")
            ax1.set(yscale="log", xlabel="step", ylabel="train loss (batch)", title="Loss vs steps")
            ax0.legend()
            ax0.grid(True, which="both", alpha=0.3)
            ax1.grid(True, which="both", alpha=0.3)
            plt.tight_layout()
            plt.show()
            """
        ),
        md(
            """
            PowerSGD, top-k and sign send about 10× fewer bytes per step. Per step they lag the exact mean
            (compression adds error), but at any fixed byte budget they are far ahead; 8-bit QSGD tracks the
            exact mean per step but, all-gathered, saves no bytes at $n = 8$. Next:
            `02_powersgd_and_error_feedback` (why error feedback matters), `03_shampoo`,
            `04_diloco_and_friends`, `05_byzantine_robustness`, `06_decentralized_and_zeroth_order`.

            **References.** Vogels, Karimireddy, Jaggi, *PowerSGD*, NeurIPS 2019 ·
            Stich, Cordonnier, Jaggi, *Sparsified SGD with memory*, NeurIPS 2018 · Seide et al., *1-bit SGD*,
            Interspeech 2014 · Bernstein et al., *signSGD*, ICML 2018 · Karimireddy et al.,
            *Error feedback fixes SignSGD*, ICML 2019 · Alistarh et al., *QSGD*, NeurIPS 2017.
            """
        ),
    ]


def powersgd_and_ef():
    return [
        md(
            r"""
            # PowerSGD and error feedback

            Two facts about compressed gradient exchange, checked on small problems:

            1. **PowerSGD's rank trades bytes for accuracy smoothly**, and rank $r$ is exact on gradients
               of rank $\le r$.
            2. **Biased compressors need error feedback.** Plain compressed SGD with top-k can *diverge*
               on a strongly convex problem for every step size; with error feedback (EF) or EF21 it
               converges [Beznosikov et al. 2020; Karimireddy et al. 2019; Richtárik et al. 2021].
            """
        ),
        INSTALL_MD,
        INSTALL,
        IMPORTS,
        md(
            r"""
            ## PowerSGD in one equation

            For a gradient matrix $M \in \mathbb R^{a\times b}$ (mean over workers $M = \frac1n\sum_i M_i$)
            and a warm-started $Q\in\mathbb R^{b\times r}$:
            $$P = \tfrac1n\textstyle\sum_i M_i Q \;(\text{all-reduce}),\quad \hat P = \mathrm{orth}(P),\quad
            Q = \tfrac1n\textstyle\sum_i M_i^\top \hat P\;(\text{all-reduce}),\quad \hat M = \hat P Q^\top .$$
            A worker sends $r(a+b)$ numbers instead of $ab$. `optdist.powersgd(rank, axis)` includes the
            error feedback of the paper ($e_i \leftarrow M_i + e_i - \hat M$). A gradient of rank $\le r$
            is recovered exactly (after the warm start has found its column space):
            """
        ),
        code(
            """
            n, a, b, r = 4, 48, 32, 2
            key_u, key_v = jax.random.split(jax.random.key(0))
            # every worker's gradient lies in the same rank-2 space (different coefficients)
            u = jax.random.normal(key_u, (a, r))
            v = jax.random.normal(key_v, (n, r, b))
            grads_w = {"w": jnp.einsum("ar,nrb->nab", u, v)}
            exact = grads_w["w"].mean(0)

            tx = optdist.powersgd(r, "data")
            step = optdist.simulate(lambda g, s: tx.update(g, s), "data")
            state_w = optdist.replicate(tx.init({"w": exact}), n)
            for t in range(3):
                out_w, state_w = step(grads_w, state_w)
                rel = float(jnp.linalg.norm(out_w["w"][0] - exact) / jnp.linalg.norm(exact))
                print(f"step {t}: relative error of the rank-{r} estimate {rel:.2e}")
            print("bytes per worker per step:", int(optdist.bytes_sent(state_w)[0]) // 3,
                  f"(a full all-reduce of {a}x{b} float32: {2 * (n - 1) / n * 4 * a * b:.0f})")
            """
        ),
        md("## Rank sweep on the digits MLP (8 simulated workers, SGD with momentum)"),
        DIGITS,
        TRAIN,
        code(
            """
            sgd = optax.sgd(0.1, momentum=0.9)
            rank_runs = {"exact mean": train(optax.chain(optdist.mean_gradients("data"), sgd), steps=200)}
            for rank in (1, 2, 4, 8):
                rank_runs[f"rank {rank}"] = train(optax.chain(optdist.powersgd(rank, "data"), sgd), steps=200)
            for name, h in rank_runs.items():
                print(f"{name:10s} train loss {h['loss'][-1]:.3f}  test acc {h['test_acc']:.3f}  "
                      f"MiB/worker {h['bytes'][-1] / 2**20:.3f}")
            """
        ),
        code(
            """
            fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(12, 4.2))
            for name, h in rank_runs.items():
                ax0.plot(h["step"], h["loss"], label=name)
            ax0.set(yscale="log", xlabel="step", ylabel="train loss (batch)", title="PowerSGD rank sweep: loss vs step")
            ax0.legend()
            names = list(rank_runs)
            mib = [rank_runs[k]["bytes"][-1] / 2**20 for k in names]
            acc = [rank_runs[k]["test_acc"] for k in names]
            ax1.scatter(mib, acc)
            for k, xv, yv in zip(names, mib, acc):
                ax1.annotate(k, (xv, yv), textcoords="offset points", xytext=(4, 4))
            ax1.set(xscale="log", xlabel="MiB sent per worker (200 steps)", ylabel="test accuracy",
                    title="Accuracy vs communication")
            for ax in (ax0, ax1):
                ax.grid(True, which="both", alpha=0.3)
            plt.tight_layout()
            plt.show()
            """
        ),
        md(
            r"""
            ## The biased-compressor counterexample

            Three workers, $x\in\mathbb R^3$, $f_i(x) = \langle a_i, x\rangle^2 + \tfrac12\|x\|^2$ with
            $a_i = -4e_i + 2.5(\mathbf 1 - e_i)$ (a variant of Beznosikov et al. 2020, Example 1, chosen so
            that top-1 has no ties). $f = \frac13\sum_i f_i$ is strongly convex with minimum $x^\star = 0$.
            At $x = t\mathbf 1$ worker $i$'s gradient is $t(-7e_i + 6(\mathbf 1 - e_i))$: its largest entry
            is the $-7$ on its own coordinate, so top-1 sends $-7t\,e_i$, the workers' mean is
            $-\tfrac73 t\mathbf 1$, and compressed gradient descent moves *away* from the minimum,
            $x \leftarrow (1 + \tfrac73\gamma)x$, for every step size $\gamma>0$ — although the true mean
            gradient $\tfrac53 t\mathbf 1$ points inward.

            Error feedback [Seide et al. 2014; Stich et al. 2018; Karimireddy et al. 2019]
            ($p_i = \gamma g_i + e_i$, send $C(p_i)$, keep $e_i = p_i - C(p_i)$; here applied to the
            gradient before the learning rate, as `compressed_mean(..., feedback="ef")` does) accumulates
            the entries it did not send until they are large enough to be sent; EF21 [Richtárik et al.
            2021] compresses the *change* $g_i - h_i$ of a per-worker estimate $h_i$.
            Each worker's "data" is its row $a_i$, passed as its batch.
            """
        ),
        code(
            """
            a = jnp.full((3, 3), 2.5) - 6.5 * jnp.eye(3)  # row i: -4 on coordinate i, 2.5 elsewhere


            def f_i(x, a_i):
                return jnp.dot(a_i, x) ** 2 + 0.5 * jnp.dot(x, x)


            def run_quadratic(exchange, steps=300, lr=0.03):
                tx = optax.chain(exchange, optax.sgd(lr))
                x0 = jnp.ones(3)

                def step(x, s, a_i):
                    g = jax.grad(f_i)(x, a_i)
                    u, s = tx.update(g, s, x)
                    return optax.apply_updates(x, u), s

                run = optdist.simulate(step, "data")
                x_w, s_w = optdist.replicate((x0, tx.init(x0)), 3)
                dist = []
                for _ in range(steps):
                    x_w, s_w = run(x_w, s_w, a)
                    dist.append(float(jnp.linalg.norm(x_w[0])))
                return np.array(dist)


            top1 = optdist.compressors.top_k(1 / 3)  # k = ceil(d/3) = 1 of 3 entries
            curves = {
                "exact mean (no compression)": run_quadratic(optdist.mean_gradients("data")),
                "top-1, no error feedback": run_quadratic(optdist.compressed_mean(top1, "data")),
                "top-1 + EF": run_quadratic(optdist.compressed_mean(top1, "data", feedback="ef")),
                "top-1 + EF21": run_quadratic(optdist.compressed_mean(top1, "data", feedback="ef21")),
            }
            for name, c in curves.items():
                print(f"{name:28s} ||x_300 - x*|| = {c[-1]:.3e}")
            assert curves["top-1, no error feedback"][-1] > 1e3 and curves["top-1 + EF"][-1] < 1e-2
            """
        ),
        code(
            """
            plt.figure(figsize=(7, 4.2))
            for name, c in curves.items():
                plt.plot(np.arange(1, len(c) + 1), c, label=name)
            plt.yscale("log")
            plt.xlabel("step")
            plt.ylabel(r"$\\|x_t - x^\\star\\|$")
            plt.title("Top-1 compressed GD diverges; error feedback fixes it")
            plt.legend()
            plt.grid(True, which="both", alpha=0.3)
            plt.show()
            """
        ),
        md(
            """
            ## The same on the digits MLP: top-k 1% with and without error feedback
            """
        ),
        code(
            """
            topk = optdist.compressors.top_k(0.01)
            ef_runs = {"exact mean": rank_runs["exact mean"]}
            for fb in (None, "ef", "ef21"):
                ef_runs[f"top-k 1%, feedback={fb}"] = train(
                    optax.chain(optdist.compressed_mean(topk, "data", feedback=fb), sgd), steps=200)
            plt.figure(figsize=(7, 4.2))
            for name, h in ef_runs.items():
                plt.plot(h["step"], h["loss"], label=f"{name} (test acc {h['test_acc']:.2f})")
            plt.yscale("log")
            plt.xlabel("step")
            plt.ylabel("train loss (batch)")
            plt.title("Digits MLP, SGD+momentum: top-k 1% with and without feedback")
            plt.legend()
            plt.grid(True, which="both", alpha=0.3)
            plt.show()
            """
        ),
        md(
            """
            On this small, benign problem the three top-k variants stay close over 200 steps: plain top-k
            with momentum does not fail here the way it does on the counterexample, which needs workers
            whose largest entries disagree with the mean. The gap opens on longer runs (the repository's
            main job, `python -m experiments.compare`, reports 98.3% test accuracy with EF vs 97.5%
            without at top-k 1%; see BENCHMARKS.md).
            """
        ),
        md(
            """
            **References.** Vogels, Karimireddy, Jaggi, *PowerSGD: Practical low-rank gradient compression
            for distributed optimization*, NeurIPS 2019 · Beznosikov, Horváth, Richtárik, Safaryan, *On
            biased compression for distributed learning*, 2020 (JMLR 2023) · Karimireddy, Rebjock, Stich,
            Jaggi, *Error feedback fixes SignSGD and other gradient compression schemes*, ICML 2019 ·
            Stich, Cordonnier, Jaggi, *Sparsified SGD with memory*, NeurIPS 2018 · Seide, Fu, Droppo, Li,
            Yu, *1-bit SGD*, Interspeech 2014 · Richtárik, Sokolov, Fatkhullin, *EF21: a new, simpler,
            theoretically better, and practically faster error feedback*, NeurIPS 2021.
            """
        ),
    ]


def shampoo_nb():
    return [
        md(
            r"""
            # Shampoo: matrix roots and Kronecker-factored preconditioning

            For a weight matrix $W\in\mathbb R^{m\times n}$ with gradients $G_t$, Shampoo [Gupta et al.
            2018] keeps two statistics and preconditions with their inverse fourth roots:
            $$L_t = \epsilon I + \sum_{s\le t} G_s G_s^\top,\qquad R_t = \epsilon I + \sum_{s\le t} G_s^\top G_s,
            \qquad W \leftarrow W - \eta\, L_t^{-1/4} G_t R_t^{-1/4}.$$
            $L^{-1/4}\otimes R^{-1/4}$ approximates full-matrix AdaGrad's $(\sum g g^\top)^{-1/2}$ at the
            cost of an $m\times m$ and an $n\times n$ matrix. The scalable variant [Anil et al. 2020]
            blocks large matrices, recomputes roots every few steps, grafts the step size of a simpler
            optimizer (AdaGrad / RMSProp / Adam) onto Shampoo's direction, and may use
            exponent $-1/2$ per side (`exponent_override=2`). `optdist.shampoo` implements it.
            """
        ),
        INSTALL_MD,
        INSTALL,
        IMPORTS,
        md(
            r"""
            ## Inverse $p$-th roots

            `optdist.matrix_inverse_pth_root(A, p, method=...)` computes $(A+\epsilon I)^{-1/p}$ for a
            symmetric PSD $A$ by an eigendecomposition or by the coupled Newton iteration [Guo & Higham
            2006] (matrix products only: what accelerators are good at). We compare both against a float64
            NumPy reference on a matrix with condition number $10^4$, and plot what the root does to the
            spectrum.
            """
        ),
        code(
            """
            m = 64
            rng = np.random.default_rng(0)
            q, _ = np.linalg.qr(rng.normal(size=(m, m)))
            eigs = np.logspace(0, -4, m)  # condition number 1e4
            a64 = (q * eigs) @ q.T
            a32 = jnp.asarray(a64, jnp.float32)
            print(f"{'p':>2} {'method':>15} {'rel. error vs float64':>22}")
            roots = {}
            for p in (2, 4, 8):
                w, v = np.linalg.eigh(a64 + 1e-6 * eigs.max() * np.eye(m))  # same ridge as relative_epsilon
                ref = (v * w ** (-1.0 / p)) @ v.T
                for method in ("eigh", "coupled_newton"):
                    root, err = optdist.matrix_inverse_pth_root(a32, p, method=method)
                    roots[p, method] = np.asarray(root, np.float64)
                    rel = np.linalg.norm(roots[p, method] - ref) / np.linalg.norm(ref)
                    print(f"{p:>2} {method:>15} {rel:22.2e}")
            """
        ),
        code(
            """
            plt.figure(figsize=(6.5, 4.2))
            for p in (2, 4, 8):
                mapped = np.diag(q.T @ roots[p, "coupled_newton"] @ q)
                plt.loglog(eigs, mapped, "o", ms=3, label=f"coupled Newton, p={p}")
                plt.loglog(eigs, eigs ** (-1.0 / p), "k-", lw=0.8)
            plt.xlabel(r"eigenvalue $\\lambda$ of $A$")
            plt.ylabel(r"eigenvalue of $A^{-1/p}$ (lines: $\\lambda^{-1/p}$)")
            plt.title("Inverse p-th roots compress a 1e4 spectrum")
            plt.legend()
            plt.grid(True, which="both", alpha=0.3)
            plt.show()
            """
        ),
        md(
            r"""
            ## An ill-conditioned matrix problem: Shampoo vs AdamW

            $\min_W \frac12\|A W B - C\|_F^2$ with $A$, $B$ of condition number 100 (a toy version of a
            layer whose inputs and output gradients are both correlated). The Hessian is $(B B^\top)\otimes
            (A^\top A)$, exactly the Kronecker structure Shampoo's $L\otimes R$ models, while Adam's
            diagonal preconditioner cannot undo the rotation. Each optimizer gets its best learning rate
            from the grid {0.03, 0.1, 0.3, 1}.
            """
        ),
        code(
            """
            def conditioned(key, n, cond):
                q, _ = jnp.linalg.qr(jax.random.normal(key, (n, n)))
                return (q * jnp.logspace(0, -np.log10(cond), n)) @ q.T


            ka, kb, kc = jax.random.split(jax.random.key(1), 3)
            A, B = conditioned(ka, 24, 100.0), conditioned(kb, 16, 100.0)
            W_star = jax.random.normal(kc, (24, 16))
            C = A @ W_star @ B


            def matrix_loss(w):
                return jnp.sum((A @ w @ B - C) ** 2) / jnp.sum(C**2)  # 1.0 at W = 0


            LRS = jnp.array([0.03, 0.1, 0.3, 1.0])


            def run_matrix(tx, steps=300):
                # Losses [len(LRS), steps]. `tx` has learning rate 1 and we scale its update by lr (which is
                # what the optimizer's own lr does), so one compiled program trains the whole grid (vmap).

                def one(lr):
                    def body(carry, _):
                        w, s = carry
                        loss, g = jax.value_and_grad(matrix_loss)(w)
                        u, s = tx.update(g, s, w)
                        return (w + lr * u, s), loss

                    w0 = jnp.zeros((24, 16))
                    return jax.lax.scan(body, (w0, tx.init(w0)), None, length=steps)[1]

                return np.asarray(jax.jit(jax.vmap(one))(LRS))


            candidates = {
                "AdamW": optax.adamw(1.0, weight_decay=0.0),
                "Shampoo (AdaGrad graft)": optdist.shampoo(1.0, block_size=64),
                "Shampoo (Adam graft, beta2=0.99)": optdist.shampoo(1.0, block_size=64, grafting="adam", beta2=0.99),
            }
            best = {}
            for name, tx in candidates.items():
                curves = run_matrix(tx)
                i = int(np.nanargmin(np.where(np.isfinite(curves[:, -1]), curves[:, -1], np.nan)))
                best[name] = (float(LRS[i]), curves[i])
                print(f"{name:34s} best lr {float(LRS[i]):g}: relative loss {curves[i, 99]:.2e} at step 100, "
                      f"{curves[i, -1]:.2e} at step 300")
            """
        ),
        code(
            """
            plt.figure(figsize=(7, 4.2))
            for name, (lr, curve) in best.items():
                plt.plot(curve, label=f"{name}, lr={lr:g}")
            plt.yscale("log")
            plt.xlabel("step")
            plt.ylabel(r"$\\|AWB-C\\|^2 / \\|C\\|^2$")
            plt.title("Ill-conditioned matrix regression: Shampoo vs AdamW")
            plt.legend()
            plt.grid(True, which="both", alpha=0.3)
            plt.show()
            """
        ),
        md(
            """
            With AdaGrad grafting and $\\beta_2 = 1$ (statistics summed over all steps, the original
            algorithm) Shampoo's steps shrink over time and it trails AdamW on this deterministic problem;
            with exponential moving averages ($\\beta_2 = 0.99$) and Adam grafting it reaches a much lower
            loss than AdamW in the same number of steps.
            """
        ),
        md(
            """
            ## Digits MLP on 8 simulated workers

            Shampoo is a per-worker optax transform like any other: behind `optdist.mean_gradients` every
            worker preconditions the same averaged gradient, so the parameters stay identical.
            (`optdist.shampoo(..., axis_name="data")` would also split the root computations across
            workers.)
            """
        ),
        DIGITS,
        TRAIN,
        code(
            """
            digit_runs = {
                "AdamW 3e-3": train(optax.chain(optdist.mean_gradients("data"), optax.adamw(3e-3, weight_decay=1e-4))),
                "Shampoo 3e-3 (Adam graft, beta2=0.99)": train(optax.chain(
                    optdist.mean_gradients("data"),
                    optdist.shampoo(3e-3, block_size=64, grafting="adam", beta2=0.99))),
            }
            plt.figure(figsize=(7, 4.2))
            for name, h in digit_runs.items():
                plt.plot(h["step"], h["loss"], label=f"{name} (test acc {h['test_acc']:.3f})")
            plt.yscale("log")
            plt.xlabel("step")
            plt.ylabel("train loss (mean over 10 steps)")
            plt.title("Digits MLP, 8 workers: Shampoo vs AdamW")
            plt.legend()
            plt.grid(True, which="both", alpha=0.3)
            plt.show()
            """
        ),
        md(
            """
            On this small, well-conditioned MLP Shampoo (at AdamW's learning rate, untuned) gives no gain:
            the curvature it models matters on larger layers. On the repository's char-level transformer
            (`--config=experiments/configs/charlm_shampoo.py`) Shampoo reaches AdamW's 1000-step
            validation loss in 550 steps (BENCHMARKS.md).
            """
        ),
        md(
            """
            **References.** Gupta, Koren, Singer, *Shampoo: Preconditioned stochastic tensor optimization*,
            ICML 2018 · Anil, Gupta, Koren, Regan, Singer, *Scalable second order optimization for deep
            learning*, 2020 · Guo, Higham, *A Schur–Newton method for the matrix p-th root and its
            inverse*, SIAM J. Matrix Anal. Appl. 2006 · Shi et al., *A distributed data-parallel PyTorch
            implementation of the distributed Shampoo optimizer*, 2023.
            """
        ),
    ]


def diloco_nb():
    return [
        md(
            r"""
            # DiLoCo and friends: communicate every $H$ steps

            Local SGD / DiLoCo [Stich 2019; Douillard et al. 2023] let each worker take $H$ inner steps
            on its own, then synchronize once. With anchor $\theta$ and worker parameters $\theta_i$ after
            $H$ inner AdamW steps, the outer step treats the averaged displacement as a gradient:
            $$\Delta = \tfrac1n\textstyle\sum_i(\theta - \theta_i),\qquad
            \theta \leftarrow \mathrm{OuterOpt}(\theta, \Delta)\quad(\text{Nesterov SGD, lr } 0.7,
            \text{ momentum } 0.9),$$
            and every worker restarts from the new $\theta$. One all-reduce every $H$ steps: $H\times$ fewer
            bytes. The pseudo-gradient $\Delta$ can itself be compressed: `optdist.outer_loop(inner,
            outer, H, axis, aggregator=...)` (and `optdist.diloco(..., aggregator=...)`) takes any
            aggregator of `optdist.aggregation`, e.g. top-k with error feedback,
            `optdist.aggregation.compressed(optdist.compressors.top_k(0.01), feedback="ef")`.
            """
        ),
        INSTALL_MD,
        INSTALL,
        IMPORTS,
        DIGITS,
        TRAIN,
        md(
            """
            ## The $H$ sweep

            Baseline: synchronous data-parallel AdamW (an all-reduce every step). DiLoCo:
            `optdist.diloco(inner_lr, outer_lr=0.7, outer_momentum=0.9, sync_every=H, axis_name="data")`.
            All runs take 300 inner steps, so $H=50$ synchronizes 6 times.
            """
        ),
        code(
            """
            STEPS = 300
            sweep = {"sync AdamW (H=1)": train(
                optax.chain(optdist.mean_gradients("data"), optax.adamw(3e-3, weight_decay=1e-4)), steps=STEPS)}
            for H in (5, 20, 50):
                sweep[f"DiLoCo H={H}"] = train(
                    optdist.diloco(3e-3, outer_lr=0.7, outer_momentum=0.9, sync_every=H, axis_name="data",
                                   inner_weight_decay=1e-4), steps=STEPS)
            for name, h in sweep.items():
                print(f"{name:18s} test loss {h['test_loss']:.3f}  test acc {h['test_acc']:.3f}  "
                      f"MiB/worker {h['bytes'][-1] / 2**20:.3f}")
            """
        ),
        md(
            """
            ## Compressed pseudo-gradients

            The outer loop's `aggregator=` replaces the exact all-reduce of $\\Delta$ by any aggregator
            (`optdist.aggregation.compressed(compressor, feedback=...)`, `.powersgd(rank)`, `.robust(...)`;
            the same objects `optdist.compressed_mean` / `optdist.powersgd` wrap for per-step gradients): sparse (top-k) and 1-bit (scaled sign) pseudo-gradients with error feedback (the
            residual of each round is kept per worker and added to the next round's $\\Delta_i$), or
            PowerSGD. Quantized messages are all-gathered, so an 8-bit quantizer (QSGD) would save nothing
            at $n = 8$ over the fp32 ring all-reduce; 1-bit sign does.
            """
        ),
        code(
            """
            H = 20
            inner = optax.adamw(3e-3, weight_decay=1e-4)
            outer = optax.sgd(0.7, momentum=0.9, nesterov=True)
            agg = optdist.aggregation  # aggregators: what an outer loop (or a gradient exchange) averages with
            aggregators = {
                "top-k 10% + EF": agg.compressed(optdist.compressors.top_k(0.1), feedback="ef"),
                "top-k 1% + EF": agg.compressed(optdist.compressors.top_k(0.01), feedback="ef"),
                "sign + EF": agg.compressed(optdist.compressors.sign(), feedback="ef"),
                "PowerSGD rank 4": agg.powersgd(4),
            }
            compressed = {}
            for name, agg in aggregators.items():
                compressed[f"DiLoCo H={H}, {name}"] = train(
                    optdist.outer_loop(inner, outer, H, "data", aggregator=agg), steps=STEPS)
            for name, h in compressed.items():
                print(f"{name:32s} test loss {h['test_loss']:.3f}  test acc {h['test_acc']:.3f}  "
                      f"bytes/worker {h['bytes'][-1]:,}")
            """
        ),
        code(
            """
            everything = {**sweep, **compressed}
            fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(13, 4.5))
            for name, h in sweep.items():
                ax0.plot(h["step"], h["loss"], label=name)
            ax0.set(yscale="log", xlabel="inner step", ylabel="train loss (batch)", title="DiLoCo: H sweep")
            ax0.legend()
            for name, h in everything.items():
                marker = "o" if name in sweep else "s"
                ax1.scatter(h["bytes"][-1], h["test_loss"], marker=marker)
                ax1.annotate(name, (h["bytes"][-1], h["test_loss"]), fontsize=8,
                             textcoords="offset points", xytext=(4, 3))
            ax1.set(xscale="log", xlabel="bytes sent per worker (300 steps)", ylabel="test loss",
                    title="Test loss vs communication")
            for ax in (ax0, ax1):
                ax.grid(True, which="both", alpha=0.3)
            plt.tight_layout()
            plt.show()
            """
        ),
        md(
            """
            Communication falls by $H\\times$ from the synchronous baseline and by the compression ratio on
            top of that. The price in test loss is visible but small on this problem (largest for top-k 1%);
            on the repository's char-LM, DiLoCo with $H=50$ ends 0.5% above synchronous AdamW with 50×
            fewer bytes (BENCHMARKS.md). Every run here ends on a sync step, where each worker holds the
            global model; between syncs the model to evaluate is `optdist.outer.global_params(state)` (the
            anchor of the last sync, identical on every worker). Related transforms in optdist:
            `optdist.streaming_diloco` (fragments
            synchronized in a staggered way, optionally overlapped), `optdist.local_sgd`,
            `optdist.fedavg` / `fedadam`, `optdist.scaffold` (control variates for heterogeneous data) and
            `optdist.qsr_sync_every` (the QSR schedule that grows $H$ as the learning rate decays).

            **References.** Stich, *Local SGD converges fast and communicates little*, ICLR 2019 ·
            Douillard et al., *DiLoCo: Distributed low-communication training of language models*, 2023 ·
            Douillard et al., *Streaming DiLoCo with overlapping communication*, 2025 · Gu et al., *Why
            (and when) does local SGD generalize better than SGD?* / QSR, ICLR 2023/2024 ·
            Reddi et al., *Adaptive federated optimization*, ICLR 2021.
            """
        ),
    ]


def byzantine_nb():
    return [
        md(
            r"""
            # Byzantine robustness: attacks × aggregators

            $f$ of $n$ workers are Byzantine: they send arbitrary vectors. The mean has breakdown point 0
            (one worker moves it anywhere), so robust training replaces it by a robust aggregator of the
            gathered updates $x_1,\dots,x_n$: coordinate-wise **median** and **trimmed mean** [Yin et al.
            2018], **Krum** [Blanchard et al. 2017], the **geometric median** (RFA, Pillutla et al. 2022),
            **centered clipping** [Karimireddy et al. 2021], optionally after **nearest-neighbour mixing**
            (NNM: replace each $x_i$ by the mean of its $n-f$ nearest neighbours, Allouah et al. 2023).

            The attacks: **sign flip** (send $-4\times$ the honest gradient), **IPM** [Xie et al. 2020]
            (send $-\epsilon$ times the honest mean), **ALIE** [Baruch et al. 2019] (the honest mean shifted
            by $z$ standard deviations per coordinate, hiding inside the honest spread) and **Gaussian
            noise**. (`optdist.attacks.mimic` [Karimireddy et al. 2022], copying one honest worker, matters
            under heterogeneous data; with the IID batches here it is harmless, so it is left out.)

            In optdist an attack is a transform chained *before* the aggregation:
            `optax.chain(optdist.attacks.byzantine(attack, num_byzantine=f, axis_name="data"),
            optdist.robust_mean(aggregator, "data"), optax.sgd(...))`.
            """
        ),
        INSTALL_MD,
        INSTALL,
        IMPORTS,
        DIGITS,
        md(
            """
            ## The grid

            $n=8$ workers, the first $f=2$ Byzantine; SGD with momentum on the digits MLP for 150 steps,
            each (attack, aggregator) pair trained from the same initialization on the same batches. An
            attack is a pair `Attack(apply, needs_honest)`, so we can write one that switches between the
            five; a whole training run is one `lax.scan`, and one compiled program per aggregator runs all
            five attacks (`vmap` over the attack's index).
            """
        ),
        code(
            """
            N, F, STEPS, BATCH = 8, 2, 150, 32
            attacks = {
                "none": None,
                "sign flip": optdist.attacks.sign_flip(4.0),
                "IPM": optdist.attacks.ipm(10.0),
                "ALIE": optdist.attacks.alie(),
                "Gaussian": optdist.attacks.gaussian(1.0),
            }
            aggregators = {
                "mean": (optdist.aggregators.mean(), None),
                "median": (optdist.aggregators.median(), None),
                "trimmed mean": (optdist.aggregators.trimmed_mean(F), None),
                "Krum": (optdist.aggregators.krum(F), None),
                "geometric median": (optdist.aggregators.geometric_median(), None),
                "centered clip": (optdist.aggregators.centered_clip(tau=0.5, iters=3), None),
                "NNM + trimmed mean": (optdist.aggregators.trimmed_mean(F), optdist.aggregators.nnm(F)),
            }
            rng = np.random.default_rng(0)
            batch_idx = rng.integers(0, len(x_train), size=(STEPS, N, BATCH))  # the same batches everywhere
            xs, ys = jnp.asarray(x_train[batch_idx]), jnp.asarray(y_train[batch_idx])
            no_attack = optdist.attacks.Attack(apply=lambda ctx: ctx.own, needs_honest=False)
            choices = [no_attack if a is None else a for a in attacks.values()]


            def attack_number(index):
                # One Attack that runs choices[index]; `index` may be traced, so a single compiled program
                # trains under every attack at once (vmap over index below): one compilation per aggregator.
                def apply(ctx):
                    return jax.lax.switch(index, [functools.partial(c.apply, ctx) for c in choices])

                return optdist.attacks.Attack(apply=apply, needs_honest=any(c.needs_honest for c in choices))


            def accuracy_under_every_attack(aggregator, pre):
                def train_one(index):
                    tx = optax.chain(
                        optdist.attacks.byzantine(attack_number(index), num_byzantine=F, axis_name="data"),
                        optdist.robust_mean(aggregator, "data", pre_aggregation=pre),
                        optax.sgd(0.1, momentum=0.9),
                    )

                    def train_step(params, opt_state, xb, yb):
                        grads = jax.grad(loss_fn)(params, xb, yb)
                        updates, opt_state = tx.update(grads, opt_state, params)
                        return optax.apply_updates(params, updates), opt_state

                    step = optdist.simulate(train_step, "data", jit=False)
                    params = init_mlp(jax.random.key(0))
                    carry = optdist.replicate((params, tx.init(params)), N)
                    params_w, _ = jax.lax.scan(lambda c, batch: (step(*c, *batch), None), carry, (xs, ys))[0]
                    honest = jax.tree_util.tree_map(lambda p: p[F], params_w)  # an honest worker (index F)
                    return test_metrics(honest)[1]

                return np.asarray(jax.jit(jax.vmap(train_one))(jnp.arange(len(choices))))


            start = time.perf_counter()
            acc = np.zeros((len(attacks), len(aggregators)))
            for j, (agg, pre) in enumerate(aggregators.values()):
                acc[:, j] = accuracy_under_every_attack(agg, pre)
            print(f"{acc.size} runs in {time.perf_counter() - start:.1f} s")
            """
        ),
        code(
            """
            fig, ax = plt.subplots(figsize=(10, 5))
            im = ax.imshow(acc, cmap="viridis", vmin=0.0, vmax=1.0)
            ax.set_xticks(range(len(aggregators)), list(aggregators), rotation=30, ha="right")
            ax.set_yticks(range(len(attacks)), list(attacks))
            for i in range(acc.shape[0]):
                for j in range(acc.shape[1]):
                    ax.text(j, i, f"{acc[i, j]:.2f}", ha="center", va="center",
                            color="white" if acc[i, j] < 0.6 else "black")
            ax.set_xlabel("aggregator")
            ax.set_ylabel("attack (f=2 of n=8 workers)")
            ax.set_title("Test accuracy after 150 steps: attacks × aggregators (digits MLP)")
            fig.colorbar(im, ax=ax, label="test accuracy")
            plt.tight_layout()
            plt.show()
            """
        ),
        md(
            """
            Reading the map: the mean collapses under the scaled attacks, coordinate-wise rules resist the
            large attacks but lose accuracy to ALIE (which stays inside the honest spread), and mixing
            before aggregation (NNM) narrows the gap. The larger grid (more steps, worker momentum,
            MoNNA, non-finite attacks) is `python -m experiments.robustness` in the repository.

            **References.** Blanchard et al., *Machine learning with adversaries: Byzantine tolerant
            gradient descent* (Krum), NeurIPS 2017 · Yin et al., *Byzantine-robust distributed learning:
            towards optimal statistical rates*, ICML 2018 · Pillutla, Kakade, Harchaoui, *Robust aggregation
            for federated learning*, IEEE TSP 2022 · Karimireddy, He, Jaggi, *Learning from history for
            Byzantine robust optimization* (centered clipping), ICML 2021 · Karimireddy, He, Jaggi,
            *Byzantine-robust learning on heterogeneous datasets via bucketing* (mimic), ICLR 2022 ·
            Allouah et al., *Fixing by mixing: a recipe for optimal Byzantine ML under heterogeneity*
            (NNM), AISTATS 2023 · Baruch, Baruch, Goldberg, *A little is enough* (ALIE), NeurIPS 2019 ·
            Xie, Koyejo, Gupta, *Fall of empires: breaking Byzantine-tolerant SGD by inner product
            manipulation* (IPM), UAI 2020.
            """
        ),
    ]


def decentralized_nb():
    return [
        md(
            r"""
            # Decentralized training and zeroth-order optimization

            **Gossip.** Without an all-reduce, each worker keeps its own parameters $\theta_i$ and
            averages with its graph neighbours through a doubly stochastic mixing matrix $W$:
            $$\theta_i \leftarrow \textstyle\sum_j W_{ij}\big(\theta_j - \eta\, g_j\big)\qquad
            \text{(D-SGD, adapt-then-combine; Lian et al. 2017)}.$$
            How fast the workers agree is governed by the spectral gap $1-|\lambda_2(W)|$: the *consensus
            distance* $\frac1n\sum_i\|\theta_i-\bar\theta\|^2$ contracts by about $|\lambda_2|^2$ per
            round. CHOCO-SGD [Koloskova et al. 2019] gossips compressed differences of public copies;
            gradient tracking [Nedić et al. 2017 (DIGing)] removes the bias heterogeneous data leaves.

            **Zeroth order.** Seeded SPSA estimates the gradient from two loss values along a random
            direction $z$ that every worker regenerates from a shared seed, so a worker sends a single
            (int8) number per step [Spall 1992; Malladi et al. 2023 (MeZO)].
            """
        ),
        INSTALL_MD,
        INSTALL,
        IMPORTS,
        md("## Topologies and their spectral gaps (n = 8)"),
        code(
            """
            n = 8
            topologies = {
                "ring": optdist.decentralized.ring(n),
                "torus 2x4": optdist.decentralized.torus(2, 4),
                "exponential": optdist.decentralized.exponential(n),
                "complete": optdist.decentralized.complete(n),
            }
            fig, axes = plt.subplots(1, 4, figsize=(14, 3.6))
            for ax, (name, topo) in zip(axes, topologies.items()):
                w = topo.matrix()
                lam2 = np.sort(np.abs(np.linalg.eigvals(w)))[-2]
                ax.imshow(w, cmap="Blues", vmin=0, vmax=1)
                ax.set_title(f"{name}: gap {1 - lam2:.2f}, {len(topo.perms)} sends")
                ax.set_xlabel("sender j")
                ax.set_ylabel("receiver i")
            fig.suptitle("Mixing matrices W (doubly stochastic)")
            plt.tight_layout()
            plt.show()
            """
        ),
        md(
            """
            ## D-SGD on non-IID digits

            Each worker sees mostly two classes (the training set sorted by label and cut into 8 shards), so
            the workers' local optima differ and gossip has to keep them together. We track the consensus
            distance and the test accuracy of the averaged model, against steps and against bytes.
            """
        ),
        DIGITS,
        code(
            """
            sorted_idx = np.argsort(y_train, kind="stable")
            shards = np.array_split(sorted_idx, n)  # worker i gets shard i: about 2 classes each
            shard_len = min(len(s) for s in shards)
            x_shards = np.stack([x_train[s[:shard_len]] for s in shards])  # [n, m, 64]
            y_shards = np.stack([y_train[s[:shard_len]] for s in shards])


            def train_decentral(tx, steps=200, batch=16, seed=0, log_every=10):
                params = init_mlp(jax.random.key(seed))

                def train_step(params, opt_state, xb, yb):
                    loss, grads = jax.value_and_grad(loss_fn)(params, xb, yb)
                    updates, opt_state = tx.update(grads, opt_state, params)
                    return optax.apply_updates(params, updates), opt_state

                step = optdist.simulate(train_step, "data", jit=False)

                @jax.jit
                def run_chunk(carry, xs, ys):  # `log_every` steps as one lax.scan, then the metrics
                    params_w, state_w = jax.lax.scan(lambda c, b: (step(*c, *b), None), carry, (xs, ys))[0]
                    mean = jax.tree_util.tree_map(lambda p: p.mean(0), params_w)
                    dist = sum(jnp.sum((p - m) ** 2) for p, m in zip(
                        jax.tree_util.tree_leaves(params_w), jax.tree_util.tree_leaves(mean))) / n
                    return (params_w, state_w), dist, test_metrics(mean)[1]

                carry = optdist.replicate((params, tx.init(params)), n)
                idx = np.random.default_rng(seed).integers(0, shard_len, size=(steps, n, batch))
                worker = np.arange(n)[None, :, None]
                hist = {"step": [], "consensus": [], "acc": [], "bytes": []}
                for t in range(0, steps, log_every):
                    chunk = idx[t : t + log_every]
                    carry, dist, acc = run_chunk(carry, x_shards[worker, chunk], y_shards[worker, chunk])
                    hist["step"].append(t + len(chunk))
                    hist["consensus"].append(float(dist))
                    hist["acc"].append(float(acc))
                    hist["bytes"].append(int(optdist.bytes_sent(carry[1])[0]))
                return hist


            sgd = optax.sgd(0.05, momentum=0.9)
            dec_runs = {"all-reduce": train_decentral(optax.chain(optdist.mean_gradients("data"), sgd))}
            for name, topo in topologies.items():
                if name != "complete":
                    dec_runs[f"D-SGD {name}"] = train_decentral(optax.chain(sgd, optdist.gossip(topo, "data")))
            dec_runs["D-SGD one-peer exp."] = train_decentral(optax.chain(sgd, optdist.gossip("one_peer_exponential", "data")))
            dec_runs["CHOCO ring, top-k 10%"] = train_decentral(optax.chain(
                sgd, optdist.gossip("ring", "data", optdist.compressors.top_k(0.1), consensus_step_size=0.3)))
            dec_runs["gradient tracking ring"] = train_decentral(
                optax.chain(optdist.gradient_tracking("ring", "data"), sgd))
            for name, h in dec_runs.items():
                print(f"{name:24s} test acc {h['acc'][-1]:.3f}  consensus {h['consensus'][-1]:.2e}  "
                      f"KiB/worker {h['bytes'][-1] / 1024:.0f}")
            """
        ),
        code(
            """
            fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(13, 4.5))
            for k, (name, h) in enumerate(dec_runs.items()):
                if name != "all-reduce":  # the all-reduce keeps the workers identical (distance 0)
                    ax0.plot(h["step"], h["consensus"], color=f"C{k}", label=name)
                ax1.plot(h["bytes"], h["acc"], color=f"C{k}", label=name)
            ax0.set(yscale="log", xlabel="step", ylabel=r"$\\frac{1}{n}\\sum_i \\|\\theta_i - \\bar\\theta\\|^2$",
                    title="Consensus distance, non-IID digits")
            ax1.set(xscale="log", xlabel="bytes sent per worker", ylabel="test accuracy of the averaged model",
                    title="Accuracy vs communication")
            ax0.legend(fontsize=8)
            ax1.legend(fontsize=8)
            for ax in (ax0, ax1):
                ax.grid(True, which="both", alpha=0.3)
            plt.tight_layout()
            plt.show()
            """
        ),
        md(
            r"""
            ## Seeded SPSA: one byte per worker per step

            With a direction $z\sim\mathcal N(0, I)$ drawn from a key every worker can rebuild,
            $$\hat g = \frac{1}{nK}\sum_{m}\hat p_m z_m,\qquad
            p_m = \frac{\ell_i(\theta+\varepsilon z_m)-\ell_i(\theta-\varepsilon z_m)}{2\varepsilon}\approx\nabla\ell_i^\top z_m,$$
            and worker $i$ sends only its $K$ projections $\hat p_m$ (stochastically rounded to int8). The
            estimate is unbiased on quadratics with variance $\approx d/(nK)$ times the squared gradient
            norm, so it needs many cheap steps. A logistic regression on the digits ($d = 650$) with
            8 workers, against first-order SGD behind an all-reduce:
            """
        ),
        code(
            """
            def linear_loss(params, x, y):
                logits = x @ params["w"] + params["b"]
                return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


            def run_linear(tx, steps, zeroth_order, batch=64, seed=1):
                params = {"w": jnp.zeros((64, 10)), "b": jnp.zeros(10)}

                def step(params, state, xb, yb):
                    if zeroth_order:  # no gradient: the transform evaluates the loss itself
                        updates, state = tx.update(None, state, params, loss_fn=lambda p: linear_loss(p, xb, yb))
                    else:
                        updates, state = tx.update(jax.grad(linear_loss)(params, xb, yb), state, params)
                    return optax.apply_updates(params, updates), state

                run = optdist.simulate(step, "data", jit=False)
                idx = np.random.default_rng(seed).integers(0, len(x_train), size=(steps, n, batch))

                @jax.jit
                def scan(carry, xs, ys):
                    def body(carry, b):
                        carry = run(*carry, *b)
                        worker0 = jax.tree_util.tree_map(lambda p: p[0], carry[0])
                        return carry, linear_loss(worker0, x_test, y_test)

                    return jax.lax.scan(body, carry, (xs, ys))

                carry = optdist.replicate((params, tx.init(params)), n)
                (params_w, state_w), test_loss = scan(carry, x_train[idx], y_train[idx])
                return np.asarray(test_loss), int(optdist.bytes_sent(state_w)[0])


            spsa = optax.chain(optdist.seeded_spsa("data", perturbation_scale=1e-3, clip=20.0), optax.sgd(0.02))
            first_order = optax.chain(optdist.mean_gradients("data"), optax.sgd(0.5))
            linear_runs = {
                "seeded SPSA (int8 projection)": (*run_linear(spsa, 1000, zeroth_order=True), 1000),
                "first-order SGD + all-reduce": (*run_linear(first_order, 200, zeroth_order=False), 200),
            }
            for name, (curve, nbytes, steps) in linear_runs.items():
                print(f"{name:30s} test loss {curve[-1]:.3f} after {steps} steps, {nbytes:,} bytes/worker "
                      f"({nbytes / steps:g} per step)")
            """
        ),
        code(
            """
            plt.figure(figsize=(7, 4.2))
            for name, (curve, nbytes, steps) in linear_runs.items():
                plt.plot(np.arange(1, steps + 1) * nbytes / steps, curve, label=name)
            plt.xscale("log")
            plt.xlabel("bytes sent per worker")
            plt.ylabel("test loss (logistic regression)")
            plt.title("Seeded SPSA: 7 bytes per step vs a full gradient all-reduce")
            plt.legend()
            plt.grid(True, which="both", alpha=0.3)
            plt.show()
            """
        ),
        md(
            """
            **References.** Lian et al., *Can decentralized algorithms outperform centralized algorithms?*,
            NeurIPS 2017 · Koloskova, Stich, Jaggi, *Decentralized stochastic optimization and gossip
            algorithms with compressed communication* (CHOCO-SGD), ICML 2019 · Nedić, Olshevsky, Shi,
            *Achieving geometric convergence for distributed optimization over time-varying graphs* (DIGing),
            SIAM J. Optim. 2017 · Ying et al., *Exponential graph is provably efficient for decentralized
            deep training*, NeurIPS 2021 · Koloskova et al., *A unified theory of decentralized SGD with
            changing topology and local updates*, ICML 2020 · Spall, *Multivariate stochastic approximation
            using a simultaneous perturbation gradient approximation*, IEEE TAC 1992 · Malladi et al.,
            *Fine-tuning language models with just forward passes* (MeZO), NeurIPS 2023.
            """
        ),
    ]


NOTEBOOKS = {
    "01_quickstart": quickstart,
    "02_powersgd_and_error_feedback": powersgd_and_ef,
    "03_shampoo": shampoo_nb,
    "04_diloco_and_friends": diloco_nb,
    "05_byzantine_robustness": byzantine_nb,
    "06_decentralized_and_zeroth_order": decentralized_nb,
}


def build(names=None, out_dir: pathlib.Path = HERE) -> list[pathlib.Path]:
    """Writes the notebooks ``names`` (default: all) into ``out_dir``; returns their paths."""
    written = []
    for name, make in NOTEBOOKS.items():
        if names and name not in names:
            continue
        nb = new_notebook(cells=make())
        for i, cell in enumerate(nb.cells):
            cell["id"] = f"cell-{i:02d}"  # stable ids: regenerating gives no spurious diff
        nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
        nb.metadata["language_info"] = {"name": "python"}
        nb.metadata["colab"] = {"provenance": [], "name": f"{name}.ipynb"}
        nbformat.validate(nb)
        path = pathlib.Path(out_dir) / f"{name}.ipynb"
        path.write_text(nbformat.writes(nb) + "\n")
        written.append(path)
    return written


if __name__ == "__main__":
    for p in build(sys.argv[1:]):
        print("wrote", p)
