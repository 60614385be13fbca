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
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from ml_collections import config_flags

import optdist
from experiments import data as data_lib
from experiments import methods, models, plotting
from experiments.checkpointing import Checkpointer


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
            self.shards = (ds.x_train[: per * w].reshape(w, per),)
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
            self.shards = (ds.x_train[idx], ds.y_train[idx])
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


class Runner:
    """Runs ``eval_every`` steps on every worker as one jitted call.

    The per-worker chunk is a ``lax.scan`` over steps; batch keys are
    ``fold_in(fold_in(key(seed), step), worker_index)``, so every execution
    mode and every resumed run draws the same batches.
    """

    def __init__(self, task: Task, tx: optax.GradientTransformation, execution: str):
        seed = task.config.seed

        def worker_chunk(params, opt_state, shard, steps):
            worker = optdist.worker_index("data")

            def body(carry, step):
                params, opt_state = carry
                key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), step), worker)
                loss, grads = jax.value_and_grad(task.loss)(params, task.sample(shard, key))
                updates, opt_state = tx.update(grads, opt_state, params)
                return (optax.apply_updates(params, updates), opt_state), loss

            (params, opt_state), losses = jax.lax.scan(body, (params, opt_state), steps)
            return params, opt_state, jnp.mean(losses)

        in_axes = (0, 0, 0, None)
        self.sharding = None
        if execution == "simulate":
            self._run = optdist.simulate(worker_chunk, "data", in_axes=in_axes)
        elif execution == "data_parallel":
            # The largest device count dividing the workers; k workers per device.
            n = max(d for d in range(1, jax.device_count() + 1) if task.config.num_workers % d == 0)
            mesh = jax.make_mesh((n,), ("data",), devices=jax.devices()[:n])
            self._run = optdist.data_parallel(worker_chunk, mesh, "data", in_axes=in_axes)
            self.sharding = NamedSharding(mesh, P("data"))
        else:
            raise ValueError(f"Unknown execution {execution!r}: choose 'simulate' or 'data_parallel'.")

    def __call__(self, params_w, state_w, shards, start: int, count: int):
        return self._run(params_w, state_w, shards, np.arange(start, start + count, dtype=np.int32))

    def abstract(self, tree):
        """Shape/dtype/sharding targets for restoring ``tree`` onto this runner's devices."""
        return jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=self.sharding), tree
        )


def to_host(tree):
    """Fetches a tree to NumPy, gathering arrays that span several processes."""

    def fetch(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return multihost_utils.process_allgather(x, tiled=True)
        return np.asarray(x)

    return jax.tree_util.tree_map(fetch, tree)


def train_and_evaluate(
    config,
    workdir: str | None = None,
    *,
    resume: bool = False,
    verbose: bool = True,
    kill_at_step: int | None = None,
) -> dict:
    """Trains ``config.method``; returns ``{"config", "history", "summary", "final"}``.

    With ``workdir`` and ``config.checkpoint_every`` set, the full state is
    checkpointed every that many steps (at evaluation boundaries) under
    ``workdir/checkpoints``; ``resume=True`` continues from the latest
    checkpoint and reproduces an uninterrupted run bit for bit.
    ``kill_at_step`` SIGKILLs this process once that step is done (tests).
    """
    task = Task(config)
    tx = methods.build(config)
    w = config.num_workers
    params_w, state_w = to_host(optdist.replicate((task.params, tx.init(task.params)), w))
    run = Runner(task, tx, config.get("execution", "simulate"))
    evaluate = jax.jit(jax.vmap(task.evaluate))
    history, step, offset = [], 0, 0.0
    ckpt = None
    if workdir and config.get("checkpoint_every"):
        if config.checkpoint_every % config.eval_every:
            raise ValueError(
                f"checkpoint_every={config.checkpoint_every} must be a multiple of eval_every="
                f"{config.eval_every} (checkpoints are taken at evaluation boundaries)."
            )
        ckpt = Checkpointer(
            os.path.join(workdir, "checkpoints"), config.checkpoint_every, config.keep_checkpoints
        )
        if resume and ckpt.latest_step() is not None:
            (params_w, state_w), meta = ckpt.restore(run.abstract((params_w, state_w)))
            history, step, offset = meta["history"], meta["step"], meta["wall_time"]
            if verbose:
                print(f"[{config.method}] resumed from step {step}", flush=True)
    start = time.perf_counter() - offset
    while step < config.steps:
        n = min(config.eval_every, config.steps - step)
        params_w, state_w, train_loss = run(params_w, state_w, task.shards, step, n)
        step += n
        train_loss, (loss, acc), counters = to_host((train_loss, evaluate(params_w), state_w))
        elapsed = time.perf_counter() - start
        record = {
            "step": step,
            "train_loss": float(np.mean(train_loss)),
            "test_loss": float(np.mean(loss)),
            "test_accuracy": float(np.mean(acc)),
            "bytes_per_worker": int(np.max(optdist.bytes_sent(counters))),
            "wall_time": elapsed,
        }
        if task.is_lm:
            record["test_perplexity"] = float(np.exp(record["test_loss"]))
        history.append(record)
        if ckpt:
            meta = {"step": step, "history": history, "wall_time": elapsed}
            ckpt.save(step, (params_w, state_w), meta, force=step >= config.steps)
        if kill_at_step is not None and step >= kill_at_step:
            if ckpt:
                ckpt.close()  # let the last checkpoint finish, as a crash between saves would
            os.kill(os.getpid(), signal.SIGKILL)  # fault injection for the kill-and-resume test
        if verbose and jax.process_index() == 0:
            eta = elapsed / step * (config.steps - step)
            print(
                f"[{config.method}] step {step}/{config.steps} | train loss {record['train_loss']:.4f} | "
                f"test loss {record['test_loss']:.4f} | acc {record['test_accuracy']:.4f} | "
                f"{record['bytes_per_worker'] / 2**20:.2f} MiB/worker | {elapsed:.1f}s, ETA {eta:.1f}s",
                flush=True,
            )
    if ckpt:
        ckpt.close()
    summary = dict(history[-1])
    summary["method"] = config.method
    summary["skipped_steps"] = int(np.max(getattr(counters, "skipped", 0)))
    result = {"config": config.to_dict(), "history": history, "summary": summary}
    if workdir and jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "metrics.json"), "w") as f:
            json.dump(result, f, indent=1)
        plotting.plot_runs({config.method: history}, os.path.join(workdir, "plot.png"))
    result["final"] = (params_w, state_w)
    return result


def main(argv):
    del argv
    f = flags.FLAGS
    config = f.config
    logging.set_verbosity(logging.WARNING)  # progress lines only; no per-save orbax logs
    if f.num_processes > 1:
        # Multi-process (multi-host) run: every process runs this same program.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=f.coordinator_address, num_processes=f.num_processes, process_id=f.process_id
        )
        config.execution = "data_parallel"
    train_and_evaluate(config, f.workdir, resume=f.resume, kill_at_step=f.kill_at_step)


if __name__ == "__main__":
    config_flags.DEFINE_config_file(
        "config", os.path.join(os.path.dirname(__file__), "configs", "digits.py"), "Experiment config."
    )
    flags.DEFINE_string("workdir", "runs/train", "Output folder.")
    flags.DEFINE_bool("resume", False, "Continue from the latest checkpoint in workdir.")
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs).")
    flags.DEFINE_integer("num_processes", 1, "Number of processes (jax.distributed.initialize).")
    flags.DEFINE_integer("process_id", 0, "This process's index.")
    flags.DEFINE_integer("kill_at_step", None, "Fault injection: SIGKILL this process after that step.")
    app.run(main)
