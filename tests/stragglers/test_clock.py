"""The simulated clock: documented distributions (moments, fixed seed), determinism, order statistics."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from optdist.stragglers import clock

N = 40000  # one step of many "workers": i.i.d. draws


@pytest.mark.parametrize(
    "model,mean,var,low",
    [
        (clock.exponential(2.0), 2.0, 4.0, 0.0),
        (clock.shifted_exponential(1.0, 0.5), 1.5, 0.25, 1.0),
        (clock.pareto(1.0, 3.0), 1.5, 3.0 / 4.0, 1.0),  # alpha s^2 / ((alpha-1)^2 (alpha-2))
        (clock.lognormal(0.0, 0.5), math.exp(0.125), (math.exp(0.25) - 1) * math.exp(0.25), 0.0),
        (clock.constant(0.7), 0.7, 0.0, 0.7),
    ],
)
def test_moments_match_the_documented_distribution(model, mean, var, low):
    t = np.asarray(clock.compute_times(model, 0, 0, N), np.float64)
    assert t.dtype == np.float64 and t.shape == (N,)
    assert model.mean == pytest.approx(mean, rel=1e-6)
    assert abs(t.mean() - mean) < 4 * math.sqrt(var / N) + 1e-6  # 4 standard errors
    assert t.var() == pytest.approx(var, rel=0.1, abs=1e-9)
    assert t.min() >= low - 1e-6


def test_same_seed_and_step_same_times_other_step_differs_worker_scale_multiplies():
    m = clock.shifted_exponential(1.0, 1.0)
    a = np.asarray(clock.compute_times(m, 3, 5, 8))
    np.testing.assert_array_equal(a, np.asarray(clock.compute_times(m, 3, jnp.asarray(5), 8)))
    assert not np.allclose(a, np.asarray(clock.compute_times(m, 3, 6, 8)))
    assert not np.allclose(a, np.asarray(clock.compute_times(m, 4, 5, 8)))
    scale = [1.0, 2.0, 1.0, 1.0, 3.0, 1.0, 1.0, 1.0]
    ms = clock.shifted_exponential(1.0, 1.0, worker_scale=scale)
    np.testing.assert_allclose(np.asarray(clock.compute_times(ms, 3, 5, 8)), a * np.array(scale), rtol=1e-6)


def test_fastest_mask_and_kth_fastest():
    t = jnp.asarray([3.0, 1.0, 2.0, 1.0, 5.0])
    np.testing.assert_array_equal(np.asarray(clock.fastest_mask(t, 3)), [False, True, True, True, False])
    np.testing.assert_array_equal(np.asarray(clock.fastest_mask(t, 1)), [False, True, False, False, False])
    assert float(clock.kth_fastest(t, 3)) == 2.0 and float(clock.kth_fastest(t, 5)) == 5.0


def test_bad_parameters_are_named():
    with pytest.raises(ValueError, match="mean"):
        clock.exponential(0.0)
    with pytest.raises(ValueError, match="shift"):
        clock.shifted_exponential(-1.0)
    with pytest.raises(ValueError, match="alpha"):
        clock.pareto(1.0, 0.0)
    with pytest.raises(ValueError, match="sigma"):
        clock.lognormal(0.0, -1.0)
    with pytest.raises(ValueError, match="worker_scale"):
        clock.compute_times(clock.exponential(worker_scale=[1.0, 2.0]), 0, 0, 3)
