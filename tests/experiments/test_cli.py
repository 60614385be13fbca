"""The experiment binaries as users meet them (issue 19): validation, workdirs, resume, checkpoint
integrity, method settings as config fields, honest timing, plots, long-run progress."""

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time

import jax
import matplotlib.pyplot as plt
import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiments import compare, games, launch, methods, plotting, robustness, train
from experiments.checkpointing import Checkpointer
from experiments.configs import compare as compare_config
from experiments.configs import robustness as robustness_config
from tests.experiments.test_experiments import tiny_digits

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = os.path.join(ROOT, "experiments", "configs")
TINY = ["--config.hidden=16", "--config.num_workers=4", "--config.batch_size=8", "--config.eval_every=10"]


def cli(module, *args, cwd=ROOT, timeout=240):
    # The suite's XLA_FLAGS (tests/conftest.py: 8 devices, LLVM -O0), so runs compare with in-process ones.
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def leaves_equal(a, b):
    return all(
        np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))
    )


# 1. Config validation -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field,value",
    [
        ("learning_rate", math.nan),
        ("learning_rate", -0.1),
        ("learning_rate", math.inf),
        ("batch_size", 0),
        ("eval_every", 0),
        ("steps", -5),
        ("num_workers", 0),
        ("keep_checkpoints", 0),
        ("momentum", 1.5),
    ],
)
def test_bad_field_is_rejected_before_training_naming_it(field, value):
    with pytest.raises(ValueError, match=rf"config\.{field}=.*--config\.{field}="):
        train.validate(tiny_digits(**{field: value}))
    with pytest.raises(ValueError, match=rf"config\.{field}="):
        train.train_and_evaluate(tiny_digits(**{field: value}), None, verbose=False)


def test_bad_method_fields_and_choices_are_named():
    with pytest.raises(ValueError, match=r"config\.execution='vmap'"):
        train.validate(tiny_digits(execution="vmap"))
    with pytest.raises(ValueError, match=r"config\.num_byzantine=2: must be below half of num_workers=4"):
        train.validate(tiny_digits("robust", num_byzantine=2))
    c = tiny_digits("top_k")
    c.hparams.top_k.ratio = 1.5
    with pytest.raises(ValueError, match=r"config\.hparams\.top_k"):
        methods.build(c)
    c = tiny_digits("top_k")
    c.hparams.top_k.feedback = "error_feedback"
    with pytest.raises(ValueError, match=r"config\.hparams\.top_k.*feedback='error_feedback'"):
        methods.build(c)


def test_cli_rejects_nan_learning_rate_with_a_message_not_a_trace(tmp_path):
    out = cli("experiments.main", "--config.learning_rate=nan", f"--workdir={tmp_path}")
    assert out.returncode == 2, out.stderr[-2000:]
    assert "config.learning_rate=nan: must be a finite number > 0" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "metrics.json").exists()


def test_progress_lines_show_skipped_steps(capsys):
    c = tiny_digits("robust", steps=10)
    c.hparams.robust.update(dict(attack="nan_inf", aggregator="mean"))  # NaN reaches the plain mean
    result = train.train_and_evaluate(c, None)
    out = capsys.readouterr().out
    assert "| skipped 10 |" in out
    assert "every step so far was skipped" in out
    assert result["summary"]["skipped_steps"] == 10 and result["history"][-1]["skipped_steps"] == 10


# 2. Workdirs and resume -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """20 steps of the exact mean, checkpoints at 10 and 20 (the run every resume test copies)."""
    workdir = str(tmp_path_factory.mktemp("base") / "run")
    config = tiny_digits(steps=20, checkpoint_every=10, keep_checkpoints=3)
    result = train.train_and_evaluate(config, workdir, verbose=False)
    return workdir, result


def copy_run(base_run, tmp_path):
    dst = str(tmp_path / "run")
    shutil.copytree(base_run[0], dst)
    return dst


