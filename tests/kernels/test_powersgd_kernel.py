"""PowerSGD fused kernels: Pallas (interpret mode, poisoned outputs) vs the XLA reference vs NumPy."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optdist_kernels import decode_residual, ef_project, gram_schmidt
from optdist_kernels import powersgd as K

CASES = [
    # (B, R, C, r): tiny (padded rows and columns); ragged rows with 3 column chunks of 32; exact
    # blocks (2 row programs of 16, 2 column chunks of 256); ragged columns padded to 512 with r = 8.
    (1, 3, 5, 1),
    (2, 40, 96, 3),
    (1, 32, 512, 4),
    (2, 17, 300, 8),
]


@functools.cache
def _pallas(name):
    fn = {
        "project": K._ef_project_pallas,
        "residual": K._decode_residual_pallas,
        "gs": K._gram_schmidt_pallas,
    }
    return jax.jit(functools.partial(fn[name], interpret=True, poison=True))


def _inputs(b, rows, cols, rank):
    kg, ke, kq = jax.random.split(jax.random.key(rows * 1000 + cols), 3)
    g = jax.random.normal(kg, (b, rows, cols))
    e = 0.5 * jax.random.normal(ke, (b, rows, cols))
    q = jax.random.normal(kq, (b, cols, rank))
    return g, e, q


def _f64(x):
    return np.asarray(x, np.float64)


@pytest.fixture(scope="module", params=CASES, ids=lambda c: "x".join(map(str, c)))
def case(request):
    g, e, q = _inputs(*request.param)
    m_p, p_p = _pallas("project")(g, e, q)
    m_x, p_x = K._ef_project_xla(g, e, q)
    return request.param, (g, e, q), (m_p, p_p), (m_x, p_x)


def test_ef_project_matches_reference_and_numpy(case):
    (b, rows, cols, rank), (g, e, q), (m_p, p_p), (m_x, p_x) = case
    assert m_p.shape == (b, rows, cols) and p_p.shape == (b, rows, rank)
    assert not np.isnan(np.asarray(m_p)).any() and not np.isnan(np.asarray(p_p)).any()  # poison gone
    np.testing.assert_array_equal(m_p, m_x)  # the EF add is elementwise: bit for bit
    m64 = _f64(g) + _f64(e)
    np.testing.assert_allclose(_f64(m_p), m64, rtol=1e-6, atol=1e-6)
    want = m64 @ _f64(q)
    tol = 1e-5 * np.sqrt(cols)
    np.testing.assert_allclose(_f64(p_p), want, rtol=0, atol=tol)
    np.testing.assert_allclose(_f64(p_x), want, rtol=0, atol=tol)


def test_orthogonalize_and_decode_residual(case):
    (b, rows, cols, rank), (_, _, q), (m_p, p_p), _ = case
    ortho = _pallas("gs")(p_p)
    ortho_x = K._gram_schmidt_xla(p_p)
    assert ortho.shape == (b, rows, rank) and not np.isnan(np.asarray(ortho)).any()
    np.testing.assert_allclose(ortho, ortho_x, rtol=0, atol=1e-5)
    o = _f64(ortho)
    k = min(rank, rows)  # more columns than rows: the extra ones are (numerically) dependent
    gram = np.swapaxes(o, 1, 2) @ o
    np.testing.assert_allclose(gram[:, :k, :k], np.broadcast_to(np.eye(k), (b, k, k)), atol=1e-5)
    # Same column spaces, nested: P = Q R with R = Qᵀ P upper triangular (Gram–Schmidt).
    r = np.swapaxes(o, 1, 2) @ _f64(p_p)
    np.testing.assert_allclose(o[:, :, :k] @ r[:, :k], _f64(p_p), rtol=0, atol=1e-4)
    np.testing.assert_allclose(np.tril(r[:, :k, :k], -1), 0.0, atol=1e-4)

    d_p, e_p = _pallas("residual")(m_p, ortho, q)
    d_x, e_x = K._decode_residual_xla(m_p, ortho, q)
    assert not np.isnan(np.asarray(d_p)).any() and not np.isnan(np.asarray(e_p)).any()
    want = o @ np.swapaxes(_f64(q), 1, 2)
    np.testing.assert_allclose(_f64(d_p), want, rtol=0, atol=1e-5)
    np.testing.assert_allclose(_f64(d_x), want, rtol=0, atol=1e-5)
    np.testing.assert_allclose(_f64(e_p), _f64(m_p) - want, rtol=0, atol=1e-5)
    np.testing.assert_allclose(e_p, m_p - d_p, rtol=0, atol=1e-6)  # E' = M - D from the same D


def test_gram_schmidt_keeps_zero_columns_zero():
    p = jax.random.normal(jax.random.key(0), (2, 24, 4)).at[:, :, 1].set(0.0)
    for out in (_pallas("gs")(p), gram_schmidt(p, impl="xla")):
        assert not np.isnan(np.asarray(out)).any()
        np.testing.assert_array_equal(out[:, :, 1], 0.0)
        np.testing.assert_allclose(jnp.linalg.norm(out[:, :, 3], axis=-1), 1.0, rtol=1e-5)


def test_public_api_auto_is_xla_on_cpu_and_pallas_matches():
    g, e, q = _inputs(2, 40, 96, 3)
    for impl in ("auto", "pallas"):
        m, p = ef_project(g, e, q, impl=impl)
        m_x, p_x = ef_project(g, e, q, impl="xla")
        if impl == "auto":  # no backend listed in AUTO_BACKENDS: the reference itself
            np.testing.assert_array_equal(p, p_x)
        np.testing.assert_allclose(p, p_x, rtol=1e-5, atol=1e-5)
        o = gram_schmidt(p, impl=impl)
        d, e_new = decode_residual(m, o, q, impl=impl)
        np.testing.assert_allclose(d + e_new, m, rtol=1e-6, atol=1e-5)


def test_gram_schmidt_falls_back_for_large_factors(monkeypatch):
    from optdist_kernels import _dispatch

    monkeypatch.setattr(_dispatch, "AUTO_BACKENDS", {"powersgd_gram_schmidt": ("cpu",)})
    p = jnp.ones((1, 20000, 8)) * jnp.arange(1.0, 9.0)  # next_pow2(m) * 8 > 2**16: not on chip
    np.testing.assert_array_equal(gram_schmidt(p, impl="auto"), gram_schmidt(p, impl="xla"))
    with pytest.raises(ValueError, match="on chip"):
        gram_schmidt(p, impl="pallas")


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: ef_project(jnp.ones((1, 4, 5)), jnp.ones((1, 4, 5)), jnp.ones((1, 4, 2))), "factor"),
        (lambda: ef_project(jnp.ones((1, 4, 5)), jnp.ones((1, 4, 5)), jnp.ones((1, 5, 9))), "rank"),
        (lambda: ef_project(jnp.ones((1, 4, 5)), jnp.ones((1, 4, 6)), jnp.ones((1, 5, 2))), "e must"),
        (lambda: decode_residual(jnp.ones((1, 4, 5)), jnp.ones((1, 4, 3)), jnp.ones((1, 5, 2))), "p must"),
        (lambda: gram_schmidt(jnp.ones((4, 2))), "gram_schmidt"),
        (lambda: gram_schmidt(jnp.ones((1, 4, 2)), impl="gpu"), "impl"),
    ],
)
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()
