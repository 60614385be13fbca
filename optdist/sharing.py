"""Simulated workers near free: hold what every worker shares once, not ``W`` times.

Under :func:`optdist.simulate` every argument carries the worker axis, so ``W`` simulated workers
run ``W`` copies of every optimizer update even where the copies are equal by construction (the
parameters and Adam moments after an exact mean). Here a leaf is held **once** whenever the step
provably produces the same value on every worker, and stacked ``[W, ...]`` only where it may differ
(error-feedback residuals, the local parameters of an outer loop between syncs, gossip):

1. :func:`shared_layout` traces the step under ``vmap`` and reads, from the jaxpr, which outputs
   are a broadcast of one value along the worker axis (``vmap`` writes an output that does not
   depend on the worker as ``broadcast_in_dim`` of it — equal on every worker by construction,
   whatever the values). Carried arguments (``carry={output index: argument index}``, e.g. the
   parameters and optimizer state of a train step) start shared and become per worker when their
   output is not provably shared; this repeats until nothing changes (at most one round per leaf,
   usually two). Arguments whose workers hold different values at the start stay per worker.
2. :func:`compact` keeps worker 0 of each shared leaf; :func:`expand` broadcasts it back, so a
   compacted run is compared with, checkpointed as, or continued under :func:`optdist.simulate`.
3. ``optdist.simulate(step, axis, in_axes=layout.in_axes, out_axes=layout.out_axes)`` runs it: the
   gradient of every worker is still computed (``vmap`` over the data only, the shared parameters
   broadcast by the batching rules), but everything after a collective that made it identical runs
   once.

Falling back is automatic: a transform whose parameters diverge (``local_sgd`` between syncs,
``gossip``) makes the parameters' output per worker, the fixed point marks them per worker, and the
run is today's stacked run for those leaves.

Results equal the stacked run's up to the association XLA picks for the batched matmuls (the same
products, blocked differently when the weights are not batched); both forms are deterministic.

Example::

  args = (params_w, state_w, batches)            # stacked as for optdist.simulate
  layout = optdist.sharing.shared_layout(train_step, *args, axis_name="data", carry={0: 0, 1: 1})
  run = optdist.simulate(train_step, "data", in_axes=layout.in_axes, out_axes=layout.out_axes)
  params, state = optdist.sharing.compact((params_w, state_w), layout.in_axes[:2])
  params, state = run(params, state, batches)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np

from optdist.comm.axes import AxisName, simulated_axes, validate_axis_name
from optdist.execution import leaf_axes


class Layout(NamedTuple):
    """Which leaves carry the worker axis (0) and which are held once (None).

    Attributes:
      in_axes: one tree of 0 / None per positional argument (a ``vmap`` ``in_axes``).
      out_axes: the same for the step's outputs (a ``vmap`` ``out_axes``).
    """

    in_axes: tuple[Any, ...]
    out_axes: Any


def _axes_like(tree: Any, axes: Sequence[int | None]) -> Any:
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(tree), list(axes))


def compact(tree: Any, axes: Any) -> Any:
    """Keeps worker 0 of every leaf whose axis is None; leaves with axis 0 stay stacked."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return treedef.unflatten([x if ax == 0 else x[0] for x, ax in zip(leaves, leaf_axes(axes, tree))])


