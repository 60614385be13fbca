r"""Inverse p-th roots of symmetric positive semi-definite matrices (and batches of them).

For a PSD matrix :math:`A` (or a batch ``[..., m, m]``) and an integer
:math:`p \ge 1` this computes

.. math:: X = (A + \epsilon I)^{-1/p}, \qquad
          \epsilon = \text{ridge\_epsilon} \cdot \lambda_{\max}(A) \ \text{(relative, default)}
          \ \text{or}\ \text{ridge\_epsilon} \ \text{(absolute)},

with one of three methods:

* ``"eigh"``: :math:`A = V \operatorname{diag}(w) V^\top`, :math:`X = V \operatorname{diag}
  ((\max(w, 0) + \epsilon)^{-1/p}) V^\top` (exact up to rounding; ``O(m^3)`` but not matmul-bound).
* ``"coupled_newton"``: the coupled Newton iteration of Guo & Higham (2006),
  :math:`X_0 = z^{1/p} I`, :math:`M_0 = z A_\epsilon`, :math:`z = (1+p) / (2 \lambda_{\max}(A_\epsilon))`,
  :math:`T_k = ((p+1) I - M_k)/p`, :math:`X_{k+1} = X_k T_k`, :math:`M_{k+1} = T_k^p M_k`;
  :math:`M_k = X_k^p A_\epsilon \to I` (quadratic convergence), matmuls only.
* ``"newton_schulz"``: the same coupled form with a Schulz-type (Taylor) step:
  :math:`R_k = I - M_k`, :math:`T_k = I + R_k/p + \frac{p+1}{2p^2} R_k^2` (the second-order truncation
  of :math:`(I - R_k)^{-1/p}`), :math:`z = 1/\lambda_{\max}(A_\epsilon)`; cubic convergence, one more
  matmul per iteration, fewer iterations.
* ``"auto"``: on accelerators ``eigh`` for ``m <= 512`` (measured faster there on an H100), else
  coupled Newton; on CPU coupled Newton.

Both iterations run in a ``lax.while_loop`` that stops when every matrix of the batch has tracked
residual :math:`\|M_k - I\|_F/\sqrt{m} \le` ``tol``, when that residual stops decreasing (rounding
floor), or after ``max_iters``; each matrix keeps its best iterate. :math:`\lambda_{\max}` is estimated by
power iteration for the iterative methods and read from the eigenvalues for ``eigh``.

The returned error is a *relative residual* estimate of :math:`\|X^p A_\epsilon - I\|_F / \sqrt{m}`
(the RMS deviation of :math:`X^p A_\epsilon` from the identity). For ``eigh`` it is computed
explicitly (a few extra matmuls; in float32 it has a rounding floor near
:math:`\kappa(A_\epsilon) \cdot 10^{-8}`, i.e. a few percent at :math:`\kappa = 10^6`). For the
iterations it is the tracked :math:`\|M_k - I\|_F/\sqrt{m}` of the returned iterate (free; equal to
the explicit residual in exact arithmetic, optimistic under rounding). It is ``NaN``/``Inf`` when the
input is non-finite, so callers can reject such roots.

``impl`` (iterative methods): ``"xla"`` runs the loop above; ``"pallas"`` runs the Pallas kernel
:func:`optdist_kernels.batched_inverse_pth_root` on :math:`A_\epsilon` (this module's ridge, added
before the call), which keeps each block on chip for a *fixed* ``max_iters`` iterations (best iterate
kept; float32, power-of-two ``16 <= m <= 128``, interpret mode off GPU); ``"auto"`` (default) takes
the kernel only where :data:`optdist_kernels.AUTO_BACKENDS` lists it for the backend (measured
faster; none yet) and the block suits it, else ``"xla"`` — so ``"auto"`` never fails.

Matmuls use ``precision=lax.Precision.HIGHEST`` by default: f32 matmuls otherwise default to TF32 on
recent GPUs, which leaves ~5% error in the roots. Works in float64 when x64 is enabled.

References:
  Guo, C.-H., Higham, N. J. "A Schur–Newton method for the matrix p-th root and its inverse", 2006.
  Anil, R., Gupta, V., Koren, T., Regan, K., Singer, Y. "Scalable Second Order Optimization for Deep
  Learning", 2020.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from optdist import _checks

METHODS = ("eigh", "coupled_newton", "newton_schulz", "auto")
_AUTO_EIGH_MAX_DIM = 512
_POWER_ITERS = 24


def _check_method(method: Any) -> str:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}.")
    return method


def resolve_method(method: str, m: int, backend: str | None = None) -> str:
    """The concrete method ``"auto"`` picks for ``m x m`` matrices on ``backend`` (default: JAX's)."""
    _check_method(method)
    if method != "auto":
        return method
    backend = backend or jax.default_backend()
    # Measured: on an H100 batched eigh wins up to 512; XLA:CPU's batched eigh is slower than the
    # coupled Newton iteration at every size tried (64 to 1024).
    return "eigh" if backend != "cpu" and m <= _AUTO_EIGH_MAX_DIM else "coupled_newton"


def _mm(a: jax.Array, b: jax.Array, precision) -> jax.Array:
    return jnp.matmul(a, b, precision=precision)


def _matrix_power(a: jax.Array, p: int, precision) -> jax.Array:
    """``a ** p`` for a static integer ``p >= 1`` by binary exponentiation (~log2 p matmuls)."""
    result = None
    base = a
    while True:
        if p & 1:
            result = base if result is None else _mm(result, base, precision)
        p >>= 1
        if not p:
            return result
        base = _mm(base, base, precision)


def _eye_like(a: jax.Array) -> jax.Array:
    return jnp.broadcast_to(jnp.eye(a.shape[-1], dtype=a.dtype), a.shape)


def _rel_residual(m_minus_i: jax.Array) -> jax.Array:
    m = m_minus_i.shape[-1]
    return jnp.sqrt(jnp.sum(jnp.square(m_minus_i), axis=(-2, -1)) / m)


def max_eigenvalue(a: jax.Array, num_iters: int = _POWER_ITERS, precision=lax.Precision.HIGHEST) -> jax.Array:
    """Power-iteration estimate of the largest eigenvalue of PSD ``a`` (batched; a lower bound)."""
    m = a.shape[-1]
    # A fixed, non-degenerate start vector (identical on every worker and run).
    v = 1.0 + jnp.cos(jnp.arange(m, dtype=a.dtype) * 1.7)
    v = jnp.broadcast_to(v / jnp.linalg.norm(v), a.shape[:-1])

    def body(_, v):
        w = jnp.einsum("...ij,...j->...i", a, v, precision=precision)
        return w / jnp.maximum(jnp.linalg.norm(w, axis=-1, keepdims=True), jnp.finfo(a.dtype).tiny)

    v = lax.fori_loop(0, num_iters, body, v)
    return jnp.einsum("...i,...ij,...j->...", v, a, v, precision=precision)


def _ridge(lam_max: jax.Array, ridge_epsilon: float, relative: bool) -> jax.Array:
    if relative:
        return ridge_epsilon * jnp.maximum(lam_max, 0.0)
    return jnp.full_like(lam_max, ridge_epsilon)


def _eigh_root(a, p, ridge_epsilon, relative, precision):
    w, v = jnp.linalg.eigh(a)
    w = jnp.maximum(w, 0.0)
    ridge = _ridge(w[..., -1], ridge_epsilon, relative)
    w_reg = w + ridge[..., None]
    # Where the ridge is zero and an eigenvalue vanishes the root is infinite: report it as such.
    scale = jnp.power(w_reg, -1.0 / p)
    root = _mm(v * scale[..., None, :], jnp.swapaxes(v, -1, -2), precision)
    return root, ridge


def _coupled_root(a, p, ridge_epsilon, relative, precision, max_iters, tol, schulz: bool):
    lam = max_eigenvalue(a, precision=precision)
    ridge = _ridge(lam, ridge_epsilon, relative)
    eye = _eye_like(a)
    a_reg = a + ridge[..., None, None] * eye
    lam_reg = jnp.maximum(lam + ridge, jnp.finfo(a.dtype).tiny)
    z = (1.0 / lam_reg) if schulz else (1.0 + p) / (2.0 * lam_reg)
    x = jnp.power(z, 1.0 / p)[..., None, None] * eye
    mat = z[..., None, None] * a_reg
    c1, c2 = 1.0 / p, (p + 1.0) / (2.0 * p * p)

    def step(x, mat):
        if schulz:
            r = eye - mat
            t = eye + c1 * r + c2 * _mm(r, r, precision)
        else:
            t = ((p + 1.0) * eye - mat) / p
        x = _mm(x, t, precision)
        mat = _mm(_matrix_power(t, p, precision), mat, precision)
        return x, mat

    err0 = _rel_residual(mat - eye)
    big = jnp.asarray(jnp.inf, a.dtype)

    def cond(carry):
        i, _, _, err, _, _, prev = carry
        worst = jnp.max(err)
        return (i < max_iters) & (worst > tol) & (worst < prev)

    def body(carry):
        i, x, mat, err, x_best, err_best, _ = carry
        x, mat = step(x, mat)
        new_err = _rel_residual(mat - eye)
        new_err = jnp.where(jnp.isfinite(new_err), new_err, big)
        better = new_err < err_best
        x_best = jnp.where(better[..., None, None], x, x_best)
        err_best = jnp.where(better, new_err, err_best)
        return i + 1, x, mat, new_err, x_best, err_best, jnp.max(err)

    carry = (jnp.zeros((), jnp.int32), x, mat, err0, x, err0, big)
    _, _, _, _, x_best, err_best, _ = lax.while_loop(cond, body, carry)
    return x_best, ridge, err_best


_KERNEL = "batched_inverse_pth_root"


def _kernel_unsupported(a: jax.Array) -> str | None:
    """Why the Pallas root kernel cannot take ``a`` (None: it can)."""
    from optdist_kernels import roots

    m = a.shape[-1]
    if a.dtype != jnp.float32:
        return f"the root kernel computes in float32; got a {a.dtype} matrix"
    if m < 16 or m > roots.MAX_PALLAS_DIM or m & (m - 1):
        return f"the Pallas root kernel takes power-of-two blocks 16 <= m <= {roots.MAX_PALLAS_DIM}; got {m}"
    return None


def _use_kernel(impl: str, a: jax.Array) -> bool:
    from optdist_kernels import resolve_impl

    return resolve_impl(impl, _KERNEL, unsupported=_kernel_unsupported(a)) == "pallas"


def _kernel_root(a, p, method, ridge_epsilon, relative, max_iters, precision, impl):
    """The Pallas kernel on ``A + ridge I`` (ridge from this module's rule, so the math matches)."""
    from optdist_kernels import batched_inverse_pth_root

    ridge = _ridge(max_eigenvalue(a, precision=precision), ridge_epsilon, relative)
    a_reg = (a + ridge[..., None, None] * _eye_like(a)).reshape(-1, *a.shape[-2:])
    root, err = batched_inverse_pth_root(
        a_reg, p, method=method, iters=max_iters, ridge_epsilon=0.0, precision=precision, impl=impl
    )
    return root.reshape(a.shape), err.reshape(a.shape[:-2])


def matrix_inverse_pth_root(
    a: jax.Array,
    p: int,
    method: str = "auto",
    *,
    ridge_epsilon: float = 1e-6,
    relative_epsilon: bool = True,
    max_iters: int = 100,
    tol: float | None = None,
    precision: Any = lax.Precision.HIGHEST,
    impl: str = "auto",
) -> tuple[jax.Array, jax.Array]:
    r"""Computes :math:`(A + \epsilon I)^{-1/p}` for symmetric PSD ``a`` of shape ``[..., m, m]``.

    See the module docstring for the math of each method.

    Args:
      a: symmetric positive semi-definite matrix or batch ``[..., m, m]`` (float32/float64; lower
        precision inputs are computed in float32). It is symmetrized as ``(a + a^T)/2``.
      p: the root, an integer ``>= 1`` (not only powers of two).
      method: ``"eigh"``, ``"coupled_newton"``, ``"newton_schulz"`` or ``"auto"``.
      ridge_epsilon: ridge ``>= 0`` added before the root; relative to the largest eigenvalue when
        ``relative_epsilon`` (default), absolute otherwise.
      relative_epsilon: whether ``ridge_epsilon`` is relative to :math:`\lambda_{\max}(A)`.
      max_iters: iteration cap of the iterative methods.
      tol: stop when every matrix's tracked residual is at most this (default: 10 ulp of the dtype).
      precision: matmul precision (``lax.Precision`` or a dot algorithm preset).
      impl: ``"auto"``, ``"pallas"`` or ``"xla"`` for the iterative methods (module docstring).

    Returns:
      ``(root, error)``: the roots ``[..., m, m]`` and the relative residual estimates of shape
      ``[...]`` (see the module docstring).

    Example::

      root, err = optdist.matrix_inverse_pth_root(stats, 4, method="coupled_newton")
    """
    p = _checks.positive_int(p, "p")
    method = _check_method(method)
    ridge_epsilon = _checks.in_range(ridge_epsilon, "ridge_epsilon", 0.0, float("inf"))
    max_iters = _checks.positive_int(max_iters, "max_iters")
    a = jnp.asarray(a)
    if a.ndim < 2 or a.shape[-1] != a.shape[-2]:
        raise ValueError(f"a must be a square matrix or a batch [..., m, m]; got shape {a.shape}.")
    if not jnp.issubdtype(a.dtype, jnp.floating) or jnp.finfo(a.dtype).bits < 32:
        a = a.astype(jnp.float32)
    if tol is None:
        tol = 10 * float(jnp.finfo(a.dtype).eps)
    tol = _checks.in_range(tol, "tol", 0.0, float("inf"))
    a = 0.5 * (a + jnp.swapaxes(a, -1, -2))
    from optdist_kernels import resolve_impl

    resolve_impl(impl)  # validates impl (the one definition of its values)
    if impl == "pallas" and method in ("auto", "eigh"):
        if method == "eigh":
            raise ValueError("impl='pallas' runs an iterative method; method='eigh' has no kernel.")
        method = "coupled_newton"
    method = resolve_method(method, a.shape[-1])
    if method != "eigh" and _use_kernel(impl, a):
        return _kernel_root(a, p, method, ridge_epsilon, relative_epsilon, max_iters, precision, impl)
    if method == "eigh":
        root, ridge = _eigh_root(a, p, ridge_epsilon, relative_epsilon, precision)
        a_reg = a + ridge[..., None, None] * _eye_like(a)
        residual = _mm(_matrix_power(root, p, precision), a_reg, precision) - _eye_like(a)
        return root, _rel_residual(residual)
    return _coupled_root(
        a, p, ridge_epsilon, relative_epsilon, precision, max_iters, tol, method == "newton_schulz"
    )[::2]