def test_fresh_run_over_existing_checkpoints_is_refused_unless_overwrite(base_run, tmp_path):
    workdir = copy_run(base_run, tmp_path)
    config = tiny_digits(steps=20, checkpoint_every=10, keep_checkpoints=3, learning_rate=0.1)
    with pytest.raises(train.RunExistsError, match=r"steps \[10, 20\].*--resume.*--overwrite"):
        train.train_and_evaluate(config, workdir, verbose=False)
    result = train.train_and_evaluate(config, workdir, overwrite=True, verbose=False)
    assert train.existing_checkpoints(os.path.join(workdir, "checkpoints")) == [10, 20]
    meta = Checkpointer(os.path.join(workdir, "checkpoints"), 10).read_meta(20)
    assert meta["config"]["learning_rate"] == 0.1  # the new run's checkpoints, not the old ones
    assert not leaves_equal(result["final"], base_run[1]["final"])


def test_resume_refuses_a_different_config_naming_the_fields(base_run, tmp_path):
    workdir = copy_run(base_run, tmp_path)
    config = tiny_digits(steps=30, checkpoint_every=10, keep_checkpoints=3, learning_rate=0.1)
    config.hparams.top_k.ratio = 0.5
    with pytest.raises(
        ValueError, match=r"hparams\.top_k\.ratio \(checkpoint 0\.01, now 0\.5\); learning_rate"
    ):
        train.train_and_evaluate(config, workdir, resume=True, verbose=False)


def test_resume_uses_the_stored_checkpoint_every(base_run, tmp_path, capsys):
    workdir = copy_run(base_run, tmp_path)
    config = tiny_digits(steps=30, checkpoint_every=0, keep_checkpoints=3)  # checkpoint_every not passed
    result = train.train_and_evaluate(config, workdir, resume=True)
    out = capsys.readouterr().out
    assert "using the stored checkpoint_every=10" in out and "resumed from step 20" in out
    assert [r["step"] for r in result["history"]] == [10, 20, 30]
    assert train.existing_checkpoints(os.path.join(workdir, "checkpoints")) == [10, 20, 30]


def test_resume_of_a_finished_run_rewrites_metrics(base_run, tmp_path):
    workdir = copy_run(base_run, tmp_path)
    os.remove(os.path.join(workdir, "metrics.json"))
    result = train.train_and_evaluate(tiny_digits(steps=20, keep_checkpoints=3), workdir, resume=True)
    with open(os.path.join(workdir, "metrics.json")) as f:
        saved = json.load(f)
    assert [r["step"] for r in saved["history"]] == [10, 20]
    assert saved["summary"]["test_loss"] == base_run[1]["summary"]["test_loss"]
    assert leaves_equal(result["final"], base_run[1]["final"])


def test_cli_default_workdir_is_named_after_the_config_and_finished_resume_exits_0(tmp_path):
    args = ["--config=" + os.path.join(CONFIGS, "digits.py"), *TINY, "--config.steps=10"]
    out = cli("experiments.main", *args, "--config.checkpoint_every=10", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "runs" / "digits" / "exact_mean"
    assert (run / "metrics.json").exists() and (run / "checkpoints" / "10").is_dir()
    (run / "metrics.json").unlink()
    out = cli("experiments.main", *args, "--resume", cwd=tmp_path)  # no checkpoint_every passed
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed from step 10" in out.stdout and (run / "metrics.json").exists()


# 3. Checkpoint integrity ----------------------------------------------------------------------


def flip_bytes(state_dir):
    """Flips 16 bytes in the middle of every array data file (some are stale copies orbax ignores)."""
    data_dir = os.path.join(state_dir, "ocdbt.process_0", "d")
    for name in os.listdir(data_dir):
        with open(os.path.join(data_dir, name), "r+b") as f:
            data = bytearray(f.read())
            mid = len(data) // 2
            data[mid : mid + 16] = bytes(b ^ 0xFF for b in data[mid : mid + 16])
            f.seek(0)
            f.write(data)


def truncate(state_dir):
    """Truncates the array metadata and every array data file to half its size."""
    data_dir = os.path.join(state_dir, "ocdbt.process_0", "d")
    for path in [os.path.join(state_dir, "_METADATA")] + [
        os.path.join(data_dir, n) for n in os.listdir(data_dir)
    ]:
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)


def half_written_record(state_dir):
    with open(os.path.join(os.path.dirname(state_dir), "meta", "metadata"), "w") as f:
        f.write('{"step": 20, "hist')


