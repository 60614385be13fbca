"""Shared pieces for the robust aggregators: finite-row masks, distances, limit checks.

Every aggregator sees the gathered matrix ``x`` of shape ``[n, d]`` (one row
per worker). A row with any NaN/Inf is *non-finite*: the distance-based rules
treat it as infinitely far from every other row (distance ``+inf``) and read
its values as zeros, so it can never be selected, averaged or weighted.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

# Up to this many workers, coordinate-wise sorting uses a compare-exchange network
# (elementwise min/max over whole rows); XLA's generic sort along the worker axis is
# 10-70x slower on CPU for small n. Above it the network's size (and compile time) grows.
SORTING_NETWORK_MAX_N = 64


def compute_dtype(x: jax.Array) -> jnp.dtype:
    """At least float32 for the arithmetic (bf16/fp16 updates are aggregated in f32)."""
    return jnp.promote_types(x.dtype, jnp.float32)


def finite_rows(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(ok, x0): ``ok[i]`` is True when row i is all finite; ``x0`` has bad rows zeroed."""
    ok = jnp.all(jnp.isfinite(x), axis=1)
    return ok, jnp.where(ok[:, None], x, jnp.zeros((), x.dtype))


def gram(x0: jax.Array) -> jax.Array:
    """``x0 @ x0.T`` at full f32 precision (no TF32 on GPUs)."""
    return jnp.matmul(x0, x0.T, precision=lax.Precision.HIGHEST)


def pairwise_sq_dists(x0: jax.Array, ok: jax.Array, *, self_distance: float) -> jax.Array:
    """``[n, n]`` squared distances from the Gram matrix; ``+inf`` to and from non-finite rows.

    ``self_distance`` is put on the diagonal of finite rows (0 to count a row
    as its own neighbour, ``inf`` to exclude it). Computed as
    ``|x_i|^2 + |x_j|^2 - 2 x_i.x_j`` (one matmul, no ``[n, n, d]``
    temporary); in float32 this loses accuracy when rows are nearly equal
    compared to their norms (relative error ~1e-7 |x|^2).
    """
    g = gram(x0)
    sq = jnp.diagonal(g)
    d = jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * g, 0.0)
    n = x0.shape[0]
    d = jnp.where(jnp.eye(n, dtype=bool), jnp.asarray(self_distance, d.dtype), d)
    both = ok[:, None] & ok[None, :]
    return jnp.where(both, d, jnp.inf)


def row_mean(x: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """``sum_i w_i x_i`` (``w_i = 1/n`` by default) as a mat-vec: much faster than
    ``jnp.mean(x, axis=0)`` on XLA:CPU, exact f32 on GPUs."""
    if weights is None:
        weights = jnp.full((x.shape[0],), 1.0 / x.shape[0], x.dtype)
    return jnp.matmul(weights.astype(x.dtype), x, precision=lax.Precision.HIGHEST)


@functools.cache
def _merge_sort_pairs(n: int) -> tuple[tuple[int, int], ...]:
    """Comparators of Batcher's odd-even merge sort on the next power of two, restricted to
    indices < n (valid: padding rows would hold +inf and never move)."""
    size = 1
    while size < n:
        size *= 2
    pairs = []
    block = 1
    while block < size:
        k = block
        while k >= 1:
            for j in range(k % block, size - k, 2 * k):
                for i in range(min(k, size - j - k)):
                    a, b = i + j, i + j + k
                    if a // (2 * block) == b // (2 * block) and b < n:
                        pairs.append((a, b))
            k //= 2
        block *= 2
    return tuple(pairs)


def sort_rows(x: jax.Array) -> jax.Array:
    """Sorts every column of ``x [n, d]`` (coordinate-wise order over workers). NaN-free input."""
    n = x.shape[0]
    if n > SORTING_NETWORK_MAX_N:
        return jnp.sort(x, axis=0)
    rows = list(x)
    for a, b in _merge_sort_pairs(n):
        rows[a], rows[b] = jnp.minimum(rows[a], rows[b]), jnp.maximum(rows[a], rows[b])
    return jnp.stack(rows)


def check_f(name: str, f: int, n: int, *, min_n: int, limit: str) -> None:
    """Trace-time check that ``n`` workers are enough for ``f`` Byzantine ones."""
    if n < min_n:
        raise ValueError(
            f"{name}(f={f}) needs {limit} workers (n >= {min_n}); got n={n} workers. "
            "Lower f or use more workers."
        )


def check_matrix(name: str, x: jax.Array) -> None:
    if x.ndim != 2:
        raise ValueError(f"{name} aggregates a [num_workers, dim] matrix; got shape {x.shape}.")
