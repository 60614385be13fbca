"""PowerSGD: rank-r power-iteration compression with two all-reduces (P, then Q)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from optdist import _checks
from optdist.comm.packing import compute_dtype
from optdist.compression.base import Aggregate, Compressor, flatten_floating

_ORTHOGONALIZATIONS = ("auto", "qr", "gram_schmidt")
_LAYOUTS = ("channels_last", "channels_first")
# Every product in float32 (no TF32 / bf16 passes on GPU), in the plain and the fused path alike, so
# both compute the same numbers on every backend (the kernels' XLA references use HIGHEST too).
_HIGHEST = jax.lax.Precision.HIGHEST
# Up to this rank the decoded P Qᵀ is written as r outer products, fused into its consumers.
_INLINE_DECODE_MAX_RANK = 8


class PowerSGDState(NamedTuple):
    """State of the PowerSGD compressor.

    Attributes:
      q: one ``[B, cols, r]`` array per group of same-shaped matrices (the
        warm-started right factor; identical on every worker, since it is the
        output of an all-reduce, or the shared random init). Empty without warm start.
    """

    q: tuple[jax.Array, ...]


class _Group(NamedTuple):
    rows: int
    cols: int
    rank: int
    dtype: Any
    leaves: tuple[int, ...]


def _matrix_shape(shape: tuple[int, ...], layout: str) -> tuple[int, int]:
    if layout == "channels_last":  # JAX/Flax kernels (..., in, out): (prod(shape[:-1]), out)
        return math.prod(shape[:-1]), shape[-1]
    return shape[0], math.prod(shape[1:])  # PyTorch (out, in, ...): (out, prod(rest))


def _plan(leaves, rank: int, min_compression_rate: float, layout: str) -> tuple[list[_Group], list[int]]:
    """Groups compressible leaves by matrix shape; the rest go through the plain mean."""
    groups: dict[tuple, list[int]] = {}
    plain = []
    for i, leaf in enumerate(leaves):
        shape = jnp.shape(leaf)
        if len(shape) >= 2:
            rows, cols = _matrix_shape(shape, layout)
            r = min(rank, rows, cols)
            if r > 0 and rows * cols / (r * (rows + cols)) >= min_compression_rate:
                groups.setdefault((rows, cols, r, compute_dtype(leaf.dtype)), []).append(i)
                continue
        plain.append(i)
    return [_Group(*k, tuple(v)) for k, v in groups.items()], plain


def _matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.matmul(a, b, precision=_HIGHEST)


def _transpose(x: jax.Array) -> jax.Array:
    return jnp.swapaxes(x, -1, -2)


def _qr(p: jax.Array) -> jax.Array:
    return jnp.linalg.qr(p)[0]


def _left_product(p: jax.Array, x: jax.Array) -> jax.Array:
    """``Pᵀ X`` (``[..., r, C]``) of ``p`` ``[..., R, r]`` and ``x`` ``[..., R, C]`` (equal leading dims).

    A dot contracting the rows of ``x``: XLA:CPU copies ``x`` transposed for it unless every leading
    dim is a batch dim of both operands. Under ``vmap`` (simulated workers) the all-reduced ``p`` is
    the same for every worker, so jax's rule would fold the worker axis into ``x``'s free dims and
    XLA would transpose the whole ``x``; the custom rule below broadcasts ``p`` instead (``r`` columns,
    small) and keeps the worker axis a batch dim: one read of ``x``, no copy."""
    batch = tuple(range(x.ndim - 2))
    dims = (((x.ndim - 2,), (x.ndim - 2,)), (batch, batch))
    return jax.lax.dot_general(p, x, dims, precision=_HIGHEST)


_left_product = jax.custom_batching.custom_vmap(_left_product)


@_left_product.def_vmap
def _left_product_vmap(axis_size, in_batched, p, x):
    p, x = (a if b else jnp.broadcast_to(a, (axis_size, *a.shape)) for a, b in zip((p, x), in_batched))
    return _left_product(p, x), True


def _outer_sum(p: jax.Array, q: jax.Array) -> jax.Array:
    """``P Qᵀ`` of ``p`` ``[R, r]`` and ``q`` ``[C, r]``: as ``r`` broadcast outer products (small ``r``)
    the product is elementwise, so XLA fuses it into each consumer (the output, the residual, the
    finiteness check) instead of writing the decoded matrix and reading it back."""
    if p.shape[-1] > _INLINE_DECODE_MAX_RANK:
        return _matmul(p, _transpose(q))
    out = p[:, :1] * q[None, :, 0]
    for k in range(1, p.shape[-1]):
        out = out + p[:, k : k + 1] * q[None, :, k]
    return out


def _random_q(key: jax.Array, group_index: int, group: _Group) -> jax.Array:
    shape = (len(group.leaves), group.cols, group.rank)
    return jax.random.normal(jax.random.fold_in(key, group_index), shape, group.dtype)


def _stack(leaves: list, group: _Group) -> jax.Array:
    """The group's leaves as one ``[B, rows, cols]`` batch in the group's compute dtype."""
    return jnp.stack([leaves[i].reshape(group.rows, group.cols).astype(group.dtype) for i in group.leaves])


def _validate_options(rank, orthogonalization, start_step, seed, matrix_layout, impl) -> int:
    from optdist_kernels import resolve_impl

    rank = _checks.positive_int(rank, "rank")
    if orthogonalization not in _ORTHOGONALIZATIONS:
        raise ValueError(
            f"orthogonalization must be one of {_ORTHOGONALIZATIONS}; got {orthogonalization!r}."
        )
    if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
        raise ValueError(f"start_step must be an integer >= 0; got {start_step!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int; got {seed!r}.")
    if matrix_layout not in _LAYOUTS:
        raise ValueError(f"matrix_layout must be one of {_LAYOUTS}; got {matrix_layout!r}.")
    resolve_impl(impl)  # validates impl (the kernels' dispatch decides Pallas vs XLA per shape)
    return rank


@dataclasses.dataclass(frozen=True)
class _Passes:
    """The fused passes of one PowerSGD step, on the kernels where they take the group, else XLA."""

    impl: str
    orthogonalization: str

    @staticmethod
    def kernel_limit(group: _Group) -> str | None:
        """Why the fused EF kernels cannot take this group (None: they can)."""
        from optdist_kernels import powersgd as kernels

        if np.dtype(group.dtype) != np.float32:
            return f"the kernels compute in float32, the group's compute dtype is {np.dtype(group.dtype)}"
        if group.rank > kernels.MAX_RANK:
            return f"the kernels take rank <= {kernels.MAX_RANK}"
        return None

    def gram_schmidt_limit(self, group: _Group) -> str | None:
        from optdist_kernels import next_pow2
        from optdist_kernels import powersgd as kernels

        limit = self.kernel_limit(group)
        if limit is None and next_pow2(group.rows) * next_pow2(group.rank) > kernels.MAX_ORTHO_ELEMENTS:
            limit = f"next_pow2(rows) * next_pow2(rank) must be <= {kernels.MAX_ORTHO_ELEMENTS} (on chip)"
        return limit

    def use_kernel(self, group: _Group, limit: str | None, what: str, kernel: str) -> bool:
        """True if ``what`` runs as the Pallas ``kernel``; raises for ``impl="pallas"`` if it cannot."""
        from optdist_kernels import resolve_impl

        shapes = f"{len(group.leaves)} x {group.rows} x {group.cols} matrices (rank {group.rank})"
        unsupported = (
            None if limit is None else f"powersgd: {what} of the {shapes} cannot run as a kernel: {limit}"
        )
        return resolve_impl(self.impl, kernel, unsupported=unsupported) == "pallas"

    def _gram_schmidt(self, group: _Group) -> bool:
        return self.orthogonalization == "gram_schmidt" or (
            self.orthogonalization == "auto" and group.rank <= 4
        )

    def orthonormalize(self, p: jax.Array, group: _Group) -> jax.Array:
        """Orthonormal columns of the all-reduced ``P`` (``[B, rows, r]``)."""
        from optdist_kernels import powersgd as kernels

        if not self._gram_schmidt(group):
            return _qr(p)
        if self.use_kernel(group, self.gram_schmidt_limit(group), "Gram-Schmidt", "powersgd_gram_schmidt"):
            return kernels.gram_schmidt(p, impl=self.impl)
        return kernels.gram_schmidt_reference(p)  # same math in the leaf dtype, any rank

    def orthonormalize_q(self, q: jax.Array, group: _Group) -> jax.Array:
        """Orthonormal columns of the warm-started ``Q`` (``[B, cols, r]``, small): always XLA."""
        from optdist_kernels import powersgd as kernels

        return kernels.gram_schmidt_reference(q) if self._gram_schmidt(group) else _qr(q)

    def fused_kernels(self, group: _Group) -> bool:
        """True if the group's error feedback runs on the fused Pallas kernels (stacked ``[B, R, C]``
        inputs); False: the per-leaf XLA passes."""
        limit = self.kernel_limit(group)
        return self.use_kernel(group, limit, "the fused error feedback", "powersgd_ef_project")

    def ef_project(self, g: jax.Array, e: jax.Array, q: jax.Array):
        """``M = G + E`` and ``M Q`` on the kernel (a stacked group)."""
        from optdist_kernels import powersgd as kernels

        return kernels.ef_project(g, e, q, impl=self.impl)

    def decode_residual(self, m: jax.Array, p: jax.Array, q: jax.Array):
        """``D = P̂ Qᵀ`` and ``M - D`` on the kernel (a stacked group)."""
        from optdist_kernels import powersgd as kernels

        return kernels.decode_residual(m, p, q, impl=self.impl)


def powersgd(
    rank: int,
    warm_start: bool = True,
    orthogonalization: str = "auto",
    min_compression_rate: float = 2.0,
    start_step: int = 0,
    seed: int = 0,
    matrix_layout: str = "channels_last",
    impl: str = "auto",
    orthogonalize_q: bool = True,
) -> Compressor:
    r"""PowerSGD's rank-``r`` compressor and its two-all-reduce protocol.

    Every leaf with ``ndim >= 2`` is viewed as a matrix ``M_i``: by default
    ``(prod(shape[:-1]), shape[-1])`` (``matrix_layout="channels_last"``, the
    JAX/Flax convention where a conv kernel is ``(h, w, in, out)``; the result
    is PyTorch's ``(out, in·h·w)`` matricization transposed, and a low-rank
    approximation does not care about the transpose), or
    ``(shape[0], prod(shape[1:]))`` for PyTorch-layout tensors
    (``"channels_first"``). (Using ``shape[0]`` rows on a Flax ``(1, 1, in, out)``
    kernel would give a 1-row matrix that cannot be compressed.) With the
    warm-started ``Q``, re-orthogonalized first as PyTorch's hook does:

    .. math::
        \hat Q = \mathrm{orth}(Q), \quad
        P = \tfrac{1}{n}\sum_i M_i \hat Q \;(\text{all-reduce}), \quad \hat P = \mathrm{orth}(P), \quad
        Q \leftarrow \tfrac{1}{n}\sum_i M_i^\top \hat P \;(\text{all-reduce}), \quad
        \bar M = \hat P Q^\top .

    Numerics (``orthogonalize_q``): the paper's Algorithm 1 uses ``P = M Q`` with the previous
    step's ``Q = M^\top \hat P`` as is. Both forms give the same :math:`\hat P` and :math:`\bar M` in
    exact arithmetic (``orth(Q) = Q R^{-1}`` with ``R`` upper triangular, and Gram–Schmidt of
    ``P R^{-1}`` is that of ``P``), but the columns of that ``Q`` scale like the singular values of
    ``M``, so ``cond(M Q) = cond(M)^2`` and float32 Gram–Schmidt of ``P`` loses the directions below
    :math:`\sigma_1 \sqrt{\epsilon}`; with :math:`\hat Q` it is ``cond(M)``. Measured (one
    worker, rank 4, a 64 x 32 float32 matrix with singular values 1, 1e-2, 1e-3, 1e-4, 8
    warm-started steps, decoded matrix against a float64 run): relative error 1.5e-7 – 2.7e-7 at
    every warm-started step with ``orthogonalize_q=True`` (the default, also with ``"qr"``), up to
    4.5e-4 with ``False`` (7.6e-2 with the stacked products of the previous implementation: how far
    it goes depends on rounding order). PyTorch's hook float32: 1.5e-7. The first step (from the
    random ``Q``, ``cond(P) = cond(M)``) depends on the orthogonalization instead: 2.4e-4 with
    Gram–Schmidt (``"auto"`` at rank 4), 4.3e-7 with ``"qr"`` (the hook uses QR above rank 2).
    The default costs one Gram–Schmidt (or QR) of the small ``[B, cols, r]`` factor per step, always
    XLA; ``False`` keeps the paper's form.

    ``mean = local = \bar M`` (the globally decoded value; error feedback
    subtracts it, as in the paper and PyTorch's hook). ``r`` is capped at
    ``min(rows, cols)``. Leaves that are vectors/scalars, or whose compression
    rate ``rows·cols / (r (rows + cols))`` is below ``min_compression_rate``, are
    averaged exactly, in the P all-reduce. Leaves with the same matrix
    shape are batched: a step makes two all-reduce rounds for the whole tree (P, then Q;
    in each, the arrays under 16384 entries share one buffer per dtype).
    Before ``start_step`` every leaf is averaged exactly (one all-reduce; Q is
    left untouched, ``local = x`` so an EF residual stays zero). The products are
    computed in float32 at ``HIGHEST`` precision (no TF32 on GPU).

    Fused error feedback (``aggregate_ef``, used by
    ``compressed_mean(..., feedback="ef")`` and :func:`optdist.powersgd`): the residual update
    :math:`E_i = M_i - \bar M` is computed inside the compressor, with the same collectives and
    bytes as adding, aggregating and subtracting in separate steps (and the same arithmetic: the
    two paths agree to float32 rounding); leaves sent exactly get residual 0. On the XLA path each
    matrix is handled on its own (no stacked copies of a group): :math:`M_i = G_i + E_i` is written
    once, :math:`M_i \hat Q` and :math:`(\hat P^\top M_i)^\top` read it in place (a batched dot, not
    a transposed copy of ``M``, also under simulated workers), and for ``r <= 8`` the decoded
    :math:`\hat P Q^\top` is written as ``r`` outer products that XLA fuses into the output and
    residual writes (never materialized, never broadcast). That is three passes over the data, the
    fewest the protocol allows (the two all-reduces separate them): reading ``G, E`` and writing
    ``M``, reading ``M`` twice, writing the output and the residual (plus, under
    :func:`optdist.compressed_mean`'s non-finite guard, reading the old ``E``), 9 full-size passes per
    worker against the one-pass floor's 4. On the Pallas path (``impl="pallas"``) per batch of
    same-shaped matrices :func:`optdist_kernels.ef_project` forms :math:`M_i` and :math:`M_i \hat Q`
    in one pass and :func:`optdist_kernels.decode_residual` writes :math:`\bar M` and the residual in
    one pass; Gram–Schmidt of ``P`` runs as :func:`optdist_kernels.gram_schmidt`. (For float32
    leaves the fused and unfused paths agree to float32 rounding; for bf16/fp16 leaves the fused
    path forms :math:`G_i + E_i` in float32 rather than in the leaf dtype.)

    ``impl`` selects how those fused steps (and Gram–Schmidt of ``P``, in either path) run: ``"xla"``
    the per-leaf XLA passes above, ``"pallas"`` the Pallas kernels (interpret mode off GPU),
    ``"auto"`` (default) the kernel only on a backend where it was measured faster than XLA
    (:data:`optdist_kernels.AUTO_BACKENDS`; none yet, so ``"auto"`` is XLA until a GPU
    measurement lists it) and never fails. Groups the kernels cannot take (rank ``> 8``, a
    compute dtype other than float32, a Gram–Schmidt factor with
    ``next_pow2(rows) · next_pow2(r) > 2**16``) use XLA under ``"auto"``/``"xla"`` and raise a
    ``ValueError`` under ``"pallas"``. QR orthogonalization is always XLA.

    Error-feedback residuals: the protocol sees the workers' matrices only through their mean
    (:math:`P = \bar M Q`, :math:`Q = \bar M^\top \hat P`), and every worker subtracts the same
    :math:`\bar M`-decoded value, so exactly :math:`e_i - \bar e = \sum_t (g_{i,t} - \bar g_t)`: the
    mean residual :math:`\bar e` stays bounded while each worker's deviation from it is the running
    sum of its gradient deviations, growing like :math:`\sqrt t` for i.i.d. noise (measured, 4
    workers, 64 x 32, rank 4, unit noise: :math:`\|e_0\|` 261 / 436 / 1239 at steps 10 / 100 / 1000,
    :math:`\|\bar e\|` 230 / 227 / 230; with a fixed rank-8 signal of norm 16 under the noise, over
    30k steps: :math:`\|e_0\|` 133 / 395 / 1253 / 3874 / 6786 at steps 10 / 100 / 1k / 10k / 30k,
    i.e. :math:`39.2 \sqrt t = \sqrt{1 - 1/n}\,\|\text{noise}\|\sqrt t`, while
    :math:`\|\bar e\|` stays 59 – 62) and like ``t`` for persistent heterogeneity. In exact
    arithmetic the deviations never reach the output; in float32 they cost cancellation in
    :math:`\bar M = \mathrm{mean}_i (g_i + e_i)`, relative to :math:`\|e_i\|` rather than
    :math:`\|\bar e\|`.

    State (identical on every worker): ``Q`` per group, initialized from
    ``seed`` (i.i.d. normal, the same on all workers); without warm start a
    fresh ``Q`` is drawn each step from the shared step key.

    Bytes per step: the ring all-reduce of all P's (``rows × r`` per matrix) with
    the uncompressed leaves, then of all Q's (``cols × r`` per matrix).

    Non-finite policy: that of :func:`optdist.compressed_mean` (a non-finite
    gradient makes the all-reduced factors, hence the mean, non-finite; the
    step's state update is then skipped on every worker).

    Args:
      rank: target rank ``r >= 1``.
      warm_start: reuse the previous step's ``Q`` (the paper's default).
      orthogonalization: ``"qr"``, ``"gram_schmidt"``, or ``"auto"`` (Gram-Schmidt
        for ``r <= 4``, as the paper's reference code does, QR otherwise; batched QR of
        rank-4 factors deadlocked XLA:CPU on the ResNet-50 tree with jax 0.10.2).
      min_compression_rate: compress a matrix only if it saves at least this factor.
      start_step: exact averaging for steps ``< start_step``.
      seed: seed of ``Q``'s random init.
      matrix_layout: ``"channels_last"`` or ``"channels_first"`` (see above).
      impl: ``"auto"``, ``"pallas"`` or ``"xla"`` (see above).
      orthogonalize_q: orthogonalize the warm-started (or fresh random) ``Q`` before ``P = M Q``
        (PyTorch's hook, the default: float32 error ``cond(M)`` rather than ``cond(M)^2`` times
        rounding); False: the paper's Algorithm 1. Same result in exact arithmetic (see above).

    Returns:
      A :class:`~optdist.compression.Compressor` with :class:`PowerSGDState` and a fused
      ``aggregate_ef``.

    Example::

      tx = optax.chain(optdist.compressed_mean(optdist.compressors.powersgd(4), "data", feedback="ef"),
                       optax.sgd(0.1, momentum=0.9))

    References:
      Vogels, Karimireddy, Jaggi, "PowerSGD: Practical Low-Rank Gradient Compression for
      Distributed Optimization", NeurIPS 2019.
    """
    rank = _validate_options(rank, orthogonalization, start_step, seed, matrix_layout, impl)
    min_compression_rate = _checks.in_range(min_compression_rate, "min_compression_rate", 0.0, float("inf"))
    if not isinstance(orthogonalize_q, bool):
        raise TypeError(f"orthogonalize_q must be a bool; got {orthogonalize_q!r}.")
    passes = _Passes(impl, orthogonalization)

    def init(params):
        groups, _ = _plan(jax.tree_util.tree_leaves(params), rank, min_compression_rate, matrix_layout)
        if not warm_start:
            return PowerSGDState(())
        key = jax.random.key(seed)
        return PowerSGDState(tuple(_random_q(key, g, group) for g, group in enumerate(groups)))

    def protocol(x, error, state, key, step, channel):
        """The two-all-reduce protocol on ``x`` (``error=None``) or on ``x + error`` (fused EF).

        Returns ``(mean, second, state)`` (trees): ``second`` is the ``local`` decoded
        value of :class:`Aggregate` without ``error``, the new residual with it.
        """
        leaves, treedef = flatten_floating(x, "powersgd")
        errors = None if error is None else treedef.flatten_up_to(error)
        groups, plain = _plan(leaves, rank, min_compression_rate, matrix_layout)
        # The leaves sent exactly: x, or p = x + e (their new residual is 0).
        sent_exactly = list(leaves) if errors is None else [x_ + e for x_, e in zip(leaves, errors)]
        zero_error = None if errors is None else [jnp.zeros_like(e) for e in errors]
        # Per group: the stacked Pallas kernels, or the per-leaf XLA passes (no stacked copies).
        on_kernels = [errors is not None and passes.fused_kernels(g) for g in groups]

        def matrix(tree_leaves, i, group):
            return tree_leaves[i].reshape(group.rows, group.cols).astype(group.dtype)

        def compressed(channel):
            qs = state.q if warm_start else [_random_q(key, j, g) for j, g in enumerate(groups)]
            if orthogonalize_q:  # PyTorch's hook: P = M orth(Q); the paper: P = M Q
                qs = [passes.orthonormalize_q(q, g) for q, g in zip(qs, groups)]
            ms, ps = [], []
            for g, q, kernel in zip(groups, qs, on_kernels):
                if kernel:
                    m, p = passes.ef_project(_stack(leaves, g), _stack(errors, g), q)
                else:  # per leaf: M_b = X_b (+ E_b), written once; P_b = M_b Q_b
                    m = [matrix(leaves, i, g) for i in g.leaves]
                    if errors is not None:
                        m = [mb + matrix(errors, i, g) for mb, i in zip(m, g.leaves)]
                    p = jnp.stack([_matmul(mb, q[b]) for b, mb in enumerate(m)])
                ms.append(m)
                ps.append(p)
            ps, plain_means = channel.pmean((ps, [sent_exactly[i] for i in plain]))
            ps = [passes.orthonormalize(p, g) for p, g in zip(ps, groups)]
            new_qs = []
            for m, p, kernel in zip(ms, ps, on_kernels):
                if kernel:
                    new_qs.append(_matmul(_transpose(m), p))
                else:  # Q_b = M_bᵀ P̂_b, as (P̂_bᵀ M_b)ᵀ: M_b read in place, no transposed copy
                    new_qs.append(jnp.stack([_transpose(_left_product(p[b], mb)) for b, mb in enumerate(m)]))
            qs = channel.pmean(new_qs)
            out = list(leaves)
            second = list(leaves) if errors is None else list(zero_error)
            for g, m, p, q, kernel in zip(groups, ms, ps, qs, on_kernels):
                if kernel:
                    decoded, residual = passes.decode_residual(m, p, q)
                for b, i in enumerate(g.leaves):
                    if kernel:
                        out[i] = decoded[b].reshape(leaves[i].shape).astype(leaves[i].dtype)
                        second[i] = residual[b].reshape(errors[i].shape).astype(errors[i].dtype)
                        continue
                    d = _outer_sum(p[b], q[b])  # fused into the output and residual writes
                    out[i] = d.reshape(leaves[i].shape).astype(leaves[i].dtype)
                    if errors is None:
                        second[i] = out[i]  # local = the globally decoded value
                    else:
                        second[i] = (m[b] - d).reshape(errors[i].shape).astype(errors[i].dtype)
            for i, mean in zip(plain, plain_means):
                out[i] = mean
            return out, second, tuple(qs) if warm_start else ()

        def exact(channel):
            out = channel.pmean(sent_exactly)
            return out, list(leaves) if errors is None else list(zero_error), tuple(state.q)

        if start_step == 0 or not groups:
            out, second, q = compressed(channel)
        else:
            out, second, q = channel.cond(step >= start_step, compressed, exact)
        unflat = lambda ls: jax.tree_util.tree_unflatten(treedef, ls)
        return unflat(out), unflat(second), PowerSGDState(q)

    def aggregate(x, state, key, step, channel):
        return Aggregate(*protocol(x, None, state, key, step, channel))

    def aggregate_ef(x, error, state, key, step, channel):
        mean, new_error, new_state = protocol(x, error, state, key, step, channel)
        return Aggregate(mean, None, new_state), new_error

    return Compressor(init, aggregate, f"powersgd({rank})", aggregate_ef)
