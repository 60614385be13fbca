"""Gradient coding: exact decoding for every admissible straggler pattern (float64), the paper's load,
the coded aggregator under simulated workers
(the sequential schemes: test_sequential.py)."""

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


def test_untabulated_code_decodes_like_the_table():
    """tabulate=False (sizes whose C(n, s) patterns cannot be tabulated) solves a_S per pattern: the same
    code, a vector with a^T B = 1 on the finished rows, zero elsewhere; coded_mean refuses it."""
    table, solve = gc.cyclic_code(7, 2, seed=3), gc.cyclic_code(7, 2, seed=3, tabulate=False)
    np.testing.assert_array_equal(table.encoding, solve.encoding)
    assert solve.patterns is None and solve.decoding is None
    for stragglers in itertools.combinations(range(7), 2):
        finished = np.ones(7, bool)
        finished[list(stragglers)] = False
        a = gc.decode(solve, finished)
        assert np.all(a[~finished] == 0)
        np.testing.assert_allclose(a @ solve.encoding, 1.0, atol=1e-9)
    with pytest.raises(ValueError, match="cannot decode"):
        gc.decode(solve, np.array([True] * 4 + [False] * 3))
    big = gc.cyclic_code(64, 20, tabulate=False)  # C(64, 20) ~ 2e16 patterns: only solvable on demand
    finished = np.ones(64, bool)
    finished[np.random.default_rng(0).choice(64, 20, replace=False)] = False
    np.testing.assert_allclose(gc.decode(big, finished) @ big.encoding, 1.0, atol=1e-6)
    with pytest.raises(ValueError, match="tabulate"):
        gc.cyclic_code(64, 20)
    with pytest.raises(ValueError, match="tabulated"):
        gc.coded_mean(solve, clock.exponential())
