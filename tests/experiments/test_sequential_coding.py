"""experiments.sequential_coding: the run-time simulation's bookkeeping (not its numbers)."""

import numpy as np

from experiments import sequential_coding as sc
from optdist.stragglers import gradient_coding as gc
from optdist.stragglers import sequential as sq


def test_uncoded_waits_for_the_slowest_and_gc_for_the_cut():
    compute = sc.delay_profile(3, 40, 8)
    assert compute.shape == (40, 8) and np.all(compute > 0)
    t_uncoded = sc.runtime(8, compute, 40, 0.5, latency=0.2)
    np.testing.assert_allclose(t_uncoded, (0.2 + compute).max(axis=1).sum())  # load 1/n: n * (1/n) * c
    code = gc.cyclic_code(8, 2, tabulate=False)
    times = 0.2 + 3 * compute  # load 3/8
    cut = times.min(axis=1) * 1.5
    tolerated = (times > cut[:, None]).sum(axis=1) <= 2
    expect = np.where(tolerated, np.minimum(cut, times.max(axis=1)), times.max(axis=1)).sum()
    np.testing.assert_allclose(sc.runtime(code, compute, 40, 0.5, latency=0.2), expect)


def test_markov_clock_has_bursts():
    compute = sc.delay_profile(0, 2000, 16, p_slow=0.05, p_recover=0.5, slowdown=5.0, sigma=0.0)
    slow = compute > 2
    assert abs(slow.mean() - 0.05 / 0.55) < 0.02  # the chain's stationary share
    runs = slow[1:] & slow[:-1]
    assert abs(runs.sum() / slow[:-1].sum() - 0.5) < 0.05  # P(still slow | slow) = 1 - p_recover


def test_compare_picks_every_scheme_and_delivers_every_job():
    out = sc.compare(8, 30, seeds=(1,), max_delay=3, quick=True)
    assert set(out["schemes"]) == {"uncoded", "gc", "srsgc", "msgc"}
    m = out["schemes"]["msgc"]
    b, w, lam = m["params"]
    assert m["load"] == sq.multiplexed_code(8, b, w, lam).load and w - 2 + b <= 3
    assert out["schemes"]["gc"]["vs_gc"] == 1.0
