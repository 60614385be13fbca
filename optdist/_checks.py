"""Input checks shared by every transform: clear errors, named parameters."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


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


def check_floating(updates: Any, who: str) -> None:
    for leaf in jax.tree_util.tree_leaves(updates):
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
            raise TypeError(
                f"{who} needs floating-point gradients; got a leaf of dtype "
                f"{jnp.result_type(leaf)}. Cast integer leaves out of the optimized tree."
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
