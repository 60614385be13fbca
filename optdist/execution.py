"""Run one worker's train step on many workers: simulated, shard_map, or pmap.

One representation for every mode: everything per worker (parameters,
optimizer state, batches, keys, outputs) carries a **leading worker axis** of
size ``W``. The step function is written for one worker and communicates only
through optdist transforms (or :class:`optdist.comm.Channel`) on a named axis.

* :func:`simulate` — ``W`` workers on one device with ``jax.vmap(axis_name=...)``.
* :func:`data_parallel` — the same arrays split over a mesh with
  ``jax.shard_map``; ``W`` may be a multiple ``k`` of the devices on the axis,
  then each device runs ``k`` simulated workers and the step's collectives
  span both (``psum`` over ``(mesh_axis, mesh_axis + "_sim")``).
* ``jax.pmap(step, axis_name=...)`` — legacy; works directly when ``W`` equals
  the local device count.

Per-worker gradients: because parameters carry the worker axis they are
*varying* over it, so ``jax.grad`` inside the step returns this worker's own
gradient in every mode (``data_parallel`` uses ``check_vma=False``; a step
that wants replicated parameters under its own ``shard_map`` should
differentiate w.r.t. ``lax.pcast(params, axis, to="varying")``).

State placement: which state is per worker (error-feedback residuals, local
parameters) and which is replicated (warm-started PowerSGD Q, Shampoo
statistics of averaged gradients) is documented by each transform; both are
stored stacked, so :func:`worker_specs` gives ``P(axis)`` for every leaf and
:func:`is_replicated` checks which leaves agree across workers.

Example (one train step, three ways)::

  def train_step(params, opt_state, batch):           # one worker's view
      grads = jax.grad(loss_fn)(params, batch)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

  params_w, state_w = optdist.replicate((params, tx.init(params)), 8)
  batches = optdist.shard_batch(global_batch, 8)      # [8, b, ...]
  out = optdist.simulate(train_step, "data")(params_w, state_w, batches)
  mesh = jax.make_mesh((8,), ("data",))
  out = optdist.data_parallel(train_step, mesh, "data")(params_w, state_w, batches)
  out = jax.pmap(train_step, axis_name="data")(params_w, state_w, batches)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from optdist import _checks
from optdist.comm.axes import AxisName, axis_aliases, simulated_axes, validate_axis_name

InAxes = int | None | Sequence[int | None]


def replicate(tree: Any, num_workers: int) -> Any:
    """Stacks ``num_workers`` copies of every leaf on a new leading worker axis."""
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
        raise ValueError(f"num_workers must be an integer >= 1; got {num_workers!r}.")
    return jax.tree_util.tree_map(
        lambda x: jnp.broadcast_to(jnp.asarray(x)[None], (num_workers, *jnp.shape(x))), tree
    )


def unreplicate(tree: Any, worker: int = 0) -> Any:
    """One worker's slice of a stacked tree (gathered onto one device if sharded).

    ``worker`` is an index into the leading worker axis of size ``W``: ``0 <= worker < W``, or
    ``-W <= worker < 0`` counting from the end. Anything else raises (an IndexError naming the valid
    range, a TypeError for a non-integer) where JAX indexing would silently clamp.
    """
    if isinstance(worker, bool) or not hasattr(worker, "__index__"):
        _checks.worker_index_in_range(worker, 1)  # raises the TypeError

    def take(x):
        if jnp.ndim(x) == 0:
            raise ValueError(
                "unreplicate needs a stacked tree (every leaf with a leading worker axis, as built by "
                "optdist.replicate or returned by simulate / data_parallel); got a leaf of shape "
                f"{jnp.shape(x)}."
            )
        w = _checks.worker_index_in_range(worker, jnp.shape(x)[0])
        if isinstance(x, jax.Array) and len(x.sharding.device_set) > 1:
            return jnp.asarray(np.asarray(x)[w])
        return x[w]

    return jax.tree_util.tree_map(take, tree)


def shard_batch(batch: Any, num_workers: int) -> Any:
    """Splits a global batch ``[B, ...]`` into per-worker batches ``[W, B/W, ...]``."""
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
        raise ValueError(f"num_workers must be an integer >= 1; got {num_workers!r}.")

    def split(x):
        b = jnp.shape(x)[0] if jnp.ndim(x) else None
        if b is None or b % num_workers:
            raise ValueError(
                f"A batch leaf of shape {jnp.shape(x)} cannot be split over num_workers="
                f"{num_workers}: the leading (batch) dimension must be a multiple of the "
                "worker count. Change the global batch size or the number of workers."
            )
        return jnp.reshape(x, (num_workers, b // num_workers, *jnp.shape(x)[1:]))

    return jax.tree_util.tree_map(split, batch)


def worker_specs(tree: Any, axis_name: AxisName = "data") -> Any:
    """PartitionSpecs for a stacked tree: the worker axis split over ``axis_name``."""
    names = _names(axis_name)
    spec = P(names[0] if len(names) == 1 else names)
    return jax.tree_util.tree_map(lambda _: spec, tree)


def is_replicated(tree: Any) -> Any:
    """For a stacked tree: per leaf, whether every worker holds the same value."""
    return jax.tree_util.tree_map(lambda x: bool(np.all(np.asarray(x) == np.asarray(x)[:1])), tree)


def _names(axis_name: AxisName) -> tuple[str, ...]:
    axis_name = validate_axis_name(axis_name)
    if axis_name is None:
        raise ValueError("axis_name must name the worker axis for a multi-worker run; got None.")
    return (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)


def _per_arg(in_axes: InAxes, num_args: int) -> tuple[Any, ...]:
    axes = (in_axes,) * num_args if in_axes is None or isinstance(in_axes, int) else tuple(in_axes)
    flat = jax.tree_util.tree_leaves(axes, is_leaf=lambda x: x is None)
    if len(axes) != num_args or any(a not in (0, None) for a in flat):
        raise ValueError(
            f"in_axes must be 0, None, or one 0/None (or a tree of them, as for jax.vmap) per "
            f"positional argument ({num_args}); got {in_axes!r}."
        )
    return axes


def _flat_per_arg(in_axes: InAxes, num_args: int) -> tuple[int | None, ...]:
    axes = _per_arg(in_axes, num_args)
    if any(ax not in (0, None) for ax in axes):
        raise ValueError(
            f"data_parallel takes one 0/None per positional argument, not trees; got {in_axes!r}."
        )
    return axes


def leaf_axes(prefix: Any, tree: Any) -> list[int | None]:
    """The 0 / None of every leaf of ``tree`` under a ``vmap``-style ``in_axes`` prefix."""
    if prefix is None or isinstance(prefix, int):
        return [prefix] * len(jax.tree_util.tree_leaves(tree))
    axes, treedef = jax.tree_util.tree_flatten(prefix, is_leaf=lambda x: x is None)
    return [ax for a, sub in zip(axes, treedef.flatten_up_to(tree)) for ax in leaf_axes(a, sub)]


def _map_stacked(fn: Callable[[Any], Any], tree: Any, axes: Any) -> Any:
    """Applies ``fn`` to the leaves of ``tree`` whose axis is 0."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return treedef.unflatten([fn(x) if ax == 0 else x for x, ax in zip(leaves, leaf_axes(axes, tree))])


