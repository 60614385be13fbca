"""Static block layout for Shampoo: merging small dims, splitting large ones, grouping by shape.

Every parameter of rank >= 2 (after merging adjacent small dims) is cut into blocks of at most
``block_size`` per dim. A dim of size ``d = q * block_size + r`` gives ``q`` full chunks and one
remainder chunk, so a parameter splits into at most ``2^k`` *regions*, each tiled by one block shape.
Blocks of every parameter that share a shape are stacked into one *bank* ``[N_g, *block_shape]``
(no padding to one global size), so statistics, roots and preconditioning run as one batched
operation per block shape. Everything here is static (Python ints), computed from shapes at trace time.

:func:`assign_blocks` spreads a bank's blocks over ``n`` workers, balancing the per-block root cost
``sum_i s_i^3`` longest-processing-time first; every worker gets ``ceil(N_g / n)`` slots (SPMD needs
equal shapes), short lists being padded with blocks owned by others (computed redundantly, dropped).
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

BlockShape = tuple[int, ...]


def merge_dims(shape: tuple[int, ...], max_dim: int, merge: bool = True) -> tuple[int, ...]:
    """Drops size-1 dims and (if ``merge``) merges adjacent dims while their product is <= ``max_dim``.

    A tensor with two or more non-trivial dims is never merged down to a vector (that would turn
    Shampoo into the diagonal fallback): its last dim then stays separate.
    """
    dims = [d for d in shape if d != 1]
    if not merge:
        return tuple(dims)

    def greedy(ds: list[int]) -> list[int]:
        out: list[int] = []
        for d in ds:
            if out and out[-1] * d <= max_dim:
                out[-1] *= d
            else:
                out.append(d)
        return out

    out = greedy(dims)
    if len(out) == 1 and len(dims) >= 2:
        out = greedy(dims[:-1]) + dims[-1:]
    return tuple(out)


def group_key(block_shape: BlockShape) -> str:
    return "x".join(str(d) for d in block_shape)


@dataclasses.dataclass(frozen=True)
class Region:
    """A sub-array ``[start, start + count * block)`` per dim, tiled by ``block_shape`` blocks."""

    start: tuple[int, ...]
    count: tuple[int, ...]
    block_shape: BlockShape
    offset: int  # first row of this region's blocks in its bank

    @property
    def num_blocks(self) -> int:
        return math.prod(self.count)


@dataclasses.dataclass(frozen=True)
class LeafLayout:
    shape: tuple[int, ...]
    merged: tuple[int, ...]
    diagonal: bool
    parts: tuple[int, ...] = ()  # chunk kinds per dim (1 or 2), regions in itertools.product order
    regions: tuple[Region, ...] = ()
    empty: bool = False  # zero elements: no blocks, no diagonal statistic (passed through)


@dataclasses.dataclass(frozen=True)
class Layout:
    leaves: tuple[LeafLayout, ...]
    groups: tuple[BlockShape, ...]  # bank order
    group_sizes: tuple[int, ...]

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(group_key(g) for g in self.groups)


def _chunks(d: int, block_size: int) -> list[tuple[int, int, int]]:
    """(start, count, size) chunk kinds of one dim."""
    if d <= block_size:
        return [(0, 1, d)]
    q, r = divmod(d, block_size)
    return [(0, q, block_size)] + ([(q * block_size, 1, r)] if r else [])


def make_layout(
    shapes: list[tuple[int, ...]], block_size: int, merge_small_dims: bool, max_preconditioner_dim: int
) -> Layout:
    """The block layout of parameters with the given shapes."""
    counts: dict[BlockShape, int] = {}
    pending = []
    for shape in shapes:
        if math.prod(shape) == 0:
            pending.append(LeafLayout(tuple(shape), tuple(shape), False, empty=True))
            continue
        merged = merge_dims(tuple(shape), block_size, merge_small_dims)
        if len(merged) < 2 or max(merged) > max_preconditioner_dim:
            pending.append(LeafLayout(tuple(shape), merged, True))
            continue
        per_dim = [_chunks(d, block_size) for d in merged]
        regions = []
        for combo in itertools.product(*per_dim):
            bshape = tuple(c[2] for c in combo)
            count = tuple(c[1] for c in combo)
            offset = counts.get(bshape, 0)
            counts[bshape] = offset + math.prod(count)
            regions.append(Region(tuple(c[0] for c in combo), count, bshape, offset))
        pending.append(
            LeafLayout(tuple(shape), merged, False, tuple(len(c) for c in per_dim), tuple(regions))
        )
    groups = tuple(counts)
    return Layout(tuple(pending), groups, tuple(counts[g] for g in groups))


def _region_blocks(x: jax.Array, region: Region) -> jax.Array:
    """[num_blocks, *block_shape] blocks of ``x``'s region, row-major over the block grid."""
    k = len(region.count)
    limit = tuple(s + c * b for s, c, b in zip(region.start, region.count, region.block_shape))
    sub = lax.slice(x, region.start, limit)
    sub = sub.reshape([v for c, b in zip(region.count, region.block_shape) for v in (c, b)])
    sub = sub.transpose([2 * i for i in range(k)] + [2 * i + 1 for i in range(k)])
    return sub.reshape((region.num_blocks, *region.block_shape))