@pytest.mark.parametrize("damage", [flip_bytes, truncate, half_written_record])
def test_damaged_latest_checkpoint_falls_back_to_the_newest_intact_one(base_run, tmp_path, capfd, damage):
    workdir = copy_run(base_run, tmp_path)
    damage(os.path.join(workdir, "checkpoints", "20", "state"))
    config = tiny_digits(steps=20, checkpoint_every=10, keep_checkpoints=3)
    result = train.train_and_evaluate(config, workdir, resume=True)
    captured = capfd.readouterr()
    out = captured.out
    assert "checkpoint at step 20 skipped:" in out and "resumed from step 10" in out
    assert "Traceback" not in out + captured.err and "Event loop is closed" not in captured.err
    assert leaves_equal(result["final"], base_run[1]["final"])  # retrained 10 -> 20 bit for bit
    directory = os.path.join(workdir, "checkpoints")
    assert os.path.isdir(os.path.join(directory, "20.damaged"))  # set aside, then step 20 saved anew
    assert train.existing_checkpoints(directory) == [10, 20]


def test_silently_changed_arrays_fail_the_content_hash(base_run, tmp_path, capsys):
    workdir = copy_run(base_run, tmp_path)
    directory = os.path.join(workdir, "checkpoints")
    ckpt = Checkpointer(directory, 10, 3)
    like = base_run[1]["final"]
    state, meta = ckpt.restore(like, 20)
    shutil.rmtree(os.path.join(directory, "20"))
    ckpt.close()
    ckpt = Checkpointer(directory, 10, 3)
    tampered = jax.tree_util.tree_map(lambda x: np.array(x), state)
    leaf = jax.tree_util.tree_leaves(tampered)[0]
    leaf.flat[0] = 1.7e10  # a readable file with a wrong value: only the hash can tell
    args = ocp.args.Composite(state=ocp.args.StandardSave(tampered), meta=ocp.args.JsonSave(meta))
    ckpt.manager.save(20, args=args, force=True)
    ckpt.close()
    result = train.train_and_evaluate(
        tiny_digits(steps=20, checkpoint_every=10, keep_checkpoints=3), workdir, resume=True
    )
    out = capsys.readouterr().out
    assert "checkpoint at step 20 skipped: its array contents do not match the saved hash" in out
    assert "resumed from step 10" in out
    assert leaves_equal(result["final"], base_run[1]["final"])


def test_no_intact_checkpoint_is_a_clear_error(base_run, tmp_path):
    workdir = copy_run(base_run, tmp_path)
    for step in (10, 20):
        truncate(os.path.join(workdir, "checkpoints", str(step), "state"))
    with pytest.raises(train.NoIntactCheckpointError, match=r"No intact checkpoint.*--overwrite"):
        train.train_and_evaluate(
            tiny_digits(steps=20, keep_checkpoints=3), workdir, resume=True, verbose=False
        )


# 4. Methods are registered names plus declared config fields ----------------------------------


OLD_NAMES = (
    "exact_mean,local_only,powersgd_r1,powersgd_r2,powersgd_r4,topk_1pct_ef,topk_1pct,topk_1pct_ef21,"
    "topk_1pct_econtrol,qsgd_8bit,terngrad,sign_ef,bf16,demo,int8_ef,ternary_ef,scaled_sign_ef,"
    "threshold_topk_1pct_ef,diloco_h10,diloco_h50,diloco_h200,diloco_h50_powersgd_r16,local_sgd_h10,"
    "streaming_diloco_h50,qsr_diloco,fedavg_h10,fedadam_h10,dsgd_ring,dsgd_exponential,"
    "dsgd_one_peer_exponential,choco_ring_topk10,gradient_tracking_ring,shampoo"
).split(",")


def test_presets_write_their_settings_into_config_fields():
    c = tiny_digits("diloco_h10")
    methods.build(c)
    assert c.hparams.diloco.sync_every == 10
    c = tiny_digits("choco_ring_topk10")
    methods.build(c)
    assert c.hparams.choco.consensus_step_size == 0.3  # declared (it was read with config.get)
    c = tiny_digits("diloco_h10")
    c.hparams.diloco.sync_every = 7
    with pytest.raises(ValueError, match=r"hparams\.diloco\.sync_every=7 conflicts with preset 'diloco_h10'"):
        methods.build(c)
    for name in OLD_NAMES:
        methods.build(tiny_digits(name))
    with pytest.raises(ValueError, match=r"--config\.method=robust --config\.hparams\.robust\.attack"):
        methods.resolve("robust/alie/trimmed_mean+nnm")


