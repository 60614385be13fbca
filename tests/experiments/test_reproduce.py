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
        # issues 16 and 17 (experiments/claims/methods.py)
        "micro_adam",
        "sketch_unbiased",
        "diff2",
        "fish_mask",
        "schedule_free_outer",
        "multi_momentum_one_cluster",
        "median_sgd_cauchy",
        "smea_dp_attack",
        "extragradient_bilinear",
        "masha_bytes_to_eps",
        "local_gda_rounds",
        "upgrad",
        "dbw_time_to_target",
        "gradient_coding_exact",
        "sequential_gc_runtime",
    }
    assert required <= set(REGISTRY)
    for c in REGISTRY.values():
        assert c.paper and c.claim and c.paper_figure and c.criterion
        assert c.config(True) and c.config(False)


def test_merge_keeps_other_rows_and_marks_when_each_row_ran(report, tmp_path):
    rep, out = report
    md = tmp_path / "TABLE.md"
    (tmp_path / "TABLE.json").write_text(out.with_suffix(".json").read_text())
    first = json.loads(out.with_suffix(".json").read_text())
    new = "multi_momentum_one_cluster"  # < 1 s of CPU
    merged = reproduce.merge([new], quick=True, out=str(md), log=lambda m: None)
    merged = reproduce.merge([new], quick=True, out=str(md), log=lambda m: None)  # a rerun replaces its row
    stored = json.loads((tmp_path / "TABLE.json").read_text())
    assert stored == merged
    assert [r["name"] for r in stored["claims"]] == FAST + [new]  # registry order, no duplicate
    for old, kept in zip(first["claims"], stored["claims"]):
        assert kept == {**old, "run_at": first["finished"]}  # untouched, run time backfilled
    row = stored["claims"][-1]
    assert row["merged"] is True and row["passed"] is True and row["run_at"]
    assert (stored["command"], stored["started"]) == (first["command"], first["started"])  # first run's
    assert [m["claims"] for m in stored["merges"]] == [[new], [new]]
    assert (
        stored["merges"][0]["command"]
        == f"python -m experiments.reproduce --quick --merge --only={new} --out={md}"
    )
    assert stored["cpu_s"] == round(sum(r["cpu_s"] for r in stored["claims"]), 2)
    text = md.read_text()
    assert text == reproduce.to_markdown(stored) and "3 of 3 claims pass" in text
    line = next(x for x in text.splitlines() if x.startswith(f"| `{new}`"))
    assert f"(run {row['run_at']})" in line and line.count(" | ") == len(reproduce.COLUMNS)
    assert "merged into this table later" in text
    with pytest.raises(ValueError, match="quick"):
        reproduce.merge([new], quick=False, out=str(md), log=lambda m: None)
    with pytest.raises(ValueError, match="--only"):
        reproduce.merge([], quick=True, out=str(md), log=lambda m: None)
    with pytest.raises(ValueError, match="does not exist"):
        reproduce.merge([new], quick=True, out=str(tmp_path / "NONE.md"), log=lambda m: None)