def _region_array(blocks: jax.Array, region: Region) -> jax.Array:
    """Inverse of :func:`_region_blocks`."""
    k = len(region.count)
    x = blocks.reshape((*region.count, *region.block_shape))
    x = x.transpose([j for i in range(k) for j in (i, k + i)])
    return x.reshape(tuple(c * b for c, b in zip(region.count, region.block_shape)))


def to_banks(layout: Layout, leaves: list[jax.Array]) -> dict[str, jax.Array]:
    """Stacks every non-diagonal leaf's blocks into per-shape banks ``{key: [N_g, *shape]}``."""
    pieces: dict[BlockShape, list[jax.Array]] = {g: [] for g in layout.groups}
    for leaf_layout, x in zip(layout.leaves, leaves):
        if leaf_layout.diagonal or leaf_layout.empty:
            continue
        x = jnp.reshape(x, leaf_layout.merged)
        for region in leaf_layout.regions:
            pieces[region.block_shape].append(_region_blocks(x, region))
    return {group_key(g): (p[0] if len(p) == 1 else jnp.concatenate(p, axis=0)) for g, p in pieces.items()}


def _assemble(arrays: dict, parts: tuple[int, ...], dim: int, prefix: tuple[int, ...]) -> jax.Array:
    """Concatenates region arrays (keyed by chunk-kind index per dim) back into one array."""
    if dim == len(parts):
        return arrays[prefix]
    pieces = [_assemble(arrays, parts, dim + 1, prefix + (j,)) for j in range(parts[dim])]
    return pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, axis=dim)


def from_banks(layout: Layout, banks: dict[str, jax.Array]) -> list[jax.Array | None]:
    """Inverse of :func:`to_banks`: one array per leaf (``None`` for diagonal and empty leaves)."""
    out: list[jax.Array | None] = []
    for leaf_layout in layout.leaves:
        if leaf_layout.diagonal or leaf_layout.empty:
            out.append(None)
            continue
        arrays = {}
        for idx, region in zip(
            itertools.product(*[range(p) for p in leaf_layout.parts]), leaf_layout.regions
        ):
            rows = banks[group_key(region.block_shape)][region.offset : region.offset + region.num_blocks]
            arrays[idx] = _region_array(rows, region)

        out.append(_assemble(arrays, leaf_layout.parts, 0, ()).reshape(leaf_layout.shape))
    return out


@dataclasses.dataclass(frozen=True)
class Assignment:
    """Which bank rows each worker computes, per block shape.

    ``tables[key]`` is ``[n, c_g]`` (row indices, padded), ``positions[key]`` is ``[N_g]``: where each
    row's result sits in the flattened ``[n * c_g]`` all-gather output.
    """

    tables: dict[str, np.ndarray]
    positions: dict[str, np.ndarray]
    loads: np.ndarray  # per-worker cost (sum of s_i^3 over owned blocks)


def assign_blocks(layout: Layout, n: int) -> Assignment:
    """Balances blocks over ``n`` workers by cost ``sum_i s_i^3`` (LPT, per block shape)."""
    loads = np.zeros(n, np.float64)
    tables, positions = {}, {}
    order = sorted(range(len(layout.groups)), key=lambda g: -sum(s**3 for s in layout.groups[g]))
    for g in order:
        shape, size = layout.groups[g], layout.group_sizes[g]
        cost = float(sum(s**3 for s in shape))
        slots = -(-size // n)
        q, r = divmod(size, n)
        # The r least-loaded workers take one block more (stable tie-break by worker index).
        ranked = sorted(range(n), key=lambda w: (loads[w], w))
        owned: list[list[int]] = [[] for _ in range(n)]
        row = 0
        for rank, w in enumerate(ranked):
            take = q + (1 if rank < r else 0)
            owned[w] = list(range(row, row + take))
            row += take
            loads[w] += take * cost
        table = np.zeros((n, slots), np.int32)
        position = np.zeros(size, np.int32)
        for w in range(n):
            pads = [i for i in range(size) if i not in set(owned[w])][: slots - len(owned[w])]
            table[w] = owned[w] + pads
            for j, i in enumerate(owned[w]):
                position[i] = w * slots + j
        key = group_key(shape)
        tables[key], positions[key] = table, position
    return Assignment(tables, positions, loads)
