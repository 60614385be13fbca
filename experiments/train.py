"""Train one model under one optdist method with simulated (or real) workers.

Usage (the binary is ``experiments/main.py``, in the style of the Flax examples)::

  python -m experiments.main --config=experiments/configs/digits.py \
      --config.method=diloco --config.hparams.diloco.sync_every=20

:func:`train_and_evaluate` writes ``metrics.json`` (one record per evaluation: step, train loss,
test loss, accuracy or perplexity, cumulative bytes sent per worker, communicating steps, skipped
steps, wall time; a summary with the steady-state step time) and ``plot.png`` to ``workdir``, and
with ``config.checkpoint_every`` verified checkpoints under ``workdir/checkpoints``.

The whole per-worker training chunk (``eval_every`` steps, a ``lax.scan``) is one worker's
function, run for all workers by ``optdist.simulate`` (vmap on one device) or
``optdist.data_parallel`` (shard_map over all devices).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optdist
import optdist.stragglers
from experiments import data as data_lib
from experiments import methods, models, plotting
from experiments.checkpointing import Checkpointer

EXECUTIONS = ("simulate", "data_parallel")
EVAL_PARAMS = ("workers", "global")
OPTIMIZERS = ("sgd", "adam", "adamw")
MODELS = {"digits": ("mlp", "cnn"), "charlm": ("transformer",)}


class RunExistsError(RuntimeError):
    """The workdir holds checkpoints of an earlier run and neither resume nor overwrite was asked."""


class NoIntactCheckpointError(RuntimeError):
    """``resume`` found checkpoints, but none reads back and matches its hashes."""


def _fail(field: str, value, requirement: str, example: str) -> None:
    raise ValueError(f"{field}={value!r}: {requirement} (e.g. --{field}={example}).")


def _is_int(v) -> bool:
    return isinstance(v, int | np.integer) and not isinstance(v, bool)


def validate(config, prefix: str = "config") -> None:
    """Checks every training field before anything is built; errors name the field and a fix.

    Also resolves ``config.method`` (a method or preset) and writes a preset's settings into
    ``config.hparams``; the method's factory errors name ``config.hparams.<method>``.
    """

    def f(name):
        return f"{prefix}.{name}"

    lr = config.learning_rate
    if not isinstance(lr, int | float) or isinstance(lr, bool) or not math.isfinite(lr) or lr <= 0:
        _fail(f("learning_rate"), lr, "must be a finite number > 0", "0.05")
    for name, minimum, example in (
        ("num_workers", 1, 8),
        ("batch_size", 1, 16),
        ("steps", 1, 400),
        ("eval_every", 1, 50),
        ("keep_checkpoints", 1, 2),
        ("checkpoint_every", 0, 100),
        ("num_byzantine", 0, 2),
    ):
        value = config[name]
        if not _is_int(value) or value < minimum:
            _fail(f(name), value, f"must be an integer >= {minimum}", example)
    if config.checkpoint_every % config.eval_every:
        _fail(
            f("checkpoint_every"),
            config.checkpoint_every,
            f"must be a multiple of eval_every={config.eval_every} (checkpoints are taken at "
            "evaluation boundaries)",
            config.eval_every,
        )
    if not (0 <= config.momentum < 1):
        _fail(f("momentum"), config.momentum, "must be in [0, 1)", "0.9")
    if not (math.isfinite(config.weight_decay) and config.weight_decay >= 0):
        _fail(f("weight_decay"), config.weight_decay, "must be a finite number >= 0", "1e-4")
    if config.execution not in EXECUTIONS:
        _fail(f("execution"), config.execution, f"choose one of {EXECUTIONS}", "simulate")
    if config.eval_params not in EVAL_PARAMS:
        _fail(f("eval_params"), config.eval_params, f"choose one of {EVAL_PARAMS}", "workers")
    if config.optimizer not in OPTIMIZERS:
        _fail(f("optimizer"), config.optimizer, f"choose one of {OPTIMIZERS}", "sgd")
    if config.dataset not in MODELS:
        _fail(f("dataset"), config.dataset, f"choose one of {tuple(MODELS)}", "digits")
    if config.model not in MODELS[config.dataset]:
        _fail(f("model"), config.model, f"dataset {config.dataset!r} takes {MODELS[config.dataset]}", "mlp")
    if config.dataset == "digits":
        if not _is_int(config.hidden) or config.hidden < 1:
            _fail(f("hidden"), config.hidden, "must be an integer >= 1", 128)
        cpw = config.classes_per_worker
        if cpw is not None and not (_is_int(cpw) and 1 <= cpw <= 10):
            _fail(f("classes_per_worker"), cpw, "must be None (IID) or an integer in 1..10", 2)
    else:
        for name in ("dim", "heads", "layers", "seq_len", "eval_windows"):
            if not _is_int(config[name]) or config[name] < 1:
                _fail(f(name), config[name], "must be an integer >= 1", 64)
        if config.corpus not in data_lib.CORPORA:
            _fail(f("corpus"), config.corpus, f"choose one of {data_lib.CORPORA}", "stdlib")
    method, _ = methods.resolve(config.method)
    if method.name == "robust" and 2 * config.num_byzantine >= config.num_workers:
        _fail(
            f("num_byzantine"),
            config.num_byzantine,
            f"must be below half of num_workers={config.num_workers} for the robust aggregators",
            max(0, (config.num_workers - 1) // 2),
        )
    methods.apply_preset(config, prefix)


def _counter_words(state) -> list:
    """The words of every byte counter in ``state`` (to see whether a step sent anything)."""
    leaves = jax.tree_util.tree_leaves(state, is_leaf=lambda x: isinstance(x, optdist.ByteCounter))
    return [w for c in leaves if isinstance(c, optdist.ByteCounter) for w in (c.hi, c.lo)]


class Task:
    """Data shards, loss and evaluation for one dataset/model pair."""

    def __init__(self, config):
        self.config = config
        corpus = {"corpus": config.corpus} if config.dataset == "charlm" else {}
        self.dataset = data_lib.load(config.dataset, config.seed, **corpus)
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
                classes_per_worker=config.classes_per_worker,
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
    mode and every resumed run draws the same batches. Besides the new state and the mean loss
    it returns how many of the chunk's steps sent bytes (communicating steps, for the latency
    term of the network model).
    """

    def __init__(self, task: Task, tx: optax.GradientTransformation, execution: str):
        seed = task.config.seed

        def worker_chunk(params, opt_state, shard, steps):
            worker = optdist.worker_index("data")

            def body(carry, step):
                params, opt_state = carry
                key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), step), worker)
                loss, grads = jax.value_and_grad(task.loss)(params, task.sample(shard, key))
                updates, new_state = tx.update(grads, opt_state, params)
                before, after = _counter_words(opt_state), _counter_words(new_state)
                sent = jnp.any(jnp.stack([a != b for a, b in zip(before, after)])) if before else False
                return (optax.apply_updates(params, updates), new_state), (loss, jnp.asarray(sent, jnp.int32))

            (params, opt_state), (losses, sent) = jax.lax.scan(body, (params, opt_state), steps)
            return params, opt_state, jnp.mean(losses), jnp.sum(sent)

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