def test_every_config_declares_every_field_it_reads():
    import importlib

    for name in sorted(os.listdir(CONFIGS)):
        if not name.endswith(".py") or name == "__init__.py":
            continue
        config = importlib.import_module(f"experiments.configs.{name[:-3]}").get_config()
        if name == "robustness.py":
            attacks, rows, fs = robustness.grid_cells(config)
            for agg, var in rows:
                cfg = robustness.cell_config(config, fs[0], attacks[-1], agg, var)
                train.validate(cfg)
                methods.build(cfg)
        elif name == "bilinear_game.py":  # the min-max binary (experiments.games): every method builds
            for m in config.methods.split(","):
                games.method(m.strip(), config)
        elif "base" in config:
            assert len(compare.run_configs(config)) == len(compare._split(config.methods))
        else:
            train.validate(config)
            methods.build(config)
    for path in ("train.py", "methods.py", "compare.py", "robustness.py", "data.py", "models.py"):
        with open(os.path.join(ROOT, "experiments", path)) as f:
            assert "config.get(" not in f.read(), f"{path} reads a config field that may be undeclared"


def test_misspelt_method_in_compare_is_rejected_before_any_training(tmp_path):
    cfg = compare_config.get_config()
    cfg.base = tiny_digits()
    cfg.methods = "exact_mean,topk_1pct_eff"
    with pytest.raises(ValueError, match=r"config\.methods: Unknown method 'topk_1pct_eff'"):
        compare.run_comparison(cfg, str(tmp_path))
    assert not (tmp_path / "exact_mean").exists()
    cfg.methods = "exact_mean,v"
    cfg.variants = {"v": {"method": "top_k", "ration": 0.1}}
    with pytest.raises(ValueError, match=r"config\.variants\.v sets \['ration'\]"):
        compare.run_comparison(cfg, str(tmp_path))


def test_cli_list_shows_fields_methods_and_overrides():
    out = cli("experiments.main", "--list", "--config.num_byzantine=4", "--config.hparams.top_k.ratio=0.05")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "num_byzantine = 4" in out.stdout and "learning_rate = 0.05  # " in out.stdout
    assert "ratio = 0.05  (default 0.01)" in out.stdout
    assert "diloco_h50" in out.stdout and "sync_every = 50" in out.stdout


# 5. Honest figures ----------------------------------------------------------------------------


def test_step_timer_excludes_compilation():
    timer = train.StepTimer()
    timer.record(10, 5.0, None)  # first call of this chunk length: compile + 10 steps
    timer.record(10, 1.0, None)
    timer.record(5, 3.0, None)  # a new length compiles again
    timer.record(10, 1.2, None)
    assert timer.step_time == pytest.approx(2.2 / 20)
    assert timer.compile_time == pytest.approx(8.0 - 15 * 0.11)


def test_time_to_target_uses_steady_state_compute_and_latency_per_round():
    cfg = compare_config.get_config()
    cfg.base.num_workers = 4
    cfg.target_accuracy = 0.9
    cfg.bandwidth_gbit = 0.1
    cfg.latency_ms = 10.0
    history = [
        {"step": 10, "test_accuracy": 0.5, "bytes_per_worker": 1000, "comm_rounds": 2},
        {"step": 20, "test_accuracy": 0.95, "bytes_per_worker": 2_000_000, "comm_rounds": 4},
    ]
    summary = {"step": 20, "wall_time": 100.0, "step_time": 0.2}  # wall time is mostly compilation
    expected = 20 * 0.2 / 4 + 2_000_000 * 8 / 0.1e9 + 4 * 0.010
    assert compare.modeled_time_to_target(history, cfg, summary) == pytest.approx(expected)


def test_compare_table_rounds_and_footer(tmp_path, capsys):
    cfg = compare_config.get_config()
    cfg.base = tiny_digits(skip_nonfinite=False)
    cfg.methods = "exact_mean,local_only,local_sgd_h10"
    cfg.base.hparams.local_sgd.sync_every = 10
    cfg.target_accuracy = 0.0
    rows = compare.run_comparison(cfg, str(tmp_path), verbose=False)
    out = capsys.readouterr().out
    assert [r["comm_rounds"] for r in rows] == [20, 0, 2]  # every step / never / every 10th step
    assert "compilation excluded" in out
    for r in rows:
        assert 0 < r["step_time"] < r["wall_time"] / r["step"]
    assert (tmp_path / "exact_mean" / "metrics.json").exists() and (tmp_path / "results.json").exists()


