"""Train one model under one optdist method with simulated (or real) workers.

Usage::

  python -m experiments.train --config=experiments/configs/digits.py \
      --config.method=exact_mean --workdir=runs/digits

Thin ``main`` around :func:`train_and_evaluate`, in the style of the Flax
examples. Writes ``metrics.json`` (one record per evaluation: step, train
loss, test loss, accuracy or perplexity, cumulative bytes sent per worker,
wall time) and ``plot.png`` to ``workdir``.

The whole per-worker training chunk (``eval_every`` steps, a ``lax.scan``)
is one worker's function, run for all workers by ``optdist.simulate`` (vmap
on one device) or ``optdist.data_parallel`` (shard_map over all devices).
"""

from __future__ import annotations

import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from ml_collections import config_flags

import optdist
from experiments import data as data_lib
from experiments import methods, models, plotting


class Task:
    """Data shards, loss and evaluation for one dataset/model pair."""

    def __init__(self, config):
        self.config = config
        self.dataset = data_lib.load(config.dataset, config.seed)
        self.params, self.apply_fn = models.build(config, self.dataset.num_classes, config.seed)
        ds, w = self.dataset, config.num_workers
        self.is_lm = ds.y_train is None
        if self.is_lm:
            per = len(ds.x_train) // w
            self.shards = (jnp.asarray(ds.x_train[: per * w].reshape(w, per)),)
            starts = np.linspace(0, len(ds.x_test) - config.seq_len - 2, config.eval_windows).astype(int)
            windows = np.stack([ds.x_test[s : s + config.seq_len + 1] for s in starts])
            self.eval_batch = (jnp.asarray(windows),)
        else:
            idx = data_lib.partition(
                len(ds.x_train),
                w,
                labels=ds.y_train,
                classes_per_worker=config.get("classes_per_worker"),
                seed=config.seed,
            )
            self.shards = (jnp.asarray(ds.x_train[idx]), jnp.asarray(ds.y_train[idx]))
            self.eval_batch = (jnp.asarray(ds.x_test), jnp.asarray(ds.y_test))

    def sample(self, shard, key):
        b = self.config.batch_size
        if self.is_lm:
            (tokens,) = shard
            starts = jax.random.randint(key, (b,), 0, tokens.shape[0] - self.config.seq_len - 1)
            offsets = jnp.arange(self.config.seq_len + 1)
            return (tokens[starts[:, None] + offsets],)
        x, y = shard
        i = jax.random.randint(key, (b,), 0, x.shape[0])
        return x[i], y[i]

    def loss(self, params, batch):
        if self.is_lm:
            (tokens,) = batch
            return models.cross_entropy(self.apply_fn(params, tokens[:, :-1]), tokens[:, 1:])
        x, y = batch
        return models.cross_entropy(self.apply_fn(params, x), y)

    def evaluate(self, params):
        """(loss, accuracy) of one worker's params on the held-out set."""
        if self.is_lm:
            (tokens,) = self.eval_batch
            logits = self.apply_fn(params, tokens[:, :-1])
            loss = models.cross_entropy(logits, tokens[:, 1:])
            acc = jnp.mean(jnp.argmax(logits, -1) == tokens[:, 1:])
            return loss, acc
        x, y = self.eval_batch
        logits = self.apply_fn(params, x)
        return models.cross_entropy(logits, y), jnp.mean(jnp.argmax(logits, -1) == y)


def make_runner(task: Task, tx: optax.GradientTransformation, execution: str):
    """A jitted function running ``eval_every`` steps on every worker."""

    def worker_chunk(params, opt_state, shard, keys):
        def body(carry, key):
            params, opt_state = carry
            loss, grads = jax.value_and_grad(task.loss)(params, task.sample(shard, key))
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        (params, opt_state), losses = jax.lax.scan(body, (params, opt_state), keys)
        return params, opt_state, jnp.mean(losses)

    if execution == "simulate":
        return optdist.simulate(worker_chunk, "data")
    if execution == "data_parallel":
        # The largest device count that divides the workers; k workers per device.
        devices = max(d for d in range(1, jax.device_count() + 1) if task.config.num_workers % d == 0)
        mesh = jax.make_mesh((devices,), ("data",), devices=jax.devices()[:devices])
        return optdist.data_parallel(worker_chunk, mesh, "data")
    raise ValueError(f"Unknown execution {execution!r}: choose 'simulate' or 'data_parallel'.")


def _keys(seed: int, start: int, count: int, num_workers: int):
    """Per-(worker, step) keys ``[W, count]``: fold in the step, then the worker."""
    base = jax.random.key(seed)
    steps = jnp.arange(start, start + count)
    return jax.vmap(lambda w: jax.vmap(lambda t: jax.random.fold_in(jax.random.fold_in(base, t), w))(steps))(
        jnp.arange(num_workers)
    )


def train_and_evaluate(config, workdir: str | None = None, *, verbose: bool = True) -> dict:
    """Trains ``config.method`` and returns ``{"config", "history", "summary"}``."""
    task = Task(config)
    tx = methods.build(config)
    w = config.num_workers
    params_w, state_w = optdist.replicate((task.params, tx.init(task.params)), w)
    shards = task.shards
    run = make_runner(task, tx, config.get("execution", "simulate"))
    evaluate = jax.jit(jax.vmap(task.evaluate))
    history = []
    num_chunks = math.ceil(config.steps / config.eval_every)
    start = time.perf_counter()
    step = 0
    for chunk in range(num_chunks):
        n = min(config.eval_every, config.steps - step)
        params_w, state_w, train_loss = run(params_w, state_w, shards, _keys(config.seed, step, n, w))
        step += n
        loss, acc = jax.device_get(evaluate(params_w))
        elapsed = time.perf_counter() - start
        record = {
            "step": step,
            "train_loss": float(np.mean(train_loss)),
            "test_loss": float(np.mean(loss)),
            "test_accuracy": float(np.mean(acc)),
            "bytes_per_worker": int(np.max(optdist.bytes_sent(state_w))),
            "wall_time": elapsed,
        }
        if task.is_lm:
            record["test_perplexity"] = float(np.exp(record["test_loss"]))
        history.append(record)
        if verbose:
            eta = elapsed / (chunk + 1) * (num_chunks - chunk - 1)
            print(
                f"[{config.method}] step {step}/{config.steps} | train loss {record['train_loss']:.4f} | "
                f"test loss {record['test_loss']:.4f} | acc {record['test_accuracy']:.4f} | "
                f"{record['bytes_per_worker'] / 2**20:.2f} MiB/worker | {elapsed:.1f}s, ETA {eta:.1f}s",
                flush=True,
            )
    summary = dict(history[-1])
    summary["method"] = config.method
    summary["skipped_steps"] = int(np.max(getattr(state_w, "skipped", 0)))
    result = {"config": config.to_dict(), "history": history, "summary": summary}
    if workdir:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "metrics.json"), "w") as f:
            json.dump(result, f, indent=1)
        plotting.plot_runs({config.method: history}, os.path.join(workdir, "plot.png"))
    return result


def main(argv):
    del argv
    config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
    train_and_evaluate(config, workdir)


if __name__ == "__main__":
    config_flags.DEFINE_config_file(
        "config", os.path.join(os.path.dirname(__file__), "configs", "digits.py"), "Experiment config."
    )
    flags.DEFINE_string("workdir", "runs/train", "Output folder.")
    app.run(main)
