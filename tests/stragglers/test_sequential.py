"""Sequential gradient coding: every job decodes exactly (float64) on every (B, W, lambda)-bursty straggler
record of small codes, enumerated exhaustively; the paper's loads; the master's straggler record."""

import itertools

import numpy as np
import pytest

from optdist.stragglers import gradient_coding as gc
from optdist.stragglers import sequential as sq


def _window_ok(record, burst, stragglers):
    """Independent check of the window ending at the last round: distinct stragglers and burst lengths."""
    hit = record.any(axis=0)
    spans = [np.ptp(np.flatnonzero(record[:, i])) + 1 for i in np.flatnonzero(hit)]
    return hit.sum() <= stragglers and all(s <= burst for s in spans)


def test_bursty_records_are_exactly_the_bursty_ones():
    """The enumerator against a brute-force filter of all 2^(n R) records with an independent check."""
    n, rounds, burst, window, lam = 3, 4, 1, 3, 2

    def independent(rec):
        return all(_window_ok(rec[a : a + window], burst, lam) for a in range(rounds - window + 1))

    brute = [
        np.array(bits, bool).reshape(rounds, n)
        for bits in itertools.product([False, True], repeat=n * rounds)
        if independent(np.array(bits, bool).reshape(rounds, n))
    ]
    got = sq.bursty_records(n, rounds, burst, window, lam)
    assert sorted(r.tobytes() for r in got) == sorted(r.tobytes() for r in brute)
    assert all(sq.is_bursty(r, burst, window, lam) for r in got) and len(got) < 2 ** (n * rounds)


def _job_data(code, rng, dim=3):
    """One job's data: D1 chunk gradients [n, W-1, dim], D2 partition gradients [G, n, dim]; the true g(t)
    and every worker's coded results [G, n, dim]."""
    n = code.num_workers
    chunks = rng.normal(size=(n, code.chunks, dim))
    parts = rng.normal(size=(code.groups, n, dim))
    coded = np.stack([code.code.encoding @ parts[g] for g in range(code.groups)]) if code.groups else parts
    return chunks, coded, chunks.sum(axis=(0, 1)) + parts.sum(axis=(0, 1))


SR = [(3, 1, 2, 1, 3), (3, 1, 3, 2, 4), (4, 1, 2, 2, 3), (4, 1, 3, 2, 3), (4, 2, 3, 2, 2)]
MSGC = [
    (3, 1, 2, 1, 3),
    (3, 1, 3, 2, 4),
    (3, 2, 3, 2, 3),
    (3, 2, 4, 1, 3),
    (4, 1, 2, 2, 2),
    (4, 1, 3, 3, 2),
    (3, 1, 2, 3, 2),
]


@pytest.mark.parametrize(
    "factory,case",
    [(sq.selective_repeat_code, c) for c in SR] + [(sq.multiplexed_code, c) for c in MSGC],
    ids=[f"sr{c[:4]}" for c in SR] + [f"m{c[:4]}" for c in MSGC],
)
def test_every_job_decodes_exactly_on_every_bursty_record(factory, case):
    n, burst, window, lam, jobs = case
    code = factory(n, burst, window, lam, seed=n + lam)
    rounds = jobs + code.delay
    records = sq.bursty_records(n, rounds, burst, window, lam)
    assert len(records) > 30
    rng = np.random.default_rng(sum(case))
    data = [_job_data(code, rng) for _ in range(jobs)]
    for rec in records:
        assert sq.is_bursty(rec, burst, window, lam)
        sched = sq.schedule(code, rec)
        assert np.all(sched.decoded_round >= 0), rec
        assert np.all(sched.decoded_round <= np.arange(jobs) + code.delay)
        for t, (chunks, coded, full) in enumerate(data):
            got = sq.decode(code, sched, t, chunks, coded)
            np.testing.assert_allclose(got, full, rtol=0, atol=1e-6 * np.abs(full).max())


def test_records_outside_the_model_can_fail():
    """The guarantee is the model's: one burst too many loses a job (so the exhaustive test can fail)."""
    code = sq.multiplexed_code(4, 1, 2, 2)
    rec = np.zeros((4, 4), bool)
    rec[1:3, 0] = True  # worker 0 straggles two rounds in a row (B = 1): job 1's only chunk never arrives
    assert not sq.is_bursty(rec, 1, 2, 2)
    sched = sq.schedule(code, rec)
    assert sched.decoded_round[1] == -1
    with pytest.raises(ValueError, match="did not decode"):
        sq.decode(code, sched, 1, *_job_data(code, np.random.default_rng(0))[:2])
    sr = sq.selective_repeat_code(4, 1, 2, 2)
    burst = np.zeros((3, 4), bool)
    burst[0, :3] = True  # three stragglers (lambda = 2): job 0 has 1 result of the n - s = 3 it needs
    burst[1, 0] = True  # worker 0, one of the two repeating job 0, straggles again (B = 1)
    assert not sq.is_bursty(burst, 1, 2, 2)
    assert sq.schedule(sr, burst).decoded_round[0] == -1


