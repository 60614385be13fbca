"""Exact per-worker byte accounting for the collectives a transform issues.

Cost model (bytes one worker *sends*), per array of ``E`` elements of ``s`` bytes over ``n``
workers, each array of a collective counted on its own (as it appears in the compiled program:
``lax.psum`` of a tree lowers to one all-reduce operand per array; :class:`optdist.comm.Channel`
packs the small leaves of one all-reduce into one buffer per dtype and counts what it sends):

* all-reduce (``psum``/``pmean``/``pmax``), ring algorithm on the array padded to ``n`` equal
  chunks (the small leaves of one all-reduce, under :data:`PACK_BELOW` elements, travel as one
  buffer per dtype): ``2 (n - 1) ceil(E / n) s``; this is ``2 (n-1)/n B`` when ``n`` divides ``E``, and never
  under-counts otherwise;
* all-gather: ``(n - 1) E s`` (each worker forwards every other shard once);
* reduce-scatter: ``(n - 1) ceil(E / n) s``;
* ppermute (a permutation in which every worker sends): ``E s``.

The dtype counted is the dtype the program sends. (XLA:CPU promotes bfloat16 / float16
all-reduces to float32 in its own passes; the counter reports the half-precision bytes a GPU or
TPU sends, and the byte audit test maps the promotion back.)

The running total lives in the optimizer state as a :class:`ByteCounter`: two
``uint32`` words, so the count is exact up to 2**64 bytes without enabling
x64. :func:`bytes_sent` reads it back from any state tree.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optdist._tree import instances
from optdist.comm.axes import AxisName

_WORD = 1 << 32


@dataclasses.dataclass(frozen=True)
class ByteCounter:
    """Bytes sent so far by one worker, for one axis (exact, 64-bit in two words).

    ``axis`` is static metadata naming the axis the bytes crossed, so
    :func:`bytes_sent` can report hierarchical topologies per axis.
    """

    hi: jax.Array
    lo: jax.Array
    axis: AxisName = None

    @classmethod
    def zeros(cls, axis: AxisName = None) -> ByteCounter:
        return cls(jnp.zeros((), jnp.uint32), jnp.zeros((), jnp.uint32), axis)

    def add(self, nbytes: int, where: jax.Array | bool = True) -> ByteCounter:
        """Adds a static byte count, optionally only where ``where`` is true."""
        nbytes = int(nbytes)
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}.")
        if nbytes == 0:
            return self
        hi_add = jnp.asarray(nbytes // _WORD, jnp.uint32)
        lo_add = jnp.asarray(nbytes % _WORD, jnp.uint32)
        where = jnp.asarray(where)
        hi_add = jnp.where(where, hi_add, jnp.uint32(0))
        lo_add = jnp.where(where, lo_add, jnp.uint32(0))
        lo = self.lo + lo_add  # wraps modulo 2**32
        carry = (lo < self.lo).astype(jnp.uint32)
        return ByteCounter(self.hi + hi_add + carry, lo, self.axis)

    def value(self) -> np.ndarray:
        """The count as int64 (per worker if the counter carries a worker axis)."""
        hi = np.asarray(self.hi).astype(np.uint64)
        lo = np.asarray(self.lo).astype(np.uint64)
        return (hi * np.uint64(_WORD) + lo).astype(np.int64)


jax.tree_util.register_dataclass(ByteCounter, data_fields=["hi", "lo"], meta_fields=["axis"])


def bytes_sent(state: Any, axis_name: AxisName | str = "all") -> np.ndarray:
    """Total bytes sent per worker, read from every counter in an optimizer state.

    Args:
      state: an optimizer state (or any tree holding :class:`ByteCounter`s),
        stacked over workers or not.
      axis_name: ``"all"`` sums every counter; otherwise only counters whose
        axis equals ``axis_name`` (e.g. ``"dcn"`` in a hierarchical chain). An axis no
        counter in the state names raises a ValueError listing the axes there are (a
        misspelt axis would otherwise read as 0 bytes).

    Returns:
      An int64 array: a scalar for one worker's state, or shape ``[num_workers]``
      for a state carrying a leading worker axis (0 for a state without counters).
    """
    counters = instances(state, ByteCounter)
    if axis_name != "all":
        matching = [c for c in counters if c.axis == axis_name]
        if counters and not matching:
            axes = sorted({repr(c.axis) for c in counters})
            raise ValueError(
                f"bytes_sent: no byte counter in this state is for axis_name={axis_name!r}; its counters "
                f"are for {', '.join(axes)}. Pass one of those, or 'all' for the total."
            )
        counters = matching
    if not counters:
        _refuse_flattened_counters(state)
        return np.zeros((), np.int64)
    return sum(c.value() for c in counters)


def _refuse_flattened_counters(state: Any) -> None:
    """A state whose counters were turned into plain ``{"hi", "lo"}`` entries (``flax.nnx.state`` of an
    ``nnx.Optimizer`` does this) would read as 0 bytes: raise instead, saying where to read."""
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]

    def has(word):  # an entry named word, possibly wrapped (nnx keeps each array under `.value`)
        return any(f"['{word}']" in p or p.endswith(f".{word}") for p in paths)

    if has("hi") and has("lo"):
        raise ValueError(
            "bytes_sent: this state holds 'hi'/'lo' entries but no ByteCounter: its counters were flattened "
            "(e.g. by flax.nnx.state). Read the optimizer state itself, e.g. "
            "nnx.merge(graphdef, state)[1].opt_state."
        )


def _arrays(tree: Any) -> Iterable[tuple[int, int]]:
    """(elements, itemsize) of every array in ``tree``; empty arrays send nothing."""
    for leaf in jax.tree_util.tree_leaves(tree):
        elems = int(math.prod(leaf.shape))
        if elems:
            yield elems, np.dtype(leaf.dtype).itemsize


# Leaves below this many elements share one all-reduce buffer per dtype (ring padding and per-collective
# latency dominate there; packing a large leaf would only add a copy). Channel follows the same rule.
PACK_BELOW = 16384


def is_packed(leaves: list) -> list[bool]:
    """Which leaves of one all-reduce travel packed per dtype (the small ones, when two or more are)."""
    small = [math.prod(jnp.shape(x)) < PACK_BELOW for x in leaves]
    return small if sum(small) >= 2 else [False] * len(leaves)


def all_reduce_bytes(tree: Any, n: int) -> int:
    """Bytes one worker sends in a ring all-reduce of ``tree`` over ``n`` workers, as
    :class:`optdist.comm.Channel` sends it: large arrays one by one, small ones packed per dtype."""
    leaves = jax.tree_util.tree_leaves(tree)
    flags = is_packed(leaves)
    arrays = list(_arrays([x for x, f in zip(leaves, flags) if not f]))
    packed: dict[np.dtype, int] = {}
    for x, f in zip(leaves, flags):
        if f:
            packed[np.dtype(x.dtype)] = packed.get(np.dtype(x.dtype), 0) + math.prod(x.shape)
    arrays += [(e, dtype.itemsize) for dtype, e in packed.items() if e]
    return sum(2 * (n - 1) * -(-e // n) * s for e, s in arrays)


def reduce_scatter_bytes(tree: Any, n: int) -> int:
    """Bytes one worker sends in a ring reduce-scatter of ``tree``."""
    return sum((n - 1) * -(-e // n) * s for e, s in _arrays(tree))


def all_gather_bytes(tree: Any, n: int) -> int:
    """Bytes one worker sends when every worker gathers everyone's ``tree``."""
    return sum((n - 1) * e * s for e, s in _arrays(tree))


def payload_bytes(tree: Any) -> int:
    """Bytes of a payload tree (its real dtypes and shapes)."""
    return sum(e * s for e, s in _arrays(tree))
