"""Checkpoints of the whole training state with orbax-checkpoint, verified by content hashes.

What is saved: the stacked per-worker parameters and the full optimizer
state (error-feedback residuals, warm-started factors, statistics, anchors,
byte counters, step counters — whatever the transform keeps), plus a JSON
record (step, metrics history, elapsed time, the run's config). Per-batch
randomness is derived from ``(seed, step, worker)``, so no RNG state needs saving.

Integrity: each checkpoint's record carries ``state_sha256`` (SHA-256 of every
saved array's dtype, shape and bytes, in tree order), ``config_sha256`` and
``meta_sha256`` (of the canonical JSON of the record itself). :meth:`Checkpointer.restore_intact`
recomputes them after reading; a checkpoint that cannot be read (truncated,
half-written, missing files) or whose hashes do not match is skipped, with a
message naming its step and the reason, and the next older one is tried.

Restores use the live tree as the target, so NamedTuple states come back as
NamedTuples, per-worker leaves go back to their workers, and arrays sharded
over a mesh are restored with the same sharding.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import os
import sys
import threading
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

HASH_KEYS = ("state_sha256", "config_sha256", "meta_sha256")


def tree_sha256(tree: Any) -> str:
    """SHA-256 of every leaf's dtype, shape and bytes, in tree-flatten order (host arrays)."""
    h = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves(tree):
        if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{a.dtype.str}{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def json_sha256(obj: Any) -> str:
    """SHA-256 of ``obj``'s canonical JSON (sorted keys, no whitespace)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@contextlib.contextmanager
def _quiet_failed_reads():
    """Silences orbax/TensorStore's own tracebacks while a damaged checkpoint is probed.

    A failed read leaves asyncio tasks whose exceptions asyncio logs when they are collected, and
    background threads that may raise "Event loop is closed"; the caller reports the failure in one
    line instead.
    """
    names = ("asyncio", "absl", "orbax", "jax")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    hook, unraisable = threading.excepthook, sys.unraisablehook
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    threading.excepthook = lambda args: None
    sys.unraisablehook = lambda args: None
    try:
        yield
    finally:
        gc.collect()  # collect the failed tasks now, while their log records are silenced
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        threading.excepthook, sys.unraisablehook = hook, unraisable


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


class Checkpointer:
    """Saves every ``every`` steps, keeps the last ``keep``; restores the newest intact one."""

    def __init__(self, directory: str, every: int, keep: int = 2):
        if every < 1 or keep < 1:
            raise ValueError(f"checkpoint_every and keep_checkpoints must be >= 1; got {every}, {keep}.")
        self.directory = os.path.abspath(directory)
        self.every, self.keep = every, keep
        self.damaged: list[int] = []  # steps skipped by the last restore_intact
        self.manager = self._manager()

    def _manager(self) -> ocp.CheckpointManager:
        return ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=self.keep, save_interval_steps=self.every),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: dict, *, host_state: Any = None, force: bool = False) -> None:
        """Saves ``state`` with ``meta`` plus its hashes; ``host_state``: ``state`` fetched to NumPy.

        ``meta`` is snapshotted (a JSON round trip) before it is hashed: orbax writes the record in
        the background, and the caller may go on mutating what ``meta`` refers to (the training loop
        appends to its metrics history), which would otherwise make the record disagree with its hash.
        """
        meta = json.loads(json.dumps(meta))
        meta["state_sha256"] = tree_sha256(state if host_state is None else host_state)
        if "config" in meta:
            meta["config_sha256"] = json_sha256(meta["config"])
        meta["meta_sha256"] = json_sha256({k: v for k, v in meta.items() if k not in HASH_KEYS})
        self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=force,
        )

    def restore(self, like: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restores ``(state, meta)`` at ``step`` (default: latest) into the structure of ``like``.

        Reads only; :meth:`restore_intact` also verifies the hashes.
        """
        step = self.latest_step() if step is None else step
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like)
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()),
        )
        return out.state, out.meta

    def read_meta(self, step: int) -> dict:
        """The JSON record saved with checkpoint ``step`` (arrays are not read)."""
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def _reset(self) -> None:
        # A failed read can leave the manager's async machinery unusable; start a fresh one.
        try:
            self.manager.close()
        except Exception:  # noqa: BLE001
            pass
        self.manager = self._manager()

    def restore_intact(
        self,
        like: Any,
        to_host: Callable[[Any], Any] = lambda t: jax.tree_util.tree_map(np.asarray, t),
        log: Callable[[str], None] = print,
        check_meta: Callable[[dict], None] | None = None,
    ) -> tuple[Any, dict] | None:
        """The newest checkpoint that reads back and matches its hashes: ``(state, meta)`` or None.

        Every skipped checkpoint is reported through ``log`` with its step and why it was skipped.
        ``check_meta(meta)`` is called on the newest checkpoint whose record is intact, before its
        arrays are read; it may raise (e.g. when the stored config does not match this run's).
        """
        with _quiet_failed_reads():
            return self._restore_intact(like, to_host, log, check_meta)

    def _restore_intact(self, like, to_host, log, check_meta):
        checked = False
        self.damaged = []
        for step in reversed(self.all_steps()):
            try:
                meta = self.read_meta(step)
            except Exception as e:  # noqa: BLE001 - any read failure means "not intact"
                log(f"checkpoint at step {step} skipped: its record cannot be read ({_first_line(e)})")
                self._reset()
                self.damaged.append(step)
                continue
            reason = self._verify_meta(meta, step)
            if reason:
                log(f"checkpoint at step {step} skipped: {reason}")
                self.damaged.append(step)
                continue
            if check_meta is not None and not checked:
                check_meta(meta)
                checked = True
            try:
                state, meta = self.restore(like, step)
            except Exception as e:  # noqa: BLE001
                log(f"checkpoint at step {step} skipped: its arrays cannot be read ({_first_line(e)})")
                self._reset()
                self.damaged.append(step)
                continue
            digest = tree_sha256(to_host(state))
            if digest != meta["state_sha256"]:
                log(
                    f"checkpoint at step {step} skipped: its array contents do not match the saved hash "
                    f"(sha256 {digest[:12]}..., saved {meta['state_sha256'][:12]}...): the files were "
                    "changed or damaged"
                )
                self.damaged.append(step)
                continue
            return state, meta
        return None

    def set_aside(self, steps, log: Callable[[str], None] = print) -> None:
        """Renames the folders of damaged checkpoints ``steps`` to ``<step>.damaged`` (kept, not used)."""
        for step in steps:
            src = os.path.join(self.directory, str(step))
            dst = f"{src}.damaged"
            n = 1
            while os.path.exists(dst):
                n += 1
                dst = f"{src}.damaged{n}"
            os.rename(src, dst)
            log(f"moved the damaged checkpoint at step {step} to {dst}")
        self._reset()

    @staticmethod
    def _verify_meta(meta, step) -> str | None:
        if not isinstance(meta, dict) or "state_sha256" not in meta:
            return "it has no content hash (written before checkpoints were verified)"
        if meta.get("step") != step:
            return f"its record says step {meta.get('step')!r}"
        if json_sha256({k: v for k, v in meta.items() if k not in HASH_KEYS}) != meta.get("meta_sha256"):
            return "its JSON record does not match its hash (corrupt metadata)"
        if "config" in meta and json_sha256(meta["config"]) != meta.get("config_sha256"):
            return "its stored config does not match its hash"
        return None

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
