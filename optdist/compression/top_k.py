"""Top-k sparsification: send the k largest-magnitude coordinates (values + int32 indices), by an
exact sort, a sampled threshold, or the fused error-feedback + threshold kernel."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from optdist import _checks
from optdist.compression.base import Compressor, gathered, gathered_ef

_METHODS = ("exact", "threshold", "fused_threshold")


def num_kept(ratio: float, size: int) -> int:
    """``k = ceil(ratio * d)``, at least 1 (the small slack absorbs float rounding); 0 for ``d = 0``."""
    return max(1, min(size, math.ceil(ratio * size - 1e-9))) if size else 0


def _scatter(payload: dict, size: int) -> jax.Array:
    return _scatter_add(payload, jnp.zeros((size,), payload["values"].dtype))


def _scatter_add(payload: dict, acc: jax.Array) -> jax.Array:
    return acc.at[payload["indices"]].add(payload["values"].astype(acc.dtype))


def _empty_payload(x: jax.Array, count: bool) -> dict:
    """The payload of an empty leaf (it is only sized, never sent: it goes through the plain mean)."""
    payload = {"values": jnp.zeros((0,), x.dtype), "indices": jnp.zeros((0,), jnp.int32)}
    return {**payload, "count": jnp.int32(0)} if count else payload


def top_k(
    ratio: float,
    method: str = "exact",
    sample_size: int = 4096,
    *,
    tol: float | None = None,
    max_refine: int | None = None,
    impl: str = "auto",
) -> Compressor:
    r"""Top-k sparsification of each leaf (gathered protocol).

    .. math:: C(x) = \sum_{j \in \mathrm{top}_k(|x|)} x_j e_j, \qquad k = \lceil \mathrm{ratio} \cdot d \rceil

    Contractive with :math:`\|C(x) - x\|^2 \le (1 - k/d)\|x\|^2`; biased, so use
    it with error feedback (``compressed_mean(..., feedback="ef")``).

    ``method="exact"`` uses ``lax.top_k`` over all ``d`` entries.

    ``method="threshold"`` avoids the full sort: it estimates the
    ``1 - 2k/d`` quantile of ``|x|`` from ``sample_size`` random coordinates,
    collects the entries above it into a buffer of ``2k`` candidates (lowest
    indices first if more pass), and keeps the ``k`` largest of those; the
    payload has fixed capacity ``k`` plus an int32 ``count`` of the slots used
    (unused slots hold zeros). It equals the exact top-k whenever the estimated
    threshold lets between ``k`` and ``2k`` entries through (with high
    probability), and is not guaranteed contractive with ``δ = k/d`` otherwise.

    ``method="fused_threshold"`` sorts nothing at all: the fused error-feedback + threshold kernel
    :func:`optdist_kernels.ef_threshold_topk`. With capacity
    :math:`c = \min(d, \lfloor k(1 + \mathrm{tol})\rfloor)`, a threshold :math:`t` is estimated from
    ``sample_size`` coordinates of :math:`|x|` and refined by counting passes (at most
    ``max_refine``) until between :math:`k(1 - \mathrm{tol})` and :math:`c` entries pass; the payload
    holds the entries with :math:`|x_j| \ge t` (at most :math:`c`, lowest indices first), so
    :math:`|S|` is only approximately ``k`` (exact top-k when the threshold is exact). Payload:
    ``c`` float32 values + ``c`` int32 indices + an int32 count. With ``feedback="ef"`` the fused
    kernel computes :math:`p = g + e`, the payload and the residual (``p`` off the kept set, 0 on it,
    so :math:`e_{\mathrm{new}} + C(p) = p` exactly) in one write pass; a NaN entry is never kept.
    ``impl`` picks Pallas or its XLA reference (the receive side is an XLA scatter either way). The
    deprecated ``threshold_top_k(ratio, tol, sample_size, max_refine)`` returns this compressor.

    Payload per leaf (``exact``, ``threshold``): ``k`` values (the leaf's dtype, float32 for lower
    precision) + ``k`` int32 indices (+ a 4-byte count for ``threshold``),
    all-gathered: each worker sends ``(n - 1) × payload`` bytes; the receive side scatter-adds the
    ``n`` payloads in worker order and divides by ``n``. The threshold sample uses a key that differs
    per worker. Scalars, empty leaves and leaves where the payload would not be smaller go
    uncompressed through the plain mean. Stateless (the EF residual lives in ``compressed_mean``).

    Args:
      ratio: fraction of coordinates kept, in (0, 1].
      method: ``"exact"``, ``"threshold"`` or ``"fused_threshold"``.
      sample_size: coordinates sampled to estimate the threshold (``>= 1``).
      tol: ``fused_threshold`` only: accepted relative shortfall/excess of the kept count, in
        [0, 1); sets the capacity. Default 0.1.
      max_refine: ``fused_threshold`` only: extra counting passes allowed (``>= 0``). Default 4.
      impl: ``"auto"``, ``"pallas"`` or ``"xla"`` (``"pallas"`` only with ``fused_threshold``).

    Returns:
      A :class:`~optdist.compression.Compressor` (with a fused ``aggregate_ef`` for
      ``fused_threshold``).

    Example::

      tx = optax.chain(optdist.compressed_mean(optdist.compressors.top_k(0.01), "data", feedback="ef"),
                       optax.sgd(0.1))

    References:
      Stich, Cordonnier, Jaggi, "Sparsified SGD with Memory", NeurIPS 2018.
      Aji, Heafield, "Sparse Communication for Distributed Gradient Descent", EMNLP 2017.
      Shi, Chu, Cheung, See, "Understanding Top-k Sparsification in Distributed Deep Learning",
      2019 (threshold estimation instead of sorting).
    """
    from optdist_kernels import resolve_impl

    ratio = _checks.in_range(ratio, "ratio", 0.0, 1.0, low_open=True)
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}; got {method!r}.")
    sample_size = _checks.positive_int(sample_size, "sample_size")
    if method == "fused_threshold":
        tol = 0.1 if tol is None else _checks.in_range(tol, "tol", 0.0, 1.0, high_open=True)
        max_refine = 4 if max_refine is None else max_refine
        if isinstance(max_refine, bool) or not isinstance(max_refine, int) or max_refine < 0:
            raise ValueError(f"max_refine must be an int >= 0; got {max_refine!r}.")
        resolve_impl(impl, "ef_threshold_topk")  # validates impl
        return _fused_threshold(ratio, tol, sample_size, max_refine, impl)
    for value, param in ((tol, "tol"), (max_refine, "max_refine")):
        if value is not None:
            raise ValueError(f"{param} applies to method='fused_threshold' only; got {param}={value!r} "
                             f"with method={method!r}.")  # fmt: skip
    resolve_impl(impl, unsupported=f"top_k(method={method!r}) has no kernel; method='fused_threshold' has")

    encode = _encode_exact(ratio) if method == "exact" else _encode_threshold(ratio, sample_size)
    compressor = gathered(f"top_k({ratio:g}, {method})", encode, _scatter, accumulate=_scatter_add)
    # k = ceil(ratio d) >= ratio d, so delta = k / d >= ratio on every leaf (exact top-k only).
    return compressor._replace(contraction=ratio) if method == "exact" else compressor


def _encode_exact(ratio: float):
    """``top_k(method="exact")``'s encoder: ``lax.top_k`` over all ``d`` entries."""

    def encode_exact(x, key):
        del key
        if x.shape[0] == 0:
            return _empty_payload(x, count=False)
        _, idx = lax.top_k(jnp.abs(x), num_kept(ratio, x.shape[0]))
        return {"values": x[idx], "indices": idx.astype(jnp.int32)}

    return encode_exact


