"""The inner optimizer's precision for half-precision parameters (DiLoCo, Streaming DiLoCo)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

HALF = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))


def _upcast(tree: Any) -> Any:
    return jax.tree_util.tree_map(lambda x: x.astype(jnp.float32) if jnp.result_type(x) in HALF else x, tree)


def inner_dtype(value: Any) -> str | None:
    """``"auto"`` or None, else a ValueError naming ``inner_dtype``."""
    if value is None or (isinstance(value, str) and value == "auto"):
        return value
    raise ValueError(
        f"inner_dtype must be 'auto' (float32 inner AdamW state and arithmetic for float16/bfloat16 "
        f"parameters) or None (the parameters' dtype, as optax does); got {value!r}."
    )


def float32_for_half(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """``inner`` run in float32 on the float16 / bfloat16 leaves: its state (AdamW's moments) is float32
    there, it sees float32 gradients and parameters, and its updates are cast back to each leaf's dtype.

    Other leaves pass as they are. In float16, AdamW's default ``eps = 1e-8`` rounds to 0 and squared
    gradients below ~2.4e-4 underflow to 0, so ``m / (sqrt(v) + eps)`` is 0/0 or x/0; in bfloat16
    ``b2 = 0.999`` rounds to 1. Float32 moments avoid both.
    """
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        return inner.init(_upcast(params))

    def update_fn(updates, state, params=None, **extra_args):
        out, state = inner.update(_upcast(updates), state, _upcast(params), **extra_args)
        out = jax.tree_util.tree_map(lambda u, g: u.astype(jnp.result_type(g)), out, updates)
        return out, state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
