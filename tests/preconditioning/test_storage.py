"""Quantized (int8 / int16) storage of Shampoo's matrices: exact diagonal, bounded error, smaller state."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optdist.preconditioning import scale_by_shampoo, storage
from tests.preconditioning.test_shampoo import run_steps


def _spd(n, seed, batch=3):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(batch, n, 2 * n))
    return (a @ a.transpose(0, 2, 1) / (2 * n)).astype(np.float32)


@pytest.mark.parametrize("dtype", [jnp.int8, jnp.int16])
def test_roundtrip_matches_float64_reference_of_the_column_scaled_code(dtype):
    x = _spd(20, 0)
    q = storage.encode(jnp.asarray(x), dtype)
    assert q.codes.dtype == dtype and q.scales.dtype == q.diagonal.dtype == jnp.float32
    qmax = np.iinfo(dtype).max
    off = np.where(np.eye(20, dtype=bool), 0.0, x.astype(np.float64))
    scale = np.abs(off).max(axis=-2) / qmax
    want = (
        np.round(off / scale[:, None, :]) * scale[:, None, :] + np.eye(20) * np.diagonal(x, 0, 1, 2)[:, None]
    )
    got = np.asarray(storage.decode(q, jnp.float32), np.float64)
    # float32 division may round a near-tie the other way: at most one code step, and rarely.
    diff = np.abs(got - want)
    assert np.all(diff <= scale[:, None, :] * 1.001 + 1e-7)
    assert np.mean(diff > 1e-6 * np.abs(want) + 1e-8) < 0.01
    assert np.all(np.abs(got - x) <= scale[:, None, :] / 2 * (1 + 1e-5) + 1e-7)  # half a code step
    np.testing.assert_array_equal(np.diagonal(got, 0, 1, 2), np.diagonal(x, 0, 1, 2))  # diagonal exact
    again = storage.encode(storage.decode(q, jnp.float32), dtype)  # re-encoding is idempotent
    np.testing.assert_array_equal(np.asarray(again.codes), np.asarray(q.codes))


def test_zero_matrix_and_bad_dtype():
    q = storage.encode(jnp.zeros((2, 4, 4)), jnp.int8)
    np.testing.assert_array_equal(np.asarray(storage.decode(q, jnp.float32)), 0.0)
    with pytest.raises(ValueError, match="statistics_dtype"):
        storage.check_dtype(jnp.uint8, "statistics_dtype")


def test_quantized_shampoo_tracks_float32_and_shrinks_the_state():
    rng = np.random.default_rng(1)
    params = {"w": jnp.zeros((16, 12)), "b": jnp.zeros((12,))}
    grads = {
        "w": jnp.asarray(rng.normal(size=(12, 16, 12)) * np.linspace(0.2, 2.0, 12), jnp.float32),
        "b": jnp.asarray(rng.normal(size=(12, 12)), jnp.float32),
    }
    kw = dict(block_size=16, beta2=0.9, precondition_every=3, start_preconditioning_step=0, grafting="sgd")
    _, ref = run_steps(scale_by_shampoo(**kw), grads, params)
    tx = scale_by_shampoo(**kw, statistics_dtype=jnp.int16, preconditioner_dtype=jnp.int8)
    state, out = run_steps(tx, grads, params)
    pre = state.preconditioners["16x12"][0]
    assert isinstance(pre, storage.QuantizedMatrices) and pre.codes.dtype == jnp.int8
    assert state.stats["16x12"][1].codes.dtype == jnp.int16
    # int8 preconditioners: per-entry error <= 1/254 of a column's largest off-diagonal entry.
    err = np.linalg.norm(out["w"] - ref["w"], axis=(1, 2)) / np.linalg.norm(ref["w"], axis=(1, 2))
    # (the first refreshes see rank-deficient statistics, where the 1e-6 ridge amplifies any error)
    assert err[3:].max() < 0.01, err
    assert np.all(np.isfinite(out["b"]))
    # State bytes: s^2 (codes) + 8 s (scales, diagonal) per int8 matrix instead of 4 s^2.
    nbytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(state.preconditioners))
    assert nbytes == sum(s * s + 8 * s for s in (16, 12))
