"""Input checks shared by every transform: clear errors, named parameters."""

from __future__ import annotations

import math
import operator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


def check_same_structure(updates: Any, other: Any, other_name: str) -> None:
    """Raises a ValueError naming both trees when their structures differ."""
    if other is None:
        return
    s_updates = jax.tree_util.tree_structure(updates)
    s_other = jax.tree_util.tree_structure(other)
    if s_updates != s_other:
        raise ValueError(
            f"The gradient tree does not match {other_name}: gradients have structure "
            f"{s_updates}, {other_name} has {s_other}. Pass gradients of the same "
            "parameters the optimizer state was initialised with."
        )
    for g, p in zip(jax.tree_util.tree_leaves(updates), jax.tree_util.tree_leaves(other)):
        if jnp.shape(g) != jnp.shape(p):
            raise ValueError(
                f"A gradient leaf of shape {jnp.shape(g)} meets a {other_name} leaf of shape "
                f"{jnp.shape(p)}; gradients must have the shapes of the parameters."
            )


def check_floating(updates: Any, who: str, what: str = "gradients") -> None:
    """A TypeError naming the first non-floating leaf (its path and dtype) and the fix."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(updates)[0]:
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
            where = jax.tree_util.keystr(path) or "the root"
            raise TypeError(
                f"{who} needs floating-point {what}; the leaf at {where} has dtype "
                f"{jnp.result_type(leaf)}. Cast integer leaves out of the optimized tree (e.g. keep "
                "step counters in a separate collection, or use optax.masked / optax.partition)."
            )


def positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1; got {value!r}.")
    return value


def in_range(value: Any, name: str, low: float, high: float, *, low_open=False, high_open=False) -> float:
    if isinstance(value, jax.core.Tracer):
        # A hyperparameter injected by optax.inject_hyperparams is traced inside ``update``; it was
        # checked when concrete (at ``init``), so it passes through here.
        return value
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number; got {value!r}.") from None
    lo_ok = v > low if low_open else v >= low
    hi_ok = v < high if high_open else v <= high
    if not (lo_ok and hi_ok):
        lb = "(" if low_open else "["
        rb = ")" if high_open else "]"
        raise ValueError(f"{name} must be in {lb}{low}, {high}{rb}; got {value!r}.")
    return v


class LeafSelection(NamedTuple):
    """Some leaves of trees of one structure, by position: :meth:`pick` them out as a list, :meth:`put`
    a list back in their place."""

    treedef: Any
    indices: tuple[int, ...]

    def pick(self, tree: Any) -> list:
        leaves = self.treedef.flatten_up_to(tree)
        return [leaves[i] for i in self.indices]

    def put(self, tree: Any, values: list) -> Any:
        leaves = list(self.treedef.flatten_up_to(tree))
        for i, value in zip(self.indices, values):
            leaves[i] = value
        return self.treedef.unflatten(leaves)


def nonempty_leaves(tree: Any) -> LeafSelection:
    """The leaves of ``tree`` with at least one element (a transform passes the others through)."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return LeafSelection(treedef, tuple(i for i, leaf in enumerate(leaves) if math.prod(jnp.shape(leaf))))


def worker_index_in_range(worker: Any, num_workers: int, name: str = "worker") -> int:
    """``worker`` as an index into ``num_workers`` workers, negative ones counted from the end (as
    Python sequences do); an IndexError naming the valid range otherwise (JAX would clamp it)."""
    try:
        if isinstance(worker, (bool, np.bool_)):
            raise TypeError
        worker = operator.index(worker)
    except TypeError:
        raise TypeError(
            f"{name} must be an integer worker index; got {worker!r} ({type(worker).__name__})."
        ) from None
    if not -num_workers <= worker < num_workers:
        raise IndexError(
            f"{name}={worker} is out of range for {num_workers} workers: pass an index in "
            f"[0, {num_workers - 1}] (or [-{num_workers}, -1] counting from the end)."
        )
    return worker % num_workers
