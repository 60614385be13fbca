"""The overlap benchmark runs end to end on the 8 CPU devices; its HLO check tells the two syncs apart."""

import json

from experiments.benchmarks import overlap as bench


def test_bench_smoke(tmp_path, capsys):
    out = tmp_path / "overlap.json"
    report = bench.main(["--small", "--repeats", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == report and report["complete"] is True
    (row,) = report["rows"]
    assert row["sync_every"] == 2 and report["config"]["workers"] == 8
    assert row["plain_depends_on_gradient"] is True
    assert row["overlapped_depends_on_gradient"] is False
    assert min(row["bare_ms"], row["plain_ms"], row["overlapped_ms"]) > 0
    assert "DiLoCo sync overlap" in capsys.readouterr().out
