"""The reproduction table: claims run in quick mode, the markdown / JSON writer, bad input."""

import json

import pytest

from experiments import reproduce
from experiments.claims import REGISTRY, Claim

FAST = ["ef_fixes_biased_compression", "terngrad_unbiased_variance"]  # ~2 s of CPU together


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("repro") / "TABLE.md"
    return reproduce.reproduce(FAST, quick=True, out=str(out), log=lambda m: None), out


def test_quick_claims_run_and_pass(report):
    rep, _ = report
    assert [r["name"] for r in rep["claims"]] == FAST  # registry order, only those asked for
    for r in rep["claims"]:
        assert r["error"] is None, r["error"]
        assert r["passed"] is True, r["ours"]
        assert r["wall_s"] > 0 and r["cpu_s"] > 0
        assert r["rerun"] == f"python -m experiments.reproduce --quick --only={r['name']}"
    ef = rep["claims"][0]["measured"]
    assert ef["no_ef"] > 1e3 * ef["initial"] and ef["ef"] < 1e-3  # the counterexample really diverges


def test_json_and_markdown_written(report):
    rep, out = report
    stored = json.loads(out.with_suffix(".json").read_text())
    assert stored["complete"] is True and stored["quick"] is True
    assert [r["name"] for r in stored["claims"]] == FAST
    md = out.read_text()
    header = next(line for line in md.splitlines() if line.startswith("| Name"))
    for col in ("Paper", "Claim", "Paper's figure", "Ours", "Config", "Result", "Rerun"):
        assert f"| {col} " in header
    rows = [line for line in md.splitlines() if line.startswith("| `")]
    assert len(rows) == len(FAST)
    assert all(row.count(" | ") == len(reproduce.COLUMNS) for row in rows)  # no stray pipes split a row
    assert "2 of 2 claims pass" in md and "--out=" in md
    assert reproduce.to_markdown(stored) == md  # --render rebuilds the same table from the JSON


def test_failing_and_raising_claims_are_recorded_not_fatal(tmp_path):
    def boom(quick):
        raise RuntimeError("no | data")

    bad = Claim("boom", "p", "c", "f", "crit", lambda q: "cfg", boom, lambda m: True, lambda m: "")
    record = reproduce.run_claim(bad, quick=True)
    assert record["passed"] is False and "RuntimeError: no | data" in record["ours"]
    assert "Traceback" in record["error"]
    report = {**reproduce_report_stub(), "claims": [record]}
    md = reproduce.to_markdown(report)
    row = next(line for line in md.splitlines() if line.startswith("| `boom`"))
    assert "no \\| data" in row and "| error |" in row and row.count(" | ") == len(reproduce.COLUMNS)
    assert "did not reproduce" in md and "incomplete run" in md


def reproduce_report_stub():
    return {
        "command": "python -m experiments.reproduce",
        "quick": True,
        "machine": "test",
        "started": "now",
        "finished": None,
        "complete": False,
        "wall_s": 0.0,
        "cpu_s": 0.0,
    }


def test_unknown_claim_is_named():
    with pytest.raises(ValueError, match="no_such_claim"):
        reproduce.select(["no_such_claim"])


def test_registry_covers_the_brief():
    required = {
        "powersgd_parity",
        "powersgd_rank_exact",
        "ef_fixes_biased_compression",
        "ef21_econtrol_vs_ef",
        "demo_vs_adamw",
        "qsgd_unbiased_variance",
        "terngrad_unbiased_variance",
        "shampoo_fewer_steps",
        "diloco_parity",
        "streaming_diloco",
        "qsr_vs_constant_h",
        "scaffold_vs_fedavg",
        "robust_monna_nnm",
        "robust_centered_clip",
        "gradient_tracking_vs_dsgd",
        "choco_sgd",
        "seeded_spsa",
    }
    assert required <= set(REGISTRY)
    for c in REGISTRY.values():
        assert c.paper and c.claim and c.paper_figure and c.criterion
        assert c.config(True) and c.config(False)
