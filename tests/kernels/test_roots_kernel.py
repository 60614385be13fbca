"""Batched inverse p-th roots: Pallas (interpret mode) vs XLA reference vs float64 eigh."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from optdist_kernels import batched_inverse_pth_root
from optdist_kernels import roots as R


def _spd(b, m, seed, cond=1e3):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(b, m, m)))
    w = np.exp(rng.uniform(0, np.log(cond), size=(b, m)))
    return (q * w[:, None, :]) @ np.swapaxes(q, 1, 2)


def _np_root(a, p, eps):
    out = []
    for blk in a:
        w, v = np.linalg.eigh(blk)
        w = w + eps * np.linalg.norm(blk)
        out.append((v * w ** (-1.0 / p)) @ v.T)
    return np.stack(out)


@pytest.mark.parametrize("m, method, p", [(16, "coupled_newton", 4), (32, "newton_schulz", 2)])
def test_pallas_matches_reference_and_float64_root(m, method, p):
    a64 = _spd(3, m, seed=m)
    a = jnp.asarray(a64, jnp.float32)
    kw = dict(p=p, iters=25, eps=1e-6, schulz=method == "newton_schulz", precision=lax.Precision.HIGHEST)
    xp, rp = jax.jit(functools.partial(R._roots_pallas, **kw, interpret=True, poison=True))(a)
    xx, rx = jax.jit(functools.partial(R._roots_xla, **kw))(a)
    assert not np.isnan(np.asarray(xp)).any() and not np.isnan(np.asarray(rp)).any()
    np.testing.assert_allclose(xp, xx, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rp, rx, rtol=0.1, atol=1e-7)
    want = _np_root(np.asarray(a, np.float64), p, 1e-6)
    rel = np.abs(np.asarray(xp, np.float64) - want).max(axis=(1, 2)) / np.abs(want).max(axis=(1, 2))
    assert np.all(rel < 2e-4), rel  # condition number 1e3 in float32
    assert np.all(np.asarray(rp) < 1e-5)
    # The tracked residual agrees with the explicit one, ||X^p A - I|| / sqrt(m), in float64.
    x64 = np.asarray(xp, np.float64)
    a_reg = np.asarray(a, np.float64) + 1e-6 * np.linalg.norm(np.asarray(a, np.float64), axis=(1, 2))[
        :, None, None
    ] * np.eye(m)
    explicit = np.linalg.norm(np.linalg.matrix_power(x64, p) @ a_reg - np.eye(m), axis=(1, 2)) / np.sqrt(m)
    assert np.all(explicit < 1e-3)


def test_public_api_and_non_finite_block():
    a = np.asarray(_spd(2, 16, seed=1))
    a[1, 0, 0] = np.nan
    roots, res = batched_inverse_pth_root(jnp.asarray(a, jnp.float32), 4, impl="xla")
    assert np.isfinite(float(res[0])) and float(res[0]) < 1e-5
    assert np.isinf(float(res[1]))  # non-finite input reported, the caller keeps its old root


def test_pallas_rejects_unsupported_blocks():
    a = jnp.asarray(_spd(1, 24, seed=2), jnp.float32)
    with pytest.raises(ValueError, match="power-of-two"):
        batched_inverse_pth_root(a, 4, impl="pallas")


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(p=0), "p must"), (dict(p=4, method="eigh"), "method"), (dict(p=4, iters=0), "iters"),
     (dict(p=4, ridge_epsilon=-1.0), "ridge_epsilon")],
)  # fmt: skip
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        batched_inverse_pth_root(jnp.eye(4)[None], **kwargs)


def test_bad_shape():
    with pytest.raises(ValueError, match="shape"):
        batched_inverse_pth_root(jnp.eye(4), 4)
