r"""Batched inverse p-th roots of small SPD blocks by coupled Newton / Newton–Schulz iterations.

For each block :math:`A` of a batch ``[b, m, m]`` (symmetrized as :math:`(A + A^\top)/2`):

.. math:: \beta = \|A\|_F \ (\ge \lambda_{\max}), \quad A_\epsilon = A + \epsilon\beta I, \quad
          \bar\beta = (1 + \epsilon)\beta,

* ``"coupled_newton"`` (Guo & Higham 2006): :math:`z = (1+p)/(2\bar\beta)`, :math:`X_0 = z^{1/p} I`,
  :math:`M_0 = z A_\epsilon`, :math:`T_k = ((p+1) I - M_k)/p`, :math:`X_{k+1} = X_k T_k`,
  :math:`M_{k+1} = T_k^p M_k`.
* ``"newton_schulz"``: :math:`z = 1/\bar\beta`, :math:`R_k = I - M_k`,
  :math:`T_k = I + R_k/p + \frac{p+1}{2p^2} R_k^2` (second-order truncation of
  :math:`(I - R_k)^{-1/p}`), same updates.

:math:`M_k = X_k^p A_\epsilon \to I`. The residual check is the tracked
:math:`r_k = \|M_k - I\|_F/\sqrt{m}` (free; equals :math:`\|X_k^p A_\epsilon - I\|_F/\sqrt m` in exact
arithmetic); each block keeps its best iterate over ``iters`` iterations (a fixed count, so every
program of the kernel runs the same loop), and the returned residual is that iterate's :math:`r_k`
(``inf`` where the input is not finite: callers keep their previous preconditioner then).

Unlike ``optdist.matrix_inverse_pth_root`` the scale comes from the Frobenius norm (an upper bound
of :math:`\lambda_{\max}`, no power iteration, so the whole solve is matmuls and one reduction
per block) and the ridge is relative to it; convergence is slower by at most a few iterations when
:math:`\|A\|_F \gg \lambda_{\max}`.

The Pallas kernel runs one block per program and keeps the block on chip through all iterations,
so it takes power-of-two ``m`` with ``16 <= m <= 128`` (:data:`MAX_PALLAS_DIM`; Triton dots need
dims ``>= 16``, and larger blocks do not fit on chip). Other sizes use the XLA path (``"auto"``) or
raise (``"pallas"``).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from optdist_kernels import _dispatch

METHODS = ("coupled_newton", "newton_schulz")
MAX_PALLAS_DIM = 128


def _eye(m: int) -> jax.Array:
    i = lax.broadcasted_iota(jnp.int32, (m, m), 0)
    j = lax.broadcasted_iota(jnp.int32, (m, m), 1)
    return jnp.where(i == j, 1.0, 0.0).astype(jnp.float32)


def _fro(x: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.sum(jnp.sum(x * x, axis=1), axis=0))


def _power(t: jax.Array, p: int, mm) -> jax.Array:
    """``t ** p`` for a static ``p >= 1`` by binary exponentiation."""
    result, base = None, t
    while True:
        if p & 1:
            result = base if result is None else mm(result, base)
        p >>= 1
        if not p:
            return result
        base = mm(base, base)


def _root_block(a: jax.Array, *, p: int, iters: int, eps: float, schulz: bool, precision: Any):
    """The iteration on one ``[m, m]`` block (shared by the kernel and the reference)."""
    m = a.shape[-1]
    mm = lambda x, y: jnp.dot(x, y, precision=precision, preferred_element_type=jnp.float32)
    eye = _eye(m)
    beta = _fro(a)
    a_reg = a + (eps * beta) * eye
    bound = jnp.maximum((1.0 + eps) * beta, jnp.finfo(jnp.float32).tiny)
    z = (1.0 / bound) if schulz else (1.0 + p) / (2.0 * bound)
    x = jnp.exp(jnp.log(z) / p) * eye
    mat = z * a_reg
    inv_sqrt_m = 1.0 / float(m) ** 0.5

    def residual(mat):
        r = _fro(mat - eye) * inv_sqrt_m
        return jnp.where(r == r, r, jnp.inf)  # NaN -> inf

    def body(_, carry):
        x, mat, x_best, r_best = carry
        if schulz:
            r = eye - mat
            t = eye + r * (1.0 / p) + mm(r, r) * ((p + 1.0) / (2.0 * p * p))
        else:
            t = ((p + 1.0) * eye - mat) * (1.0 / p)
        x = mm(x, t)
        mat = mm(_power(t, p, mm), mat)
        res = residual(mat)
        better = res < r_best
        return x, mat, jnp.where(better, x, x_best), jnp.where(better, res, r_best)

    r0 = residual(mat)
    _, _, x_best, r_best = lax.fori_loop(0, iters, body, (x, mat, x, r0))
    return x_best, r_best


def _roots_xla(a, *, p, iters, eps, schulz, precision):
    f = functools.partial(_root_block, p=p, iters=iters, eps=eps, schulz=schulz, precision=precision)
    return jax.vmap(f)(a)


def _roots_pallas(a, *, p, iters, eps, schulz, precision, interpret: bool, poison: bool = False):
    from jax.experimental import pallas as pl

    b, m, _ = a.shape
    if m < 16 or m > MAX_PALLAS_DIM or m & (m - 1):
        raise ValueError(
            f"the Pallas root kernel takes power-of-two blocks 16 <= m <= {MAX_PALLAS_DIM}; got {m}."
        )

    def kernel(a_ref, x_ref, r_ref):
        x, r = _root_block(a_ref[...], p=p, iters=iters, eps=eps, schulz=schulz, precision=precision)
        x_ref[...] = x
        r_ref[...] = jnp.full((1,), r, jnp.float32)

    block = pl.BlockSpec((None, m, m), lambda i: (i, 0, 0))
    x, r = _dispatch.call_kernel(
        kernel,
        [a],
        [block],
        [jax.ShapeDtypeStruct((b, m, m), jnp.float32), jax.ShapeDtypeStruct((b,), jnp.float32)],
        [block, pl.BlockSpec((1,), lambda i: (i,))],
        (b,),
        interpret=interpret,
        poison=poison,
    )
    return x, r


def batched_inverse_pth_root(
    a: jax.Array,
    p: int,
    *,
    method: str = "coupled_newton",
    iters: int = 20,
    ridge_epsilon: float = 1e-6,
    precision: Any = lax.Precision.HIGHEST,
    impl: str = "auto",
) -> tuple[jax.Array, jax.Array]:
    r"""Inverse p-th roots :math:`(A + \epsilon\|A\|_F I)^{-1/p}` of a batch of SPD blocks ``[b, m, m]``.

    Args:
      a: symmetric PSD blocks ``[b, m, m]`` (computed in float32; symmetrized).
      p: the root, an integer ``>= 1``.
      method: ``"coupled_newton"`` or ``"newton_schulz"``.
      iters: iterations run (the best iterate by tracked residual is kept).
      ridge_epsilon: ridge relative to :math:`\|A\|_F`, ``>= 0``.
      precision: matmul precision; ``HIGHEST`` (f32, IEEE in Triton) by default. TF32 (``DEFAULT`` on
        GPU) leaves ~5% error; ``lax.DotAlgorithmPreset.TF32_TF32_F32_X3`` is a faster near-f32 option.
      impl: ``"auto"``, ``"pallas"`` or ``"xla"``.

    Returns:
      ``(roots, residual)``: ``[b, m, m]`` and the tracked relative residual per block ``[b]``.

    Example::

      roots, res = batched_inverse_pth_root(stats, 4)
      roots = jnp.where((res < 1e-3)[:, None, None], roots, previous)
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}.")
    if not isinstance(p, int) or p < 1:
        raise ValueError(f"p must be an int >= 1; got {p!r}.")
    if not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters must be an int >= 1; got {iters!r}.")
    if not ridge_epsilon >= 0.0:
        raise ValueError(f"ridge_epsilon must be >= 0; got {ridge_epsilon!r}.")
    a = jnp.asarray(a, jnp.float32)
    if a.ndim != 3 or a.shape[1] != a.shape[2]:
        raise ValueError(f"a must be a batch of square blocks [b, m, m]; got shape {a.shape}.")
    a = 0.5 * (a + jnp.swapaxes(a, 1, 2))
    kw = dict(
        p=p, iters=iters, eps=float(ridge_epsilon), schulz=method == "newton_schulz", precision=precision
    )
    return _dispatch.dispatch(
        "batched_inverse_pth_root",
        impl,
        functools.partial(_roots_pallas, **kw),
        functools.partial(_roots_xla, **kw),
        a,
    )