def _index0(tree: Any) -> Any:
    return jax.tree_util.tree_map(lambda x: x[0], tree)


def _num_workers(args: Sequence[Any], axes: Sequence[Any]) -> int:
    sizes = {
        jnp.shape(leaf)[0] if jnp.ndim(leaf) else None
        for arg, ax in zip(args, axes)
        for leaf, leaf_ax in zip(jax.tree_util.tree_leaves(arg), leaf_axes(ax, arg))
        if leaf_ax == 0
    }
    if not sizes:
        raise ValueError("No argument carries the worker axis: pass at least one with in_axes=0.")
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            "Every per-worker leaf must carry the same leading worker axis; found leading "
            f"sizes {sorted(s for s in sizes if s is not None)}"
            + (" and scalar leaves" if None in sizes else "")
            + ". Build them with optdist.replicate / optdist.shard_batch."
        )
    return sizes.pop()


def simulate(
    step: Callable[..., Any],
    axis_name: AxisName = "data",
    *,
    axis_sizes: Sequence[int] | None = None,
    in_axes: InAxes = 0,
    out_axes: Any = 0,
    jit: bool = True,
) -> Callable[..., Any]:
    """Runs ``step`` for ``W`` simulated workers on one device (``vmap`` with an axis name).

    Args:
      step: one worker's function; its collectives use ``axis_name``.
      axis_name: the worker axis, or a tuple of axes for a hierarchical layout
        (e.g. ``("dcn", "ici")``), in which case ``axis_sizes`` gives their
        sizes (row-major, product ``W``) and nested vmaps bind each name.
      axis_sizes: sizes of the axes when ``axis_name`` is a tuple.
      in_axes: 0 (argument carries the worker axis) or None (shared by all
        workers), for all arguments or one per positional argument (or a tree of
        them per argument, as for ``jax.vmap``).
      out_axes: 0 (outputs stacked ``[W, ...]``) or None (held once: ``vmap``
        raises if that output differs across workers), or a tree of them as for
        ``jax.vmap``; :func:`optdist.sharing.shared_layout` computes both trees
        so that every worker-independent leaf is held once.
      jit: wrap the result in ``jax.jit``.

    Returns:
      A function of the stacked arguments returning the outputs, stacked ``[W, ...]``
      where ``out_axes`` is 0.
    """
    names = _names(axis_name)
    if len(names) > 1:
        if axis_sizes is None or len(axis_sizes) != len(names):
            raise ValueError(
                f"axis_name={names!r} names {len(names)} axes: pass axis_sizes with one size "
                f"per axis (their product is the worker count); got axis_sizes={axis_sizes!r}."
            )
        axis_sizes = tuple(int(s) for s in axis_sizes)

    def run(*args):
        axes = _per_arg(in_axes, len(args))
        workers = _num_workers(args, axes)
        sizes = axis_sizes if len(names) > 1 else (workers,)
        if math.prod(sizes) != workers:
            raise ValueError(
                f"axis_sizes={sizes} multiply to {math.prod(sizes)}, but the arguments carry "
                f"{workers} workers."
            )
        split = [_map_stacked(lambda x: x.reshape(*sizes, *x.shape[1:]), a, ax) for a, ax in zip(args, axes)]
        fn = step
        for name in reversed(names):
            fn = jax.vmap(fn, in_axes=axes, out_axes=out_axes, axis_name=name)
        with simulated_axes(names):
            out = fn(*split)
        return _map_stacked(lambda x: x.reshape(workers, *x.shape[len(sizes) :]), out, out_axes)

    return jax.jit(run) if jit else run


