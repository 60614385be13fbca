"""experiments.pareto: the loss-vs-bytes table from per-method metrics.json files."""

import json

import pytest

from experiments import pareto


def _write(tmp_path, method, losses, bytes_per_eval, step_time=0.8, rounds_per_eval=10):
    history = [
        {
            "step": 100 * (i + 1),
            "test_loss": loss,
            "bytes_per_worker": bytes_per_eval * (i + 1),
            "comm_rounds": rounds_per_eval * (i + 1),
            "wall_time": 1.0,
        }
        for i, loss in enumerate(losses)
    ]
    summary = {**history[-1], "method": method, "step_time": step_time}
    (tmp_path / method).mkdir()
    (tmp_path / method / "metrics.json").write_text(
        json.dumps({"config": {"num_workers": 8}, "history": history, "summary": summary})
    )


def test_table_gap_ratio_front_and_time(tmp_path):
    _write(tmp_path, "exact_mean", [2.0, 1.0], 1000, rounds_per_eval=100)
    _write(tmp_path, "cheap", [2.0, 1.015], 1)  # within 2%, 1000x fewer
    _write(tmp_path, "bad", [2.0, 1.5], 2)  # dominated by cheap
    rows = {r["method"]: r for r in pareto.analyse(pareto.load(str(tmp_path)), "exact_mean")}
    assert rows["cheap"]["gap"] == pytest.approx(0.015)
    assert rows["cheap"]["fewer"] == pytest.approx(1000)
    assert pareto.pareto_front(list(rows.values())) == ["cheap", "exact_mean"]
    # 200 steps x 0.1 s + 2000 bytes at 1 Gbit/s + 200 rounds x 10 ms.
    assert rows["exact_mean"]["ttt_1gbit"] == pytest.approx(200 * 0.1 + 2000 * 8 / 1e9 + 200 * 0.01)
    assert rows["bad"]["ttt_1gbit"] is None  # never within 2%
    text = pareto.table(list(rows.values()), "exact_mean")
    assert "within 2% of exact_mean's loss: **cheap**, 1000×" in text
    assert "within 1% of exact_mean's loss: none" in text


def test_missing_reference_is_named(tmp_path):
    _write(tmp_path, "cheap", [1.0], 1)
    with pytest.raises(ValueError, match="exact_mean"):
        pareto.analyse(pareto.load(str(tmp_path)), "exact_mean")
    with pytest.raises(FileNotFoundError, match="metrics.json"):
        pareto.load(str(tmp_path / "cheap"))
