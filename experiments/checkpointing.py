"""Checkpoints of the whole training state with orbax-checkpoint.

What is saved: the stacked per-worker parameters and the full optimizer
state (error-feedback residuals, warm-started factors, statistics, anchors,
byte counters, step counters — whatever the transform keeps), plus a JSON
record (step, metrics history, elapsed time). Per-batch randomness is derived
from ``(seed, step, worker)``, so no RNG state needs saving.

Restores use the live tree as the target, so NamedTuple states come back as
NamedTuples, per-worker leaves go back to their workers, and arrays sharded
over a mesh are restored with the same sharding.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """Saves every ``every`` steps, keeps the last ``keep``; restores the latest."""

    def __init__(self, directory: str, every: int, keep: int = 2):
        if every < 1 or keep < 1:
            raise ValueError(f"checkpoint_every and keep_checkpoints must be >= 1; got {every}, {keep}.")
        self.manager = ocp.CheckpointManager(
            os.path.abspath(directory),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: dict, *, force: bool = False) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=force,
        )

    def restore(self, like: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restores ``(state, meta)`` at ``step`` (default: latest) into the structure of ``like``."""
        step = self.latest_step() if step is None else step
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like)
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()),
        )
        return out.state, out.meta

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
