"""The compression cost benchmark runs end to end on a tiny tree, with the floor as documented."""

import json

import pytest

from experiments.benchmarks import compression_cost


def test_plan_covers_every_compressor_with_none_and_ef():
    rows = compression_cost.plan(None, None)
    names = {name for name, _, _ in rows}
    for name, _, _ in compression_cost.COMPRESSORS:
        if name.startswith("powersgd"):
            assert f"{name}+ef" in names and name not in names  # PowerSGD runs with EF only
        else:
            assert name in names and f"{name}+ef" in names
    assert {"top_k_1%+ef21", "top_k_1%+econtrol"} <= names
    assert [n for n, _, _ in compression_cost.plan(["ef"], ["sign_vote"])] == ["sign_vote+ef"]


def test_floor_formula():
    # W*G read + W*G written + 2*dS state + 2*W*P payload (written, read back)
    assert compression_cost.floor_bytes(100, 2, 0, 0) == 400
    assert compression_cost.floor_bytes(100, 2, 200, 10) == 400 + 400 + 40


def test_smoke(tmp_path, capsys, monkeypatch):
    tiny = {"conv": (3, 3, 4, 8), "kernel": (32, 10), "bias": (10,)}
    monkeypatch.setattr(compression_cost, "resnet50_shapes", lambda *args, **kwargs: tiny)
    out = tmp_path / "cost.json"
    report = compression_cost.main(["--small", "--repeats", "1", "--only", "sign_vote", "--out", str(out)])
    assert json.loads(out.read_text()) == report and report["complete"] is True
    rows = {r["method"]: r for r in report["rows"]}
    assert list(rows) == ["exact_mean", "sign_vote", "sign_vote+ef"]
    assert report["config"]["num_params"] == 3 * 3 * 4 * 8 + 32 * 10 + 10
    grad_bytes = 4 * report["config"]["num_params"]
    exact, vote, vote_ef = rows["exact_mean"], rows["sign_vote"], rows["sign_vote+ef"]
    assert exact["floor_bytes"] == 2 * 2 * grad_bytes and exact["time_ratio"] == 1.0
    payload = vote["sent_bytes_per_worker"]
    assert 0 < payload < grad_bytes / 16  # about one bit per entry
    extra_state = vote["state_bytes"] - exact["state_bytes"]
    assert 0 <= extra_state <= 64  # no residual: a step count per worker at most
    assert vote["floor_bytes"] == 2 * 2 * grad_bytes + 2 * extra_state + 2 * 2 * payload
    residual = 2 * grad_bytes  # EF keeps one f32 residual per worker, read and written once
    assert vote_ef["state_bytes"] - exact["state_bytes"] >= residual
    assert vote_ef["floor_bytes"] >= vote["floor_bytes"] + 2 * residual
    for row in rows.values():
        assert row["hlo_bytes"] >= row["hlo_bytes_once"] > 0
        assert row["hlo_ratio"] == row["hlo_bytes"] / row["floor_bytes"]
    assert "floor = W*G" in capsys.readouterr().out


def test_shard_map_execution_sends_the_simulated_bytes(monkeypatch):
    tiny = {"kernel": (32, 10), "bias": (10,)}
    monkeypatch.setattr(compression_cost, "resnet50_shapes", lambda *args, **kwargs: tiny)
    common = ["--small", "--repeats", "1", "--only", "cast_bf16"]
    simulated = compression_cost.main(common)
    meshed = compression_cost.main([*common, "--execution", "shard_map"])
    assert meshed["config"]["execution"] == "shard_map"
    for sim, mesh in zip(simulated["rows"], meshed["rows"], strict=True):
        assert sim["method"] == mesh["method"]
        assert mesh["sent_bytes_per_worker"] == sim["sent_bytes_per_worker"] > 0
        assert mesh["hlo_bytes"] > 0


def test_shard_map_execution_needs_a_device_per_worker(capsys):
    with pytest.raises(SystemExit):
        compression_cost.main(["--small", "--execution", "shard_map", "--workers", "16"])
    assert "needs that many devices, this process has 8" in capsys.readouterr().err
