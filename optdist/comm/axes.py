"""Worker axes: names, sizes, indices, and trace-time aliases.

A *worker* is one data-parallel replica. Transforms that communicate take an
``axis_name``: a mesh/vmap/pmap axis name, a tuple of them (the workers are
the product of those axes, row-major), or ``None`` for a single worker that
never communicates.

Aliases let one logical name stand for several physical axes. The execution
helper :func:`optdist.data_parallel` uses this to run ``k`` simulated workers
per device: the step's collectives over ``"data"`` are resolved, while the
step is being traced, to ``("data", "data_sim")`` (the shard_map axis and an
inner vmap axis), so the same step function runs unchanged in every mode.

Simulated axes: :func:`optdist.simulate` and :func:`optdist.data_parallel` also record, while
tracing, which worker axes are ``vmap`` axes (:func:`simulated_axes`). A reduction over those
is free (no device talks to another), which lets :func:`optdist.comm.branching.worker_cond`
keep a step-count gate a real branch under ``vmap`` instead of a select of both branches.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping

import jax
import jax.numpy as jnp
from jax import lax

AxisName = str | tuple[str, ...] | None

_local = threading.local()


class UnboundAxisError(NameError):
    """Raised when a transform's ``axis_name`` is not bound by any mapping."""


def _simulated_stack() -> list[tuple[str, ...]]:
    if not hasattr(_local, "simulated"):
        _local.simulated = []
    return _local.simulated


@contextlib.contextmanager
def simulated_axes(names: tuple[str, ...]) -> Iterator[None]:
    """While tracing inside this context, ``names`` are ``vmap`` axes of simulated workers."""
    _simulated_stack().append(tuple(names))
    try:
        yield
    finally:
        _simulated_stack().pop()


def current_simulated_axes() -> tuple[str, ...]:
    """Every simulated (``vmap``) worker axis bound around the code being traced, outermost first."""
    return tuple(name for names in _simulated_stack() for name in names)


def _alias_stack() -> list[Mapping[str, tuple[str, ...]]]:
    if not hasattr(_local, "stack"):
        _local.stack = []
    return _local.stack


@contextlib.contextmanager
def axis_aliases(aliases: Mapping[str, tuple[str, ...]]) -> Iterator[None]:
    """While tracing inside this context, ``name`` means ``aliases[name]``."""
    _alias_stack().append(dict(aliases))
    try:
        yield
    finally:
        _alias_stack().pop()


def validate_axis_name(axis_name: AxisName, what: str = "axis_name") -> AxisName:
    """Checks the *form* of an axis name at construction time."""
    if axis_name is None or isinstance(axis_name, str):
        if axis_name == "":
            raise ValueError(f"{what} must be a non-empty string, a tuple of strings or None; got ''.")
        return axis_name
    if (
        isinstance(axis_name, (tuple, list))
        and axis_name
        and all(isinstance(a, str) and a for a in axis_name)
    ):
        if len(set(axis_name)) != len(axis_name):
            raise ValueError(f"{what} names an axis twice: {tuple(axis_name)!r}.")
        return tuple(axis_name)
    raise TypeError(
        f"{what} must be a string, a non-empty tuple of strings, or None for a single "
        f"worker; got {axis_name!r}."
    )


def physical_axes(axis_name: AxisName) -> tuple[str, ...]:
    """The physical axis names behind ``axis_name`` (after aliases), row-major."""
    if axis_name is None:
        return ()
    names = (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)
    out: list[str] = []
    for name in names:
        for aliases in reversed(_alias_stack()):
            if name in aliases:
                out.extend(aliases[name])
                break
        else:
            out.append(name)
    return tuple(out)


def _unbound(axis_name: AxisName, err: Exception) -> UnboundAxisError:
    return UnboundAxisError(
        f"axis_name={axis_name!r} is not bound here ({err}). Call the step inside "
        "optdist.simulate(...), optdist.data_parallel(...), jax.pmap(..., axis_name=...) "
        "or jax.vmap(..., axis_name=...) with that name, or pass axis_name=None for a "
        "single worker that does not communicate."
    )


def num_workers(axis_name: AxisName) -> int:
    """Number of workers along ``axis_name`` (a static Python int; 1 for None)."""
    axes = physical_axes(axis_name)
    if not axes:
        return 1
    try:
        return int(lax.axis_size(axes))
    except NameError as err:
        raise _unbound(axis_name, err) from None


def worker_index(axis_name: AxisName) -> jax.Array:
    """This worker's index in ``[0, num_workers)`` (row-major over tuple axes)."""
    axes = physical_axes(axis_name)
    if not axes:
        return jnp.zeros((), jnp.int32)
    try:
        return lax.axis_index(axes)
    except NameError as err:
        raise _unbound(axis_name, err) from None
