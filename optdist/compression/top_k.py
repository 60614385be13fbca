"""Top-k sparsification: send the k largest-magnitude coordinates (values + int32 indices)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from optdist import _checks
from optdist.compression.base import Compressor, gathered

_METHODS = ("exact", "threshold")


def num_kept(ratio: float, size: int) -> int:
    """``k = ceil(ratio * d)``, at least 1 (the small slack absorbs float rounding)."""
    return max(1, min(size, math.ceil(ratio * size - 1e-9)))


def _scatter(payload: dict, size: int) -> jax.Array:
    return jnp.zeros((size,), payload["values"].dtype).at[payload["indices"]].add(payload["values"])


def top_k(ratio: float, method: str = "exact", sample_size: int = 4096) -> Compressor:
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

    Payload per leaf: ``k`` values (the leaf's dtype, float32 for lower
    precision) + ``k`` int32 indices (+ a 4-byte count for ``threshold``),
    all-gathered: each worker sends ``(n - 1) × payload`` bytes. Stateless.

    Args:
      ratio: fraction of coordinates kept, in (0, 1].
      method: ``"exact"`` or ``"threshold"``.
      sample_size: coordinates sampled to estimate the threshold.

    Returns:
      A :class:`~optdist.compression.Compressor`.

    Example::

      tx = optax.chain(optdist.compressed_mean(optdist.compressors.top_k(0.01), "data", feedback="ef"),
                       optax.sgd(0.1))

    References:
      Stich, Cordonnier, Jaggi, "Sparsified SGD with Memory", NeurIPS 2018.
      Aji, Heafield, "Sparse Communication for Distributed Gradient Descent", EMNLP 2017.
    """
    ratio = _checks.in_range(ratio, "ratio", 0.0, 1.0, low_open=True)
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}; got {method!r}.")
    sample_size = _checks.positive_int(sample_size, "sample_size")

    def encode_exact(x, key):
        del key
        _, idx = lax.top_k(jnp.abs(x), num_kept(ratio, x.shape[0]))
        return {"values": x[idx], "indices": idx.astype(jnp.int32)}

    def encode_threshold(x, key):
        d = x.shape[0]
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

    encode = encode_exact if method == "exact" else encode_threshold
    compressor = gathered(f"top_k({ratio:g}, {method})", encode, _scatter)
    # k = ceil(ratio d) >= ratio d, so delta = k / d >= ratio on every leaf (exact top-k only).
    return compressor._replace(contraction=ratio) if method == "exact" else compressor