class StepTimer:
    """Steady-state step time: chunks whose shape was already compiled, compilation excluded.

    The first call of each chunk length compiles (XLA), so its time is not compute; only later
    calls of an already-seen length count. With no such call, :meth:`warm_up` times one extra
    (discarded) run of a chunk that was only run cold.
    """

    def __init__(self):
        self.seen, self.cold = set(), []
        self.warm_time, self.warm_steps, self.cold_time = 0.0, 0, 0.0

    def record(self, count: int, seconds: float, inputs) -> None:
        if count in self.seen:
            self.warm_time += seconds
            self.warm_steps += count
        else:
            self.seen.add(count)
            self.cold.append((count, seconds, inputs))
            self.cold_time += seconds

    def warm_up(self, run) -> None:
        if self.warm_steps or not self.cold:
            return
        count, _, inputs = self.cold[0]
        t0 = time.perf_counter()
        jax.block_until_ready(run(*inputs))
        self.warm_time += time.perf_counter() - t0
        self.warm_steps += count

    @property
    def step_time(self) -> float | None:
        return self.warm_time / self.warm_steps if self.warm_steps else None

    @property
    def compile_time(self) -> float:
        """Cold calls' time minus their steps at the steady-state rate (compilation, mostly)."""
        cold_steps = sum(c for c, _, _ in self.cold)
        return max(0.0, self.cold_time - cold_steps * (self.step_time or 0.0))


