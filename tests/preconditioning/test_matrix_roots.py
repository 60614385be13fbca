"""matrix_inverse_pth_root against a float64 NumPy eigendecomposition reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optdist.preconditioning as pre

CONDS = (1.0, 1e2, 1e4, 1e6)
METHODS = ("eigh", "coupled_newton", "newton_schulz")


def spd_batch(m, conds, seed):
    """SPD matrices with log-spaced spectra from 1 down to 1/cond and random eigenvectors."""
    rng = np.random.default_rng(seed)
    out = []
    for cond in conds:
        q, _ = np.linalg.qr(rng.normal(size=(m, m)))
        w = np.logspace(0, -np.log10(cond), m) * rng.uniform(0.5, 3.0)
        out.append((q * w) @ q.T)
    return np.stack(out)


def reference_root(a, p, eps, relative=True):
    """(A + eps * lambda_max I)^(-1/p) in float64 from the eigendecomposition."""
    w, v = np.linalg.eigh(a)
    w = np.maximum(w, 0.0)
    ridge = eps * w[..., -1:] if relative else eps
    return np.einsum("...ij,...j,...kj->...ik", v, (w + ridge) ** (-1.0 / p), v)


def rel_err(x, ref):
    x = np.asarray(x, np.float64)
    return np.linalg.norm(x - ref, axis=(-2, -1)) / np.linalg.norm(ref, axis=(-2, -1))


@pytest.mark.parametrize("p", [2, 4, 6, 8])
def test_float64_roots_match_numpy_reference(p):
    a = spd_batch(16, CONDS, seed=p)
    ref = reference_root(a, p, 1e-6)
    with jax.enable_x64(True):
        for method in METHODS:
            root, err = jax.jit(pre.matrix_inverse_pth_root, static_argnums=(1, 2))(jnp.asarray(a), p, method)
            assert root.dtype == jnp.float64
            # eigh is exact to rounding; the iterations carry the (tiny) error of the power-iteration
            # estimate of lambda_max inside the relative ridge.
            tol = 1e-10 if method == "eigh" else 1e-6
            assert np.all(rel_err(root, ref) < tol), (method, rel_err(root, ref))
            assert np.all(np.asarray(err) < 1e-8), (method, err)


def test_float32_roots_within_float32_accuracy():
    a = spd_batch(16, CONDS, seed=7)
    for p in (4,):
        ref = reference_root(a, p, 1e-6)
        for method in METHODS:
            root, err = pre.matrix_inverse_pth_root(jnp.asarray(a, jnp.float32), p, method)
            assert root.dtype == jnp.float32
            e = rel_err(root, ref)
            # Up to kappa = 1e4 float32 roots are accurate to ~1e-4; at kappa ~ 1e6 rounding dominates.
            assert np.all(e[:3] < 2e-4), (method, p, e)
            assert e[3] < 0.1, (method, p, e)
            assert np.all(np.asarray(err)[:3] < 1e-2), (method, err)


def test_odd_roots_absolute_ridge_and_unbatched_input():
    a = spd_batch(8, (1e3,), seed=3)[0]
    with jax.enable_x64(True):
        for p, method in [(1, "coupled_newton"), (3, "eigh"), (3, "newton_schulz"), (5, "coupled_newton")]:
            ref = reference_root(a, p, 1e-4, relative=False)
            root, err = pre.matrix_inverse_pth_root(
                jnp.asarray(a), p, method, ridge_epsilon=1e-4, relative_epsilon=False
            )
            assert root.shape == (8, 8) and err.shape == ()
            assert rel_err(root, ref) < 1e-6, (p, method)


def test_iteration_cap_and_early_exit_change_the_result():
    # With one iteration the coupled Newton is far from the root; its error estimate says so.
    a = jnp.asarray(spd_batch(8, (1e3,), seed=4), jnp.float32)
    root1, err1 = pre.matrix_inverse_pth_root(a, 4, "coupled_newton", max_iters=1)
    root, err = pre.matrix_inverse_pth_root(a, 4, "coupled_newton")
    assert float(err1[0]) > 0.1 > 1e-4 > float(err[0])
    assert rel_err(root1, reference_root(np.asarray(a, np.float64), 4, 1e-6))[0] > 0.1


def test_auto_picks_eigh_for_small_and_newton_for_large():
    assert pre.matrix_roots.resolve_method("auto", 128, "gpu") == "eigh"
    assert pre.matrix_roots.resolve_method("auto", 1024, "gpu") == "coupled_newton"
    assert pre.matrix_roots.resolve_method("auto", 128, "cpu") == "coupled_newton"
    assert pre.matrix_roots.resolve_method("eigh", 4096, "cpu") == "eigh"


def test_nonfinite_input_reports_nonfinite_error():
    a = np.eye(4)
    a[1, 2] = np.nan
    for method in ("eigh", "coupled_newton"):
        _, err = pre.matrix_inverse_pth_root(jnp.asarray(a, jnp.float32), 2, method)
        assert not np.isfinite(np.asarray(err)), method


def test_bad_arguments_are_named():
    a = jnp.eye(3)
    with pytest.raises(ValueError, match="p must"):
        pre.matrix_inverse_pth_root(a, 0)
    with pytest.raises(ValueError, match="p must"):
        pre.matrix_inverse_pth_root(a, 2.5)
    with pytest.raises(ValueError, match="ridge_epsilon"):
        pre.matrix_inverse_pth_root(a, 2, ridge_epsilon=-1e-3)
    with pytest.raises(ValueError, match="method"):
        pre.matrix_inverse_pth_root(a, 2, method="svd")
    with pytest.raises(ValueError, match="square"):
        pre.matrix_inverse_pth_root(jnp.ones((3, 4)), 2)


def test_kernel_impl_matches_reference_and_auto_is_xla_until_measured():
    """impl='pallas' (interpret mode here) runs the root kernel on this module's ridged matrix."""
    a = spd_batch(16, CONDS[:3], seed=11)
    ref = reference_root(a, 4, 1e-6)
    x = jnp.asarray(a, jnp.float32)
    for method in ("coupled_newton", "newton_schulz"):
        root, err = pre.matrix_inverse_pth_root(x, 4, method, impl="pallas", max_iters=40)
        assert np.all(rel_err(root, ref) < 2e-4), (method, rel_err(root, ref))
        assert np.all(np.asarray(err) < 1e-3)
        auto = pre.matrix_inverse_pth_root(x, 4, method, impl="auto")
        xla = pre.matrix_inverse_pth_root(x, 4, method, impl="xla")
        np.testing.assert_array_equal(np.asarray(auto[0]), np.asarray(xla[0]))  # AUTO_BACKENDS empty
    with pytest.raises(ValueError, match="power-of-two"):
        pre.matrix_inverse_pth_root(jnp.eye(24), 4, "coupled_newton", impl="pallas")
    with pytest.raises(ValueError, match="eigh"):
        pre.matrix_inverse_pth_root(x, 4, "eigh", impl="pallas")
    with pytest.raises(ValueError, match="impl"):
        pre.matrix_inverse_pth_root(x, 4, impl="triton")
