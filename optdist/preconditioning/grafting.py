"""Grafting for Shampoo: borrow the step *size* of a simpler optimizer, keep Shampoo's direction.

For a block (or parameter) with Shampoo direction :math:`P` and grafting direction :math:`D` (the
output of SGD, AdaGrad, RMSProp or Adam on the same gradient), the grafted direction is

.. math:: \\frac{\\|D\\|_F}{\\|P\\|_F} P \\qquad (0 \\text{ where } \\|P\\|_F = 0).

The grafting optimizers are plain optax transforms, so any ``GradientTransformation`` can be used.

References:
  Agarwal, N., Anil, R., Hazan, E., Koren, T., Zhang, C. "Disentangling Adaptive Gradient Methods
  from Learning Rates", 2020.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax

GRAFTING = ("sgd", "adagrad", "rmsprop", "adam", "none")


def grafting_transform(
    grafting: str | optax.GradientTransformation, beta1: float, beta2: float, epsilon: float
) -> optax.GradientTransformation | None:
    """The optax transform whose output gives the grafted step size (``None`` for ``"none"``)."""
    if isinstance(grafting, optax.GradientTransformation):
        return grafting
    if grafting == "none":
        return None
    if grafting == "sgd":
        return optax.identity()
    if grafting == "adagrad":
        return optax.scale_by_rss(initial_accumulator_value=0.0, eps=epsilon)
    if grafting == "rmsprop":
        return optax.scale_by_rms(decay=beta2, eps=epsilon, initial_scale=0.0, bias_correction=True)
    if grafting == "adam":
        return optax.scale_by_adam(b1=beta1, b2=beta2, eps=epsilon)
    raise ValueError(
        f"grafting must be one of {GRAFTING} or an optax.GradientTransformation; got {grafting!r}."
    )


def graft(direction: jax.Array, grafted: jax.Array, axes: Sequence[int] | None = None) -> jax.Array:
    """Rescales ``direction`` to the Frobenius norm of ``grafted`` over ``axes`` (all if None)."""
    norm = jnp.sqrt(jnp.sum(jnp.square(direction), axis=axes, keepdims=True))
    target = jnp.sqrt(jnp.sum(jnp.square(grafted), axis=axes, keepdims=True))
    scale = jnp.where(norm > 0, target / jnp.where(norm > 0, norm, 1.0), 0.0)
    return direction * scale