@pytest.mark.parametrize("n,burst,window,lam", [(8, 1, 2, 2), (8, 2, 5, 3), (16, 3, 7, 4), (6, 1, 3, 6)])
def test_loads_are_the_papers(n, burst, window, lam):
    m = sq.multiplexed_code(n, burst, window, lam)
    if lam < n:
        expect = (lam + 1) * (window - 1 + burst) / (n * (burst + (window - 1) * (lam + 1)))
        assert m.code.stragglers == lam and m.groups == burst
    else:
        expect = (window - 1 + burst) / (n * (window - 1))
        assert m.code is None and m.groups == 0
    assert m.load == pytest.approx(expect, rel=1e-12)
    # minitasks cover the job's data exactly once: n (W-1) chunks + B groups of (lambda+1)/n coded shares
    coded_share = 0.0 if lam == n else (1 - m.chunk_fraction) * (lam + 1) / (n * burst)
    assert m.chunk_fraction == pytest.approx(n * (window - 1) * m.minitask)
    if lam < n:
        assert coded_share == pytest.approx(m.minitask)
    # in steady state with no stragglers every worker carries exactly that load (lambda = n: the B repeat
    # slots are provisioned but idle, so only the W - 1 chunks, 1/n, are computed)
    sched = sq.schedule(m, np.zeros((40, n), bool))
    steady = m.load if lam < n else 1 / n
    np.testing.assert_allclose(sched.load[m.delay : 40 - m.delay], steady, rtol=1e-12)
    assert sched.load.max() <= m.load * (1 + 1e-12)
    # M-SGC is cheaper than per-round gradient coding for the same lambda stragglers
    if lam < n:
        assert m.load < (lam + 1) / n
    if (window - 1) % burst == 0:
        sr = sq.selective_repeat_code(n, burst, window, min(lam, n - 1))
        s = int(np.ceil(burst * min(lam, n - 1) / (window - 1 + burst)))
        assert sr.code.stragglers == s and sr.delay == burst
        np.testing.assert_allclose(sq.schedule(sr, np.zeros((12, n), bool)).load[: 12 - burst], (s + 1) / n)


def test_selective_repeat_repeats_instead_of_adding_work():
    """A burst beyond s: v - s of the workers job r - B missed repeat it in round r *instead of* job r, so
    the load stays (s + 1)/n and the repeats cascade into the next job only as far as the model allows."""
    code = sq.selective_repeat_code(6, 1, 3, 3)  # s = ceil(1 * 3 / (2 + 1)) = 1, T = B = 1
    rec = np.zeros((8, 6), bool)
    rec[2, [0, 2, 4]] = True  # three stragglers in round 2: job 2 has 3 results, needs 5
    sched = sq.schedule(code, rec)
    np.testing.assert_array_equal(sched.decoded_round, [0, 1, 3, 4, 4, 5, 6])
    # round 3: workers 0 and 2 (the first v - s = 2 missing) repeat job 2; job 3 then misses them
    np.testing.assert_array_equal(sched.coded[2, 0], [True, True, True, True, False, True])
    np.testing.assert_array_equal(sched.coded[3, 0], [True, True, False, True, True, True])  # 0 repeats in 4
    np.testing.assert_allclose(sched.load[:7], 2 / 6)  # one coded task per worker per round, always
    np.testing.assert_allclose(sched.load[7], 0.0)  # trailing round: nothing left to repeat


def test_is_bursty_model():
    rec = np.zeros((6, 3), bool)
    assert sq.is_bursty(rec, 1, 2, 1)
    rec[1, 0] = rec[2, 0] = True  # a burst of 2
    assert not sq.is_bursty(rec, 1, 3, 1) and sq.is_bursty(rec, 2, 3, 1)
    rec[4, 1] = True  # a second straggler 2 rounds after the burst: within W = 3 -> 2 distinct
    assert not sq.is_bursty(rec, 2, 4, 1) and sq.is_bursty(rec, 2, 4, 2) and sq.is_bursty(rec, 2, 2, 1)
    rec2 = np.zeros((5, 2), bool)
    rec2[0, 0] = rec2[3, 0] = True  # same worker, rounds 0 and 3: a span of 4 inside any window W >= 4
    assert not sq.is_bursty(rec2, 3, 4, 1) and sq.is_bursty(rec2, 4, 4, 1) and sq.is_bursty(rec2, 1, 3, 1)


def test_straggler_record_follows_each_scheme():
    rng = np.random.default_rng(0)
    times = rng.exponential(1.0, size=(60, 6)) + 1.0
    code = sq.multiplexed_code(6, 2, 4, 2)
    rec, dur = sq.straggler_record(code, times, mu=0.3)
    assert rec.any() and sq.is_bursty(rec, 2, 4, 2)
    cut = times.min(axis=1) * 1.3
    np.testing.assert_allclose(dur, np.where(rec.any(axis=1), cut, times.max(axis=1)))
    assert np.all(~rec | (times > cut[:, None]))  # only workers slower than the cut straggle
    assert np.all(sq.schedule(code, rec).decoded_round >= 0)
    plain = gc.cyclic_code(6, 2)
    rec_gc, dur_gc = sq.straggler_record(plain, times, mu=0.3)
    assert rec_gc.sum(axis=1).max() <= 2 and rec_gc.any()
    rec_none, dur_none = sq.straggler_record(None, times, mu=0.3)
    assert not rec_none.any()
    np.testing.assert_allclose(dur_none, times.max(axis=1))


def test_validation():
    with pytest.raises(ValueError, match="window"):
        sq.multiplexed_code(4, 2, 2, 1)
    with pytest.raises(ValueError, match="stragglers"):
        sq.multiplexed_code(4, 1, 2, 5)
    with pytest.raises(ValueError, match="divide"):
        sq.selective_repeat_code(4, 2, 4, 1)
    with pytest.raises(ValueError, match="no worker"):
        sq.selective_repeat_code(1, 1, 2, 1)  # s = ceil(1/2) = 1: nobody left to decode from
    with pytest.raises(ValueError, match="straggling must be"):
        sq.schedule(sq.multiplexed_code(4, 1, 2, 1), np.zeros((5, 3), bool))
    with pytest.raises(TypeError, match="SequentialCode"):
        sq.schedule(gc.cyclic_code(4, 1), np.zeros((5, 4), bool))