def to_host(tree):
    """Fetches a tree to NumPy, gathering arrays that span several processes."""

    def fetch(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return multihost_utils.process_allgather(x, tiled=True)
        return np.asarray(x)

    return jax.tree_util.tree_map(fetch, tree)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(stored: dict, current: dict, ignore=("steps",)) -> list[str]:
    """``field (checkpoint X, now Y)`` for every field that differs, except ``ignore``."""
    a, b = _flatten(stored), _flatten(json.loads(json.dumps(current)))
    return [
        f"{k} (checkpoint {a.get(k, '<absent>')!r}, now {b.get(k, '<absent>')!r})"
        for k in sorted(set(a) | set(b))
        if k not in ignore and a.get(k, "<absent>") != b.get(k, "<absent>")
    ]


def existing_checkpoints(directory: str) -> list[int]:
    """Steps of the finished checkpoint folders in ``directory`` (none if it does not exist)."""
    if not os.path.isdir(directory):
        return []
    return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def _evaluated_params(config, state_w):
    """``(params_w, state_w) -> the [workers, ...] parameters to evaluate`` for ``config.eval_params``."""
    if config.eval_params == "workers":
        return lambda params_w, state_w: params_w
    try:
        optdist.outer.global_params(state_w)
    except ValueError as e:
        raise ValueError(
            f"config.eval_params='global' evaluates an outer loop's anchor, and method {config.method!r} "
            "has no outer loop: its workers' parameters are the model. Use eval_params='workers'."
        ) from e
    return lambda params_w, state_w: optdist.outer.global_params(state_w)


def _skipped(state) -> int:
    return int(np.max(np.asarray(getattr(state, "skipped", 0))))


def train_and_evaluate(
    config,
    workdir: str | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    verbose: bool = True,
    kill_at_step: int | None = None,
    log=None,
) -> dict:
    """Trains ``config.method``; returns ``{"config", "history", "summary", "final"}``.

    The config is validated first (errors name the field). With ``workdir``, ``metrics.json`` and
    ``plot.png`` are written there; with ``config.checkpoint_every`` the full state is checkpointed
    every that many steps under ``workdir/checkpoints``, each with content hashes.

    Existing checkpoints in ``workdir`` stop a fresh run (:class:`RunExistsError`) unless
    ``overwrite`` (they are deleted) or ``resume``. ``resume=True`` continues from the newest intact
    checkpoint (damaged ones are skipped with a message) and reproduces an uninterrupted run bit for
    bit; the stored config must equal this one except for ``steps`` (a stored ``checkpoint_every``
    is used when this config's is 0). Resuming a finished run rewrites ``metrics.json``.
    ``kill_at_step`` SIGKILLs this process once that step is done (tests).
    """
    config = config.copy_and_resolve_references()
    validate(config)
    label = config.label or config.method
    lead = jax.process_index() == 0

    def say(msg, always=False):
        if (verbose or always) and lead:
            print(msg, flush=True) if log is None else log(msg)

    ckpt_dir = os.path.join(workdir, "checkpoints") if workdir else None
    existing = existing_checkpoints(ckpt_dir) if ckpt_dir else []
    if existing and not resume:
        if not overwrite:
            raise RunExistsError(
                f"{ckpt_dir} holds checkpoints of an earlier run (steps {existing}). Pass --resume to "
                "continue it, --overwrite to delete them and start over, or choose another --workdir."
            )
        if lead:
            shutil.rmtree(ckpt_dir)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("optdist_overwrite")
        say(f"deleted the earlier run's checkpoints in {ckpt_dir} (--overwrite)", always=True)
        existing = []
    if resume and existing and config.checkpoint_every == 0:
        config.checkpoint_every = config.eval_every  # placeholder until the stored value is read
        adopt_every = True
    else:
        adopt_every = False
    task = Task(config)
    tx = methods.build(config)
    w = config.num_workers
    params_w, state_w = to_host(optdist.replicate((task.params, tx.init(task.params)), w))
    run = Runner(task, tx, config.execution)
    evaluate = jax.jit(jax.vmap(task.evaluate))
    evaluated = _evaluated_params(config, state_w)
    history, step, offset = [], 0, 0.0
    ckpt = None
    if resume and not existing:
        say(f"[{label}] --resume: no checkpoint in {ckpt_dir}; starting from step 0")
    if ckpt_dir and (config.checkpoint_every or existing):
        ckpt = Checkpointer(ckpt_dir, config.checkpoint_every or config.eval_every, config.keep_checkpoints)
    if existing:  # resume

        def check_meta(meta):
            stored = meta.get("config", {})
            if adopt_every:
                config.checkpoint_every = int(stored.get("checkpoint_every", 0)) or config.eval_every
                say(f"[{label}] using the stored checkpoint_every={config.checkpoint_every}", always=True)
            diffs = config_differences(stored, config.to_dict()) if stored else []
            if diffs:
                raise ValueError(
                    f"Cannot resume from {ckpt_dir}: its run's config differs in {'; '.join(diffs)}. Only "
                    "steps may change on --resume; pass the same settings, or start over with --overwrite "
                    "or another --workdir."
                )

        restored = ckpt.restore_intact(
            run.abstract((params_w, state_w)),
            to_host=to_host,
            log=lambda m: say(f"[{label}] {m}", always=True),
            check_meta=check_meta,
        )
        if restored is None:
            raise NoIntactCheckpointError(
                f"No intact checkpoint in {ckpt_dir} (steps {existing}; reasons above). Start over with "
                "--overwrite or choose another --workdir."
            )
        (params_w, state_w), meta = restored
        if ckpt.damaged:  # newer than the restored one: set aside so this run can save those steps
            if lead:
                ckpt.set_aside(ckpt.damaged, log=lambda m: say(f"[{label}] {m}", always=True))
            if jax.process_count() > 1:
                multihost_utils.sync_global_devices("optdist_set_aside")
        if meta["step"] > config.steps:
            raise ValueError(
                f"config.steps={config.steps} is below the checkpointed step {meta['step']} in {ckpt_dir}: "
                f"pass --config.steps={meta['step']} or more to resume, or --overwrite to start over."
            )
        ckpt.close()
        ckpt = Checkpointer(ckpt_dir, config.checkpoint_every, config.keep_checkpoints)
        history, step, offset = meta["history"], meta["step"], meta["wall_time"]
        say(f"[{label}] resumed from step {step}")
    rounds = history[-1].get("comm_rounds", 0) if history else 0
    timer = StepTimer()
    if existing:
        timer.warm_time, timer.warm_steps = meta.get("warm_time", 0.0), meta.get("warm_steps", 0)
    start = time.perf_counter() - offset
    loop_start, first_step = time.perf_counter(), step
    while step < config.steps:
        n = min(config.eval_every, config.steps - step)
        inputs = (params_w, state_w, task.shards, step, n)
        t0 = time.perf_counter()
        out = jax.block_until_ready(run(*inputs))
        timer.record(n, time.perf_counter() - t0, inputs)
        params_w, state_w, train_loss, sent = out
        step += n
        train_loss, sent, (loss, acc), counters = to_host(
            (train_loss, sent, evaluate(evaluated(params_w, state_w)), state_w)
        )
        elapsed = time.perf_counter() - start
        rounds += int(np.max(sent))
        record = {
            "step": step,
            "train_loss": float(np.mean(train_loss)),
            "test_loss": float(np.mean(loss)),
            "test_accuracy": float(np.mean(acc)),
            "bytes_per_worker": int(np.max(optdist.bytes_sent(counters))),
            "comm_rounds": rounds,
            "skipped_steps": _skipped(counters),
            "wall_time": elapsed,
        }
        simulated = optdist.stragglers.simulated_time(counters)  # straggler methods' simulated clock
        if simulated is not None:
            record["simulated_time"] = simulated
        if task.is_lm:
            record["test_perplexity"] = float(np.exp(record["test_loss"]))
        history.append(record)
        if ckpt and config.checkpoint_every and (step % config.checkpoint_every == 0 or step >= config.steps):
            meta = {"step": step, "history": history, "wall_time": elapsed, "config": config.to_dict()}
            meta.update(warm_time=timer.warm_time, warm_steps=timer.warm_steps)
            host = to_host((params_w, state_w))
            ckpt.save(step, (params_w, state_w), meta, host_state=host, force=True)
        if kill_at_step is not None and step >= kill_at_step:
            if ckpt:
                ckpt.close()  # let the last checkpoint finish, as a crash between saves would
            os.kill(os.getpid(), signal.SIGKILL)  # fault injection for the kill-and-resume test
        skipped = record["skipped_steps"]
        eta = (time.perf_counter() - loop_start) / (step - first_step) * (config.steps - step)
        say(
            f"[{label}] step {step}/{config.steps} | train loss {record['train_loss']:.4f} | "
            f"test loss {record['test_loss']:.4f} | acc {record['test_accuracy']:.4f} | "
            f"{record['bytes_per_worker'] / 2**20:.2f} MiB/worker | skipped {skipped} | "
            f"{elapsed:.1f}s, ETA {eta:.1f}s"
        )
        if skipped == step:
            say(f"[{label}] warning: every step so far was skipped (non-finite gradients or updates)")
    if ckpt:
        ckpt.close()
    timer.warm_up(run)
    state_host = to_host(state_w)
    summary = dict(history[-1])
    summary["method"] = label
    summary["skipped_steps"] = _skipped(state_host)
    summary["step_time"] = timer.step_time
    summary["compile_time"] = timer.compile_time
    result = {"config": config.to_dict(), "history": history, "summary": summary}
    if workdir and lead:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "metrics.json"), "w") as f:
            json.dump(result, f, indent=1)
        plotting.plot_runs({label: history}, os.path.join(workdir, "plot.png"))
    result["final"] = (params_w, state_w)
    return result


if __name__ == "__main__":
    from experiments import main as main_lib

    main_lib.run()
