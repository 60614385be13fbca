"""Gradient coding: exact decoding for every admissible straggler pattern (float64), the paper's load,
the coded aggregator under simulated workers, and the sequential (selective-reattempt) schedule."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optdist
from optdist.comm.channel import Channel
from optdist.stragglers import clock
from optdist.stragglers import gradient_coding as gc
from tests.helpers import linear_loss, linear_problem

CASES = [(4, 1), (5, 2), (6, 1), (6, 2), (7, 3), (8, 2)]


@pytest.mark.parametrize("n,s", CASES)
def test_cyclic_code_decodes_every_straggler_pattern_exactly(n, s):
    code = gc.cyclic_code(n, s, seed=n + s)
    g = np.random.default_rng(n * 10 + s).normal(size=(n, 7))  # partition gradients, float64
    coded = code.encoding @ g  # what each worker sends
    full = g.sum(axis=0)
    assert code.patterns.shape[0] == len(list(itertools.combinations(range(n), s)))
    for r in range(s + 1):  # every pattern of at most s stragglers
        for stragglers in itertools.combinations(range(n), r):
            finished = np.ones(n, bool)
            finished[list(stragglers)] = False
            a = gc.decode(code, finished)
            assert np.all(a[~finished] == 0)
            np.testing.assert_allclose(a @ coded, full, rtol=0, atol=1e-6 * np.abs(full).max())
    # load: s + 1 partitions per worker, on the cyclic support i..i+s
    assert code.load == (s + 1) / n
    for i in range(n):
        nz = set(np.flatnonzero(np.abs(code.encoding[i]) > 1e-12))
        assert nz == {(i + j) % n for j in range(s + 1)} == set(code.support[i])


def test_fractional_repetition_code():
    code = gc.fractional_repetition_code(6, 2)
    assert code.load == 0.5 and set(np.unique(code.encoding)) == {0.0, 1.0}
    np.testing.assert_allclose(code.decoding @ code.encoding, np.ones((len(code.patterns), 6)), atol=1e-12)
    with pytest.raises(ValueError, match="divides|\\| num_workers"):
        gc.fractional_repetition_code(5, 1)


def test_more_stragglers_than_s_cannot_decode_and_bad_input_is_named():
    code = gc.cyclic_code(5, 1)
    with pytest.raises(ValueError, match="cannot decode"):
        gc.decode(code, np.array([True, True, True, False, False]))
    with pytest.raises(ValueError, match="stragglers"):
        gc.cyclic_code(4, 4)
    with pytest.raises(TypeError, match="GradientCode"):
        gc.coded_mean("cyclic", clock.exponential())


def test_coded_mean_recovers_the_full_gradient_on_every_worker():
    n, s, steps = 6, 2, 4
    code = gc.cyclic_code(n, s)
    params, data = linear_problem(num_examples=36)
    parts, coef = gc.coded_partitions(data, code)  # [n, s+1, 6, ...], [n, s+1]
    assert jax.tree_util.tree_leaves(parts)[0].shape[:2] == (n, s + 1)
    agg = gc.coded_mean(code, clock.exponential(1.0), seed=3)

    def worker(p, my_parts, my_coef):
        coded = jax.tree_util.tree_map(
            lambda *gs: sum(c * g for c, g in zip(my_coef, gs)),
            *[jax.grad(linear_loss)(p, my_parts[k]) for k in range(s + 1)],
        )
        state, ch, outs = agg.init(p), Channel("data"), []
        for _ in range(steps):  # a new straggler pattern every step, same gradients
            est, state = agg.aggregate(coded, state, ch)
            outs.append(est)
        return outs, state, ch.counter

    outs, state, counter = optdist.simulate(worker, "data")(
        optdist.replicate(params, n), parts, jnp.asarray(coef)
    )
    # reference: mean over the n partitions of the partition gradients = the full-batch gradient
    ref = jax.grad(linear_loss)(params, data)
    for t in range(steps):
        for k in ref:
            for i in range(n):
                np.testing.assert_allclose(
                    np.asarray(outs[t][k][i]), np.asarray(ref[k]), rtol=1e-4, atol=1e-5
                )
    wall = sum(
        float(np.sort(np.asarray(clock.compute_times(clock.exponential(1.0), 3, t, n)))[n - s - 1])
        for t in range(steps)
    )
    np.testing.assert_allclose(np.asarray(state.wall_time), [wall] * n, rtol=1e-5)
    assert len(set(np.asarray(optdist.bytes_sent(counter)).tolist())) == 1  # stragglers send zeros too


def test_sequential_plain_gc_when_delay_is_zero():
    code = gc.cyclic_code(5, 1)
    rng = np.random.default_rng(0)
    straggling = rng.random((30, 5)) < 0.25
    sched = gc.sequential_schedule(code, straggling, delay=0)
    ok = straggling.sum(axis=1) <= 1
    np.testing.assert_array_equal(sched.decoded_round >= 0, ok)
    np.testing.assert_array_equal(sched.load, np.full((30, 5), 2))  # s + 1 partitions, every round


def test_sequential_selective_reattempt_decodes_every_two_round_pattern():
    """n = 4, s = 1, T = 1: job 0 is decoded by round 1 exactly when, over rounds 0 and 1, at least
    n - s = 3 workers finish its task (re-attempting only in round 1); the decoded gradient is exact."""
    n, s = 4, 1
    code = gc.cyclic_code(n, s)
    g = np.random.default_rng(1).normal(size=(n, 3))
    masks = [np.array(m, bool) for m in itertools.product([False, True], repeat=n)]
    for s0, s1 in itertools.product(masks, masks):
        sched = gc.sequential_schedule(code, np.stack([s0, s1]), delay=1)  # one job, two rounds
        finished = ~s0 | (s0 & ~s1)
        expect = 0 if (~s0).sum() >= n - s else (1 if finished.sum() >= n - s else -1)
        assert sched.decoded_round[0] == expect, (s0, s1)
        if expect >= 0:
            a = gc.decode(code, sched.finished[0])
            np.testing.assert_allclose(a @ (code.encoding @ g), g.sum(0), atol=1e-9)
        # load in round 1: s + 1 partitions per re-attempted task (job 1 is past the record)
        reattempts = s0 if expect != 0 else np.zeros(n, bool)
        np.testing.assert_array_equal(sched.load[1], (s + 1) * reattempts)
        np.testing.assert_array_equal(sched.load[0], np.full(n, s + 1))


def test_sequential_scheme_tolerates_a_burst_plain_gc_does_not():
    code = gc.cyclic_code(6, 1)
    straggling = np.zeros((12, 6), bool)
    straggling[3, [0, 2, 4]] = True  # a burst of 3 stragglers in round 3 (plain GC tolerates 1)
    plain = gc.sequential_schedule(code, straggling, delay=0)
    seq = gc.sequential_schedule(code, straggling, delay=1)
    assert plain.decoded_round[3] == -1 and seq.decoded_round[3] == 4
    assert np.all(seq.decoded_round >= np.arange(len(seq.decoded_round)))
    assert np.all(seq.decoded_round[:11] >= 0)
    assert seq.load.max() == 2 * (1 + 1)  # a re-attempting worker carries two tasks in round 4
