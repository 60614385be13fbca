"""Bit-exact resume: N steps == k steps, save, restart, restore, N - k steps."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments import methods, train
from experiments.checkpointing import Checkpointer
from tests.experiments.test_experiments import tiny_digits

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def resumable(method, steps, **overrides):
    c = tiny_digits(method, steps=steps, checkpoint_every=20, keep_checkpoints=2, **overrides)
    if method == "robust":  # robust aggregation with its stateful aggregator and an attack
        c.hparams.robust.update(
            dict(attack="alie", aggregator="centered_clip", nnm=True, worker_momentum=True)
        )
    return c


def assert_bitwise_equal(a, b):
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def strip_time(history):
    return [{k: v for k, v in r.items() if k != "wall_time"} for r in history]


# One method (or preset) per transform family, so every family is covered.
REPRESENTATIVES = ["exact_mean", "local_only", "powersgd_r1", "diloco_h10", "dsgd_ring", "shampoo", "robust"]
assert {methods.resolve(n)[0].family for n in REPRESENTATIVES} == {m.family for m in methods.METHODS.values()}


# Every family under simulate; under data_parallel (state restored onto a device mesh) the families
# whose state mixes per-worker and shared leaves: PowerSGD (shared Q, per-worker residuals), an outer
# loop (anchors, per-worker inner states) and the robust pipeline (worker momenta) — the others' state
# placement is the same as one of these (suite time: each case is two trainings).
DATA_PARALLEL = ["powersgd_r1", "diloco_h10", "robust"]
CASES = [(m, "simulate") for m in REPRESENTATIVES] + [(m, "data_parallel") for m in DATA_PARALLEL]


@pytest.mark.parametrize("method,execution", CASES)
def test_resume_is_bit_exact(tmp_path, method, execution):
    """A 40-step run checkpoints at steps 20 and 40; with step 40's checkpoint removed (as if the
    process died after step 20), --resume restores step 20 and must reproduce the run bit for bit."""
    workdir = str(tmp_path)
    full = train.train_and_evaluate(resumable(method, 40, execution=execution), workdir, verbose=False)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    assert train.existing_checkpoints(ckpt_dir) == [20, 40]
    shutil.rmtree(os.path.join(ckpt_dir, "40"))
    said = []
    resumed = train.train_and_evaluate(
        resumable(method, 40, execution=execution), workdir, resume=True, log=said.append
    )
    assert any(m.endswith("resumed from step 20") for m in said), said
    assert_bitwise_equal(resumed["final"], full["final"])
    assert strip_time(resumed["history"]) == strip_time(full["history"])
    # NamedTuple states come back as NamedTuples (same tree structure, not dicts).
    assert jax.tree_util.tree_structure(resumed["final"]) == jax.tree_util.tree_structure(full["final"])


def test_resume_after_process_restart(tmp_path):
    """Two separate processes (the second restores from disk) equal one in-process run."""
    workdir = str(tmp_path)
    base = [
        sys.executable,
        "-m",
        "experiments.train",
        f"--workdir={workdir}",
        "--config.hidden=16",
        "--config.num_workers=4",
        "--config.batch_size=8",
        "--config.eval_every=10",
        "--config.checkpoint_every=20",
    ]
    env = dict(os.environ)  # the suite's XLA_FLAGS (8 devices, -O0): the in-process run's compiler
    subprocess.run(base + ["--config.steps=20"], cwd=ROOT, env=env, check=True, capture_output=True)
    subprocess.run(
        base + ["--config.steps=40", "--resume"], cwd=ROOT, env=env, check=True, capture_output=True
    )
    full = train.train_and_evaluate(resumable("exact_mean", 40), None, verbose=False)
    with open(os.path.join(workdir, "metrics.json")) as f:
        saved = json.load(f)
    assert strip_time(saved["history"]) == strip_time(full["history"])
    restored, meta = Checkpointer(os.path.join(workdir, "checkpoints"), 20).restore(full["final"])
    assert meta["step"] == 40
    assert_bitwise_equal(restored, full["final"])


def test_checkpoint_every_must_align_with_eval():
    with pytest.raises(ValueError, match="checkpoint_every=15: must be a multiple of eval_every=10"):
        train.train_and_evaluate(tiny_digits(checkpoint_every=15), "/tmp/unused", verbose=False)
