"""The gossip benchmark runs end to end in both modes and reports exact bytes (tiny model)."""

import json

from experiments.benchmarks import gossip as bench


def test_bench_smoke(tmp_path, capsys, monkeypatch):
    everything = bench.methods
    monkeypatch.setattr(
        bench, "methods", lambda axis: {k: everything(axis)[k] for k in ("exact_mean", "dsgd_ring")}
    )
    out = tmp_path / "gossip.json"
    report = bench.main(["--small", "--out", str(out)])
    assert json.loads(out.read_text()) == report and report["complete"] is True
    rows = report["rows"]
    assert [(r["mode"], r["method"]) for r in rows] == [
        (mode, m) for mode in ("simulate", "data_parallel") for m in ("exact_mean", "dsgd_ring")
    ]
    params = 16 * 32 + 32 + 32 * 16 + 16  # the --small MLP
    by_name = {r["method"]: r for r in rows}
    assert by_name["dsgd_ring"]["bytes_per_step"] == 2 * 4 * params  # the parameters to both ring neighbours
    assert by_name["exact_mean"]["bytes_per_step"] == 2 * 7 * -(-params // 8) * 4  # ring all-reduce
    assert rows[0]["ratio_to_exact_mean"] == 1.0
    assert "dsgd_ring" in capsys.readouterr().out
