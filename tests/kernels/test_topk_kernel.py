"""Fused EF + threshold top-k: Pallas (interpret mode) vs the XLA reference vs NumPy invariants."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optdist_kernels import ef_threshold_topk
from optdist_kernels import topk as T

KEY = jax.random.key(11)

CASES = [
    # (d, k, capacity): tiny; ragged tail; capacity = the power-of-two buffer (catches stray writes
    # into the last slot); several blocks of 16 x 256 with a ragged last block.
    (7, 2, None),
    (1000, 50, None),
    (4096, 60, 64),
    (9000, 300, None),
]


def _run(d, k, capacity, pallas):
    cap = capacity or int(k * 1.1)
    kw = dict(k=k, cap=cap, tol=0.1, sample_size=512, max_refine=4, pallas=pallas)
    if pallas:
        kw.update(interpret=True, poison=True)
    return jax.jit(functools.partial(T._topk, **kw)), cap


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"d{c[0]}-k{c[1]}")
def case(request):
    d, k, capacity = request.param
    kg, ke = jax.random.split(jax.random.key(d))
    g = jax.random.normal(kg, (d,))
    e = 0.5 * jax.random.normal(ke, (d,))
    fp, cap = _run(d, k, capacity, True)
    fx, _ = _run(d, k, capacity, False)
    return d, k, cap, g, e, fp(g, e, KEY), fx(g, e, KEY)


def test_pallas_equals_reference_exactly(case):
    _, _, cap, _, _, (pp, pe, pt), (xp, xe, xt) = case
    assert float(pt) == float(xt)
    for name in ("values", "indices", "count"):
        np.testing.assert_array_equal(pp[name], xp[name], err_msg=name)
    assert pp["values"].shape == (cap,) and pp["indices"].dtype == jnp.int32
    assert not np.isnan(np.asarray(pe)).any()  # poisoned e_new fully overwritten
    np.testing.assert_array_equal(pe, xe)


def test_error_feedback_is_lossless_and_kept_set_is_top(case):
    d, k, cap, g, e, (pp, pe, pt), _ = case
    p = np.asarray(g + e)
    n = int(pp["count"])
    vals, idx = np.asarray(pp["values"]), np.asarray(pp["indices"])
    # Fixed capacity: slots >= count are zero; kept indices are distinct and increasing.
    assert 1 <= n <= cap
    np.testing.assert_array_equal(vals[n:], 0.0)
    np.testing.assert_array_equal(idx[n:], 0)
    assert np.all(np.diff(idx[:n]) > 0)
    # e_new + scatter(values) == p exactly.
    rebuilt = np.asarray(pe).copy()
    rebuilt[idx[:n]] += vals[:n]
    np.testing.assert_array_equal(rebuilt, p)
    np.testing.assert_array_equal(np.asarray(pe)[idx[:n]], 0.0)
    # The kept entries are exactly the n largest |p| (no ties in continuous data), all >= threshold.
    top = np.argsort(-np.abs(p), kind="stable")[:n]
    np.testing.assert_array_equal(np.sort(top), idx[:n])
    assert np.abs(p[idx[:n]]).min() >= float(pt)
    # Count within the tolerance of k (the refinement passes make this hold on random data).
    assert np.ceil(k * 0.9) <= n <= cap


def test_overflow_keeps_lowest_indices_and_stays_lossless():
    """Ties: every |p| equal, so any threshold passes all d entries; only `capacity` fit."""
    d, k = 600, 20
    g = jnp.where(jnp.arange(d) % 2 == 0, 1.0, -1.0)
    e = jnp.zeros((d,))
    payload, e_new = ef_threshold_topk(g, e, KEY, k, impl="xla")
    cap = int(k * 1.1)
    assert int(payload["count"]) == cap
    np.testing.assert_array_equal(payload["indices"], np.arange(cap))
    np.testing.assert_array_equal(np.asarray(e_new)[:cap], 0.0)
    np.testing.assert_array_equal(np.asarray(e_new)[cap:], np.asarray(g)[cap:])


def test_public_api_pallas_matches_xla():
    g = jax.random.normal(jax.random.key(1), (30, 40))
    e = jnp.full((1200,), 0.01)
    a = ef_threshold_topk(g, e, KEY, 12, impl="pallas")
    b = ef_threshold_topk(g, e, KEY, 12, impl="xla")
    for name in ("values", "indices", "count"):
        np.testing.assert_array_equal(a[0][name], b[0][name])
    np.testing.assert_array_equal(a[1], b[1])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(k=0), "k must"),
        (dict(k=11), "k must"),
        (dict(k=3, tol=1.0), "tol"),
        (dict(k=3, capacity=2), "capacity"),
        (dict(k=3, sample_size=0), "sample_size"),
        (dict(k=3, max_refine=-1), "max_refine"),
        (dict(k=3, impl="gpu"), "impl"),
    ],
)
def test_bad_arguments(kwargs, match):
    x = jnp.ones((10,))
    with pytest.raises(ValueError, match=match):
        ef_threshold_topk(x, x, KEY, **kwargs)