def data_parallel(
    step: Callable[..., Any],
    mesh: Mesh,
    axis_name: AxisName = "data",
    *,
    in_axes: InAxes = 0,
) -> Callable[..., Any]:
    r"""Runs ``step`` for ``W`` workers split over ``mesh`` with ``jax.shard_map``.

    The leading worker axis is sharded over the mesh axes named by
    ``axis_name`` (a tuple shards it over several, row-major). If ``W`` is
    ``k`` times the number of devices on those axes, each device runs ``k``
    simulated workers; collectives over the (last) named axis then span the
    devices and the simulated workers, so every worker sees the same workers,
    indices and keys as under :func:`simulate`, and the same byte counts.

    Results equal :func:`simulate`'s up to the rounding of all-reduces, not bit for bit:
    the same sum is formed in a different order. Under :func:`simulate` ``psum`` over the
    ``vmap`` axis is one XLA reduction whose association XLA:CPU picks per shape (worker
    order for small leaves, blocked for larger ones; on CPU, worker order for leaves of
    32768+ elements, see :mod:`optdist.comm.channel`); here each device first sums its ``k``
    workers, then the all-reduce combines the devices' partial sums (in device order on
    XLA:CPU; in the order of the backend's all-reduce algorithm elsewhere). Each order is within
    :math:`\gamma_{n-1} \sum_i |x_i|` (:math:`\gamma_m = m u / (1 - m u)`, ``u`` the unit
    roundoff, :math:`2^{-24}` for float32) of the exact sum, so one all-reduce of ``n``
    workers differs between the modes by at most :math:`2 \gamma_{n-1} \sum_i |x_i|` per
    element (tested). Training then carries that perturbation like any rounding
    difference: :math:`10^{-7}` after 12 Adam steps on the tests' least squares, up to
    :math:`5 \cdot 10^{-5}` reported on other models (Adam normalizes coordinates whose mean
    gradient is at rounding level), and a stochastic compressor can flip a random
    rounding decision, after which the two runs agree only in distribution. Compare
    modes with a tolerance, or use one mode for bit-exact reruns (each mode is
    deterministic).

    Inputs are placed with ``NamedSharding(mesh, P(axis_name))`` before the
    call, as an Explicit-axes mesh requires; outputs keep that sharding.

    Args:
      step: one worker's function; its collectives use ``axis_name``.
      mesh: a ``jax.sharding.Mesh`` holding every name in ``axis_name``.
      axis_name: mesh axis (or tuple of mesh axes) the workers live on.
      in_axes: 0 (argument carries the worker axis) or None (replicated), for
        all arguments or one per positional argument.

    Returns:
      A jitted function of the stacked arguments returning stacked outputs.
    """
    names = _names(axis_name)
    missing = [n for n in names if n not in mesh.axis_names]
    if missing:
        raise ValueError(f"axis_name={axis_name!r}: {missing} not among the mesh's axes {mesh.axis_names}.")
    devices = math.prod(mesh.shape[n] for n in names)
    worker_spec = P(names[0] if len(names) == 1 else names)
    inner = names[-1]
    sim = f"{inner}_sim"

    def run(*args):
        axes = _flat_per_arg(in_axes, len(args))
        workers = _num_workers(args, axes)
        per_device = workers // devices
        specs = tuple(worker_spec if ax == 0 else P() for ax in axes)

        def body(*local):
            if per_device == 1:  # no vmap: a gate inside the step stays a branch (see worker_cond)
                mine = [_index0(a) if ax == 0 else a for a, ax in zip(local, axes)]
                return jax.tree_util.tree_map(lambda x: x[None], step(*mine))
            with axis_aliases({inner: (inner, sim)}), simulated_axes((sim,)):
                return jax.vmap(step, in_axes=axes, axis_name=sim)(*local)

        mapped = jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=worker_spec, check_vma=False)
        return mapped(*args)

    jitted = jax.jit(run)

    def call(*args):
        axes = _flat_per_arg(in_axes, len(args))
        workers = _num_workers(args, axes)
        if workers % devices:
            raise ValueError(
                f"{workers} workers cannot be split over the {devices} devices of mesh axes "
                f"{names}: the worker count must be a multiple of the device count."
            )
        placed = tuple(
            jax.device_put(a, NamedSharding(mesh, worker_spec if ax == 0 else P()))
            for a, ax in zip(args, axes)
        )
        return jitted(*placed)

    return call
