"""experiments.dbw_heldout: the held-out protocol's bookkeeping (not its numbers)."""

import math

import pytest

from experiments import compare
from experiments import dbw_heldout as dh


def test_seed_ranges():
    assert dh.seed_range("6-9") == [6, 7, 8, 9]
    assert dh.seed_range("1,3,4") == [1, 3, 4]


def test_time_to_is_the_first_evaluation_at_or_above_the_target():
    history = [[5, 10.0, 0.90], [10, 20.0, 0.95], [15, 30.0, 0.93], [20, 40.0, 0.96]]
    assert dh.time_to(history, 0.93) == 20.0
    assert dh.time_to(history, 0.96) == 40.0
    assert dh.time_to(history, 0.97) is None


def test_tuned_static_skips_runs_that_miss_a_seed_and_dbw():
    times = {
        "backup_b2": [30.0, 30.0],
        "backup_b3": [10.0, None],  # fastest where it reaches, but misses a seed
        "backup_b4": [20.0, 26.0],
        "dbw": [1.0, 1.0],  # never the static choice
    }
    assert dh.tuned_static(times) == "backup_b4"
    assert dh.tuned_static({"backup_b2": [None], "dbw": [1.0]}) is None


def test_paired_ratio_uses_the_seeds_both_reach():
    dbw = [12.0, 30.0, None, 8.0]
    static = [10.0, None, 5.0, 10.0]
    r = dh.paired_ratio(dbw, static, draws=2000)
    assert r["seeds"] == 2 and r["dbw_faster"] == 1
    assert r["ratio"] == pytest.approx(20.0 / 20.0)
    assert r["geomean"] == pytest.approx(math.sqrt(1.2 * 0.8))
    assert r["dbw_misses"] == 1 and r["static_misses"] == 1
    lo, hi = r["interval"]  # resampling two seeds: the ratio lies between 0.8 (seed 4 twice) and 1.2
    assert 0.8 - 1e-12 <= lo < 1.0 < hi <= 1.2 + 1e-12


def test_every_run_of_a_seed_uses_that_seed_for_data_and_clock():
    runs = dict(compare.run_configs(dh.config_for(7)))
    assert sorted(runs) == sorted(dh.run_names())
    hparams = {name: cfg.hparams[cfg.method] for name, cfg in runs.items()}
    for name, cfg in runs.items():
        assert cfg.seed == 7 and hparams[name].clock_seed == 7 and cfg.eval_every == 5, name
        assert cfg.steps == 200 and hparams[name].delays == "pareto", name
    assert [hparams[f"backup_b{b}"].num_backup for b in dh.STATIC_BACKUPS] == list(dh.STATIC_BACKUPS)
    assert runs["dbw"].method == "dbw" and hparams["dbw"].smoothness == 1.0
