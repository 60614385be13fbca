"""The compression benchmark script runs end to end and writes its JSON (on a tiny tree)."""

import json
import math

from experiments.benchmarks import compression as bench


def test_resnet50_tree_has_resnet50_size():
    shapes = bench.resnet50_shapes()
    assert len(shapes) == 161
    assert 25.5e6 < sum(math.prod(s) for s in shapes.values()) < 25.6e6


def test_bench_smoke(tmp_path, capsys, monkeypatch):
    tiny = {"conv": (3, 3, 4, 8), "kernel": (32, 10), "bias": (10,)}
    monkeypatch.setattr(bench, "resnet50_shapes", lambda *args, **kwargs: tiny)
    out = tmp_path / "bench.json"
    bench.main(["--small", "--repeats", "1", "--only", "sign_scaled_ef", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["complete"] is True
    assert [r["method"] for r in report["rows"]] == ["exact_mean", "sign_scaled_ef"]
    exact, sign = report["rows"]
    assert exact["time_ratio"] == 1.0 and exact["bytes_ratio"] == 1.0
    assert report["config"]["num_params"] == 3 * 3 * 4 * 8 + 32 * 10 + 10
    assert 0 < sign["bytes_ratio"] < 0.1  # ~1 bit per entry; the 10-vector is 1/63 of the tree
    assert "sign_scaled_ef" in capsys.readouterr().out