def _encode_threshold(ratio: float, sample_size: int):
    """``top_k(method="threshold")``'s encoder: a sampled quantile, then the top-k of ``2k`` candidates."""

    def encode_threshold(x, key):
        d = x.shape[0]
        if d == 0:
            return _empty_payload(x, count=True)
        k = num_kept(ratio, d)
        cap = min(d, 2 * k)  # candidate buffer: twice the kept count absorbs the estimate's noise
        sample = x[jax.random.randint(key, (min(sample_size, d),), 0, d)]
        threshold = jnp.quantile(jnp.abs(sample), 1.0 - cap / d)
        mask = jnp.abs(x) >= threshold
        slot = jnp.cumsum(mask) - 1  # position of each candidate in the buffer
        slot = jnp.where(mask & (slot < cap), slot, cap)  # cap = out of range: dropped
        cand = jnp.zeros((cap,), jnp.int32).at[slot].set(jnp.arange(d, dtype=jnp.int32), mode="drop")
        num_cand = jnp.minimum(jnp.sum(mask), cap)
        valid = jnp.arange(cap) < num_cand
        _, best = lax.top_k(jnp.where(valid, jnp.abs(x[cand]), -1.0), k)  # a sort of 2k entries, not d
        idx = cand[best]
        count = jnp.minimum(num_cand, k).astype(jnp.int32)
        values = jnp.where(jnp.arange(k) < count, x[idx], 0)
        return {"values": values, "indices": idx, "count": count}

    return encode_threshold


def _fused_threshold(ratio: float, tol: float, sample_size: int, max_refine: int, impl: str) -> Compressor:
    """``top_k(method="fused_threshold")``: the gathered protocol around the fused EF + top-k kernel."""
    from optdist_kernels import ef_threshold_topk

    def encode_ef(x, e, key):
        d = x.shape[0]
        if d == 0:
            return {**_empty_payload(x, count=True), "values": jnp.zeros((0,), jnp.float32)}, x + e
        k = num_kept(ratio, d)
        capacity = min(d, math.floor(k * (1.0 + tol)))
        return ef_threshold_topk(
            x,
            e,
            key,
            k,
            capacity=capacity,
            tol=tol,
            sample_size=sample_size,
            max_refine=max_refine,
            impl=impl,
        )

    # Slots from ``count`` on hold value 0 at index 0: adding them changes nothing.
    return gathered_ef(f"top_k({ratio:g}, fused_threshold)", encode_ef, _scatter_add)