def expand(tree: Any, axes: Any, num_workers: int) -> Any:
    """Inverse of :func:`compact`: broadcasts every shared leaf to ``[num_workers, ...]``."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return treedef.unflatten(
        [
            x if ax == 0 else jnp.broadcast_to(x, (num_workers, *jnp.shape(x)))
            for x, ax in zip(leaves, leaf_axes(axes, tree))
        ]
    )


def _trace(step, args, in_axes, axis_name: str) -> tuple[Any, list[bool]]:
    """The output shapes of ``vmap(step)`` and, per output leaf, whether it is worker-independent."""
    batched = jax.vmap(step, in_axes=in_axes, out_axes=0, axis_name=axis_name)
    with simulated_axes((axis_name,)):
        closed, out_shape = jax.make_jaxpr(batched, return_shape=True)(*args)
    producers = {v: eqn for eqn in closed.jaxpr.eqns for v in eqn.outvars}

    def shared(var) -> bool:
        eqn = None if isinstance(var, jex.Literal) else producers.get(var)
        # vmap materialises a worker-independent output as broadcast_in_dim along a new dim 0.
        return (
            eqn is not None
            and eqn.primitive.name == "broadcast_in_dim"
            and 0 not in eqn.params["broadcast_dimensions"]
        )

    return out_shape, [shared(v) for v in closed.jaxpr.outvars]


def _equal_across_workers(x: Any) -> bool:
    x = np.asarray(x)
    return bool(np.all(x == x[:1]))


def shared_layout(
    step: Callable[..., Any],
    *args: Any,
    axis_name: AxisName = "data",
    in_axes: Sequence[Any] | int | None = 0,
    carry: Mapping[int, int] | None = None,
) -> Layout:
    """The layout that holds every provably worker-independent leaf once (see the module docstring).

    Args:
      step: one worker's function, as for :func:`optdist.simulate`; with ``carry`` it returns a
        tuple.
      *args: its arguments, stacked as for :func:`optdist.simulate` (``[W, ...]`` where ``in_axes``
        is 0).
      axis_name: the worker axis (one name).
      in_axes: 0 / None per positional argument (or one for all), as for :func:`optdist.simulate`;
        the carried arguments' entries are the starting point (0: may differ).
      carry: ``{output index: argument index}`` for outputs fed back as arguments on the next call
        (a train step's parameters and optimizer state: ``{0: 0, 1: 1}``).

    Returns:
      A :class:`Layout`; pass ``args`` through :func:`compact` with ``layout.in_axes`` before the
      first call.
    """
    axis_name = validate_axis_name(axis_name)
    if not isinstance(axis_name, str):
        raise ValueError(f"shared_layout needs one worker axis name (a str); got axis_name={axis_name!r}.")
    carry = dict(carry or {})
    per_arg = [in_axes] * len(args) if in_axes is None or isinstance(in_axes, int) else list(in_axes)
    if len(per_arg) != len(args):
        raise ValueError(f"in_axes has {len(per_arg)} entries for {len(args)} positional arguments.")
    if sorted(set(carry.values())) != sorted(carry.values()) or not all(
        0 <= a < len(args) for a in carry.values()
    ):
        raise ValueError(
            f"carry must map output indices to distinct argument indices < {len(args)}; got {carry}."
        )
    per_leaf = [leaf_axes(ax, arg) for ax, arg in zip(per_arg, args)]
    for a in carry.values():  # carried leaves start shared where every worker holds the same value
        stacked = zip(jax.tree_util.tree_leaves(args[a]), per_leaf[a])
        per_leaf[a] = [0 if ax == 0 and not _equal_across_workers(x) else None for x, ax in stacked]
    while True:
        layout = tuple(_axes_like(arg, ax) for arg, ax in zip(args, per_leaf))
        out_shape, shared = _trace(step, [compact(a, ax) for a, ax in zip(args, layout)], layout, axis_name)
        changed = False
        outputs = out_shape if isinstance(out_shape, tuple) else (out_shape,)
        offsets = np.cumsum([0] + [len(jax.tree_util.tree_leaves(o)) for o in outputs])
        for out, a in carry.items():
            if out >= len(outputs) or (
                jax.tree_util.tree_structure(outputs[out]) != jax.tree_util.tree_structure(args[a])
            ):
                raise ValueError(f"carry: output {out} does not have the tree structure of argument {a}.")
            flags = shared[offsets[out] : offsets[out + 1]]
            new = [None if ax is None and ok else 0 for ax, ok in zip(per_leaf[a], flags)]
            changed |= new != per_leaf[a]
            per_leaf[a] = new
        if not changed:
            break
    out_axes = _axes_like(out_shape, [None if ok else 0 for ok in shared])
    return Layout(layout, out_axes)
