"""Collectives over one worker axis that count the bytes they send, by construction.

Every communicating transform talks through a :class:`Channel` built on the byte counter in its
state, ``Channel(axis_name, state.bytes_sent)``, and stores ``channel.counter`` back when it is done.
Each collective adds its bytes to the counter as it is issued, so no method adds bytes by hand. The
byte figure is a static Python int computed from the real payload shapes and dtypes during tracing:
it costs one 64-bit add per step at run time and cannot drift from the payload.

Branches: :meth:`Channel.cond` and :meth:`Channel.switch` run a branch on a sub-channel threaded
through the branch, so a collective inside a branch is counted only when that branch runs (on a
sync step of an outer loop, a Shampoo refresh step...). Underneath they are
:func:`~optdist.comm.branching.worker_cond` / :func:`~optdist.comm.branching.worker_switch`, real
branches under simulated workers too.

Cost model (:mod:`optdist.comm.accounting`): each array of a collective is counted on its own with
the ring formulas, as it appears in the compiled program (``tests/comm/test_byte_audit.py`` checks
the counter against the collectives in the compiled HLO).

With ``axis_name=None`` (one worker) every collective is the identity and sends nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from optdist.comm import accounting
from optdist.comm.axes import (
    AxisName,
    _unbound,
    current_simulated_axes,
    num_workers,
    physical_axes,
    worker_index,
)
from optdist.comm.branching import worker_switch
from optdist.comm.packing import ordered_sum, packed


def _gather_row_major(tree: Any, axes: tuple[str, ...]) -> Any:
    """``all_gather`` over several axes, row-major (worker index = ``axis_index(axes)``).

    One axis at a time, innermost first: jax 0.10.2 rejects a single
    all_gather over a shard_map axis together with a vmap axis.
    """

    def gather(x):
        for axis in reversed(axes):
            x = lax.all_gather(x, axis)
        return x.reshape(-1, *x.shape[len(axes) :]) if len(axes) > 1 else x

    return jax.tree_util.tree_map(gather, tree)


# Below this many elements per worker XLA:CPU's reduction over the stacked axis is as fast (measured
# on 8 x n float32: 18 vs 29 us at n = 16k; 1.8 ms vs 0.11 ms at n = 64k). CPU only: GPU reductions
# are fast, and there the gathered copy would only cost memory.
_ORDERED_SUM_MIN_SIZE = 32768


def _reduce(tree: Any, axes: tuple[str, ...], combine: Any, collective: Any) -> Any:
    """An all-reduce (``combine`` = add or max) over ``axes``, fast and replica-exact on simulated axes.

    jax lowers ``psum`` over a ``vmap`` axis to a reduction over the stacked axis, which XLA:CPU
    runs an order of magnitude slower than adding the ``n`` slices once a leaf is large (10 ms vs
    0.2 ms for 8 x 525k float32). For such leaves the workers' values are gathered over the simulated
    axes (free: no device talks to another) and combined one slice at a time in worker order (every
    worker gets bit-identical results, as with the reduction); small leaves, and other backends (whose
    reductions are fast), keep ``collective``.
    ``collective`` (``lax.psum``/``lax.pmax``) then spans the device axes, if any.
    """
    simulated = set(current_simulated_axes())
    sim_axes = tuple(a for a in axes if a in simulated)
    device_axes = tuple(a for a in axes if a not in simulated)

    def one(x):
        if sim_axes and x.size >= _ORDERED_SUM_MIN_SIZE and jax.default_backend() == "cpu":
            x = ordered_sum(_gather_row_major(x, sim_axes), combine)  # [workers on this device, ...]
        elif sim_axes:
            x = collective(x, sim_axes)
        return collective(x, device_axes) if device_axes else x

    return jax.tree_util.tree_map(one, tree)


def _permute(tree: Any, axes: tuple[str, ...], perm: list[tuple[int, int]]) -> Any:
    """``lax.ppermute`` over one or several axes, row-major, including simulated (``vmap``) axes.

    jax's ``vmap`` rule for ``ppermute`` handles one axis only. Over several axes, the simulated
    ones (which must come last, as :func:`optdist.data_parallel` orders them) are gathered (free:
    no device talks to another), each distinct device offset of ``perm`` moves that block once
    over the device axes, and each worker picks its source out of what arrived.
    """
    simulated = set(current_simulated_axes())
    sim_axes = tuple(a for a in axes if a in simulated)
    if len(axes) == 1 or not sim_axes:
        return lax.ppermute(tree, axes if len(axes) > 1 else axes[0], perm)
    device_axes = axes[: len(axes) - len(sim_axes)]
    if axes[len(device_axes) :] != sim_axes:
        raise ValueError(f"ppermute over {axes}: the simulated axes {sim_axes} must come last.")
    n = len(perm)
    block = int(lax.axis_size(sim_axes))
    devices = n // block
    source = np.empty(n, np.int64)
    for s, d in perm:
        source[d] = s
    offsets = sorted({(d // block - s // block) % devices for s, d in perm})
    offset_of = np.array([offsets.index((d // block - source[d] // block) % devices) for d in range(n)])
    me = lax.axis_index(axes)
    pick_offset = jnp.asarray(offset_of, jnp.int32)[me]
    pick_source = jnp.asarray(source % block, jnp.int32)[me]

    def one(x):
        stacked = _gather_row_major(x, sim_axes)  # [block, ...]: every simulated worker on this device
        moved = [
            stacked
            if o == 0
            else lax.ppermute(stacked, device_axes, [(d, (d + o) % devices) for d in range(devices)])
            for o in offsets
        ]
        return jnp.stack(moved)[pick_offset, pick_source]

    return jax.tree_util.tree_map(one, tree)


class Channel:
    """Collectives over ``axis_name`` that add their per-worker bytes to a :class:`ByteCounter`.

    Args:
      axis_name: the worker axis (str or tuple), or None for one worker.
      counter: the :class:`~optdist.comm.accounting.ByteCounter` to add to (usually the one in the
        transform's state); None starts a fresh one.

    Attributes:
      axis_name: the logical axis as the transform was given it.
      size: number of workers ``n`` (static).
      nbytes: bytes issued through this channel object outside branches (static int; a
        branch's bytes live in the counter only, since they depend on which branch ran).
      num_collectives: collective calls issued outside branches (for HLO checks).
    """

    def __init__(self, axis_name: AxisName, counter: accounting.ByteCounter | None = None):
        self.axis_name = axis_name
        self._axes = physical_axes(axis_name)
        self.size = num_workers(axis_name)
        self._counter = accounting.ByteCounter.zeros(axis_name) if counter is None else counter
        self._pending = 0
        self.nbytes = 0
        self.num_collectives = 0

    @property
    def counter(self) -> accounting.ByteCounter:
        """The byte counter with every collective issued so far added."""
        if self._pending:
            self._counter = self._counter.add(self._pending)
            self._pending = 0
        return self._counter

    @property
    def simulated(self) -> bool:
        """Whether, in the trace under way, every axis of this channel is simulated (``vmap``): nothing
        crosses a wire, and an all-gather returns the workers' batched values themselves (one copy
        for all of them)."""
        simulated = set(current_simulated_axes())
        return bool(self._axes) and all(a in simulated for a in self._axes)

    @property
    def index(self) -> jax.Array:
        """This worker's index along the axis."""
        return worker_index(self.axis_name)

    def _issue(self, fn, tree, nbytes: int):
        if not self._axes:
            return tree
        self._pending += nbytes
        self.nbytes += nbytes
        self.num_collectives += 1
        try:
            return fn(tree, self._axes)
        except NameError as err:
            raise _unbound(self.axis_name, err) from None

    def psum(self, tree: Any) -> Any:
        """Sum over workers (ring all-reduce; small leaves packed per dtype, see :meth:`_all_reduce`)."""
        return self._all_reduce(tree, jnp.add, lax.psum)

    def pmean(self, tree: Any) -> Any:
        """Mean over workers (ring all-reduce)."""
        total = self.psum(tree)
        return jax.tree_util.tree_map(lambda x: x / jnp.asarray(self.size, x.dtype), total)

    def pmax(self, tree: Any) -> Any:
        """Element-wise max over workers (ring all-reduce)."""
        return self._all_reduce(tree, jnp.maximum, lax.pmax)

    def _all_reduce(self, tree: Any, combine: Any, collective: Any) -> Any:
        """One all-reduce of ``tree``: small leaves (:func:`~optdist.comm.accounting.is_packed`) travel
        packed in one buffer per dtype (a scalar alone would cost a whole ring pass), larger ones as
        they are. Bytes are counted on the arrays actually sent."""
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        fn = lambda t, axes: _reduce(t, axes, combine, collective)  # noqa: E731
        if self.simulated:
            # Simulated workers only: nothing crosses a wire, so packing the small leaves would be
            # pure memory traffic (a concatenate and the slices back); they are reduced one by one and
            # counted as the packed all-reduce a network would carry (the same bytes in every mode).
            out = self._issue(fn, leaves, accounting.all_reduce_bytes(leaves, self.size))
            return jax.tree_util.tree_unflatten(treedef, list(out))
        flags = accounting.is_packed(leaves)
        small = [i for i, f in enumerate(flags) if f]
        large = [i for i, f in enumerate(flags) if not f]

        def reduce(arrays):
            return self._issue(fn, arrays, accounting.all_reduce_bytes(arrays, self.size))

        out = list(leaves)
        for i, x in zip(large, reduce([leaves[i] for i in large]) if large else []):
            out[i] = x
        if small:
            for i, x in zip(small, packed(reduce, [leaves[i] for i in small])):
                out[i] = x
        return jax.tree_util.tree_unflatten(treedef, out)

    def all_gather(self, tree: Any) -> Any:
        """Every worker's ``tree``, stacked on a new leading axis of size ``n``."""
        if not self._axes:
            return jax.tree_util.tree_map(lambda x: x[None], tree)
        return self._issue(_gather_row_major, tree, accounting.all_gather_bytes(tree, self.size))

    def all_to_all(self, tree: Any) -> Any:
        """Row ``j`` of every leaf to worker ``j``: leaves are ``[n, ...]`` (one row per destination)
        and come back ``[n, ...]`` with row ``i`` from worker ``i`` (``lax.all_to_all``). A worker
        sends the ``n - 1`` rows that are not its own.

        One worker axis only (a tuple of several axes raises: run one worker per device or simulate).
        """
        if not self._axes:
            return tree
        for x in jax.tree_util.tree_leaves(tree):
            if not x.shape or x.shape[0] != self.size:
                raise ValueError(
                    f"all_to_all needs leaves with a leading axis of size n = {self.size} (one row per "
                    f"destination); got shape {tuple(x.shape)}."
                )
        if len(self._axes) > 1:
            raise ValueError(
                f"all_to_all over several axes {self._axes} is not supported; use one worker axis "
                "(one worker per device, or simulated workers only)."
            )
        rows = sum(accounting.payload_bytes(x) // self.size for x in jax.tree_util.tree_leaves(tree))

        def exchange(t, axes):
            return jax.tree_util.tree_map(lambda x: lax.all_to_all(x, axes[0], 0, 0), t)

        return self._issue(exchange, tree, (self.size - 1) * rows)

    def ppermute(self, tree: Any, perm: Sequence[tuple[int, int]]) -> Any:
        """Sends ``tree`` along ``perm`` (pairs ``(source, destination)``).

        ``perm`` must be a full permutation (every worker sends once), so each
        worker's byte count is the payload size.
        """
        perm = [(int(s), int(d)) for s, d in perm]
        sources = sorted(s for s, _ in perm)
        dests = sorted(d for _, d in perm)
        if sources != list(range(self.size)) or dests != list(range(self.size)):
            raise ValueError(
                f"perm must send from and to every one of the {self.size} workers exactly once; got {perm}."
            )
        return self._issue(lambda t, axes: _permute(t, axes, perm), tree, accounting.payload_bytes(tree))

    def switch(self, index: Any, branches: Sequence[Callable[..., Any]], *operands: Any) -> Any:
        """``branches[index](channel, *operands)``, counting only the bytes of the branch that runs.

        Each branch gets a sub-channel on this channel's counter as its first argument; the
        counter leaves the branch as an output, so a worker's count is that of its own branch
        (:func:`~optdist.comm.branching.worker_switch`: a real branch under simulated workers).
        """

        def counted(branch):
            def run(counter, *ops):
                sub = Channel(self.axis_name, counter)
                out = branch(sub, *ops)
                return out, sub.counter

            return run

        out, self._counter = worker_switch(index, [counted(b) for b in branches], self.counter, *operands)
        return out

    def cond(
        self, pred: Any, true_fn: Callable[..., Any], false_fn: Callable[..., Any], *operands: Any
    ) -> Any:
        """``true_fn(channel, *operands)`` where ``pred`` holds, else ``false_fn(channel, *operands)``;
        bytes counted only for the branch that runs (see :meth:`switch`)."""
        return self.switch(jnp.asarray(pred, bool).astype(jnp.int32), (false_fn, true_fn), *operands)
