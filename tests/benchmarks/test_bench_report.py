"""The shared benchmark helpers: timing, progress with ETA, JSON written row by row, gpu.sh's exit code."""

import io
import json
import os
import pathlib
import stat
import subprocess

import pytest

from experiments.benchmarks import report, timing

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_seconds_per_call_warms_up_and_reduces():
    calls = []
    seconds = timing.seconds_per_call(lambda x: calls.append(x) or x, 7, repeats=3, warmup=2, number=2)
    assert calls == [7] * (2 + 3 * 2)
    assert 0 <= seconds < 0.1
    with pytest.raises(ValueError, match="reduce"):
        timing.seconds_per_call(lambda: 0, reduce="mean")
    with pytest.raises(ValueError, match="repeats"):
        timing.seconds_per_call(lambda: 0, repeats=0)


def test_machine_says_what_the_numbers_come_from():
    info = timing.machine()
    assert {"device", "backend", "cpu", "cpu_cores", "jax"} <= set(info)
    assert info["jax"] in timing.describe(info)


def test_progress_counts_and_estimates():
    stream = io.StringIO()
    progress = report.Progress(4, stream=stream)
    assert progress.eta() is None
    progress.step("a")
    progress.step("b")
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("[1/4] a") and lines[1].startswith("[2/4] b")
    assert all("ETA" in line for line in lines)
    assert progress.eta() >= 0


def test_results_are_on_disk_after_every_row(tmp_path):
    path = tmp_path / "rows.json"
    results = report.Results(str(path), "demo", {"device": "cpu"}, {"n": 3})
    assert json.loads(path.read_text())["rows"] == []
    results.add({"method": "a", "ms": 1.5})
    on_disk = json.loads(path.read_text())
    assert on_disk["complete"] is False and on_disk["rows"] == [{"method": "a", "ms": 1.5}]
    results.add({"method": "b", "ms": 2.0})
    payload = results.finish(extra=1)
    assert json.loads(path.read_text()) == payload
    assert payload["complete"] is True and payload["extra"] == 1 and len(payload["rows"]) == 2
    assert not (tmp_path / "rows.json.tmp").exists()
    report.Results(None, "demo", {}).add({"x": 1})  # no path: nothing written, no error


def test_format_row_marks_missing_values():
    columns = [("method", "method", "<8"), ("ms", "ms", ">8.2f")]
    assert report.format_row({"method": "a", "ms": 1.0}, columns) == "a           1.00"
    assert report.format_row({"method": "b"}, columns) == "b              -"
    assert report.format_header(columns) == "method        ms"


def test_gpu_sh_runs_every_step_and_fails_if_one_failed(tmp_path):
    """With a stand-in python3 whose Shampoo-roots step fails, the later steps still run, exit 1."""
    fake = tmp_path / "bin"
    fake.mkdir()
    script = fake / "python3"
    script.write_text('#!/bin/bash\necho "ran $*"\ncase "$*" in *shampoo_roots*) exit 3;; esac\nexit 0\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    out = tmp_path / "out"
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "OUT": str(out), "ALL": "1"}
    proc = subprocess.run(
        ["bash", "experiments/benchmarks/gpu.sh"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    log = (out / "gpu.log").read_text()
    assert "FAILED (exit 3): python3 -m experiments.benchmarks.shampoo_roots" in log
    for later in ("shampoo_step", "compression_cost", "compression ", "outer_loop", "gossip"):
        assert f"ran -m experiments.benchmarks.{later}" in log
    assert "1 step(s) failed" in log

    script.write_text('#!/bin/bash\necho "ran $*"\nexit 0\n')
    proc = subprocess.run(
        ["bash", "experiments/benchmarks/gpu.sh"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0 and "all steps passed" in proc.stdout