# 6. Plots -------------------------------------------------------------------------------------


def test_plot_colours_legends_and_log_axes():
    def hist(b, acc):
        return [
            {"step": s, "train_loss": 2.0 / s, "test_accuracy": acc * s / 30, "bytes_per_worker": b * s}
            for s in (10, 20, 30)
        ]

    histories = {"exact": hist(10**6, 0.9), "silent": hist(0, 0.5), "small": hist(10**3, 0.8)}
    fig, axes = plotting.make_figure(histories)
    fig.canvas.draw()
    reference = None
    for ax in axes:
        colours = {line.get_label().replace(" (0 bytes)", ""): line.get_color() for line in ax.get_lines()}
        assert set(colours) == set(histories)  # every method in every panel, the silent one included
        reference = reference or colours
        assert colours == reference  # one colour per method across panels
        legend = ax.get_legend().get_window_extent()
        assert legend.y1 < ax.get_window_extent().y0  # below the axes: covers no data
    assert axes[2].get_xscale() == "log" and axes[0].get_yscale() == "log"
    assert len(set(reference.values())) == 3
    plt.close(fig)


# 7. Long runs ---------------------------------------------------------------------------------


def test_robustness_grid_prints_count_and_eta(tmp_path, capsys):
    cfg = robustness_config.get_config()
    cfg.base = tiny_digits(steps=10)
    cfg.attacks, cfg.aggregators, cfg.variants, cfg.num_byzantine = "none,sign_flip", "mean", "plain", "1"
    out = robustness.run_grid(cfg, str(tmp_path))
    text = capsys.readouterr().out
    assert "[1/2] f=1 mean" in text and "[2/2] f=1 mean" in text and "ETA" in text
    with open(tmp_path / "results.json") as f:
        assert json.load(f)["tables"]["1"] == out["tables"]["1"]
    cfg.variants = "plain,+nnm"
    with pytest.raises(ValueError, match=r"config\.variants.*unknown \['\+nnm'\]"):
        robustness.run_grid(cfg, None)


def test_launch_exit_status_is_128_plus_signal():
    assert launch.exit_status(-9) == 137 and launch.exit_status(-6) == 134
    assert launch.exit_status(3) == 3 and launch.exit_status(0) == 0
    assert "SIGKILL" in launch.describe_exit(-9)


def test_process_without_a_coordinator_logs_what_it_waits_for_and_gives_up():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nobody listens there
    args = [
        "--num_processes=2",
        "--process_id=1",
        f"--coordinator_address=127.0.0.1:{port}",
        "--peer_timeout=3",
    ]
    out = cli("experiments.main", *args, timeout=120)
    assert out.returncode == 1
    assert f"waiting up to 3s for the coordinator (process 0) at 127.0.0.1:{port}" in out.stdout
    assert "did not open within 3s" in out.stdout and "--peer_timeout" in out.stdout


def test_the_saved_record_is_a_snapshot_of_meta(tmp_path):
    """orbax writes the record in the background while the training loop goes on appending to its
    history: the record on disk must be the one hashed at save time (found as a flaky resume)."""
    ckpt = Checkpointer(str(tmp_path), 1)
    history = [{"step": 1, "loss": 0.5}]
    ckpt.save(1, {"w": np.ones((256, 256), np.float32)}, {"step": 1, "history": history}, force=True)
    step, start = 1, time.perf_counter()
    while time.perf_counter() - start < 0.2:  # mutate while the save is in flight (holding the GIL)
        step += 1
        history.append({"step": step, "loss": 0.1})
        history[0]["loss"] = float(step)
    ckpt.close()
    ckpt = Checkpointer(str(tmp_path), 1)
    assert ckpt.read_meta(1)["history"] == [{"step": 1, "loss": 0.5}]
    said = []
    assert ckpt.restore_intact({"w": np.zeros((256, 256), np.float32)}, log=said.append) is not None, said
    ckpt.close()
