"""Schedules for the synchronization period H."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from optdist import _checks
from optdist.outer import _validate


def qsr_sync_every(
    base: int, alpha: float, lr_schedule: optax.Schedule | float
) -> Callable[[jax.Array], jax.Array]:
    r"""The Quadratic Synchronization Rule: ``H_t = max(H_base, floor((α / η_t)²))``.

    As the learning rate ``η_t`` decays, rounds grow like ``1/η²``. Pass the
    result as ``sync_every`` to :func:`optdist.outer.outer_loop` (or an
    alias): ``H`` is evaluated at the first step of each round, as in the
    paper. Pure function of the step, so it works under jit; an infinite
    ``H`` (``η_t = 0``) is clipped by the outer loop to ``2**30``.

    Args:
      base: the minimum period ``H_base`` (int >= 1).
      alpha: the QSR coefficient ``α > 0``.
      lr_schedule: the *inner* learning-rate schedule ``step -> η_t`` (or a constant).

    Returns:
      A schedule ``step -> H`` (int32).

    Example::

      lr = optax.cosine_decay_schedule(0.1, 10_000)
      tx = optdist.local_sgd(optax.sgd(lr), optdist.qsr_sync_every(4, 0.02, lr), "data")

    References:
      Gu, Lyu, Arora, Zhang, Huang, "A Quadratic Synchronization Rule for
      Distributed Deep Learning", ICLR 2024.
    """
    base = _checks.positive_int(base, "base")
    alpha = _checks.in_range(alpha, "alpha", 0.0, float("inf"), low_open=True, high_open=True)
    lr_schedule = _validate.learning_rate(lr_schedule, "lr_schedule")

    def schedule(step: jax.Array) -> jax.Array:
        lr = lr_schedule(step) if callable(lr_schedule) else lr_schedule
        ratio = jnp.float32(alpha) / jnp.asarray(lr, jnp.float32)
        h = jnp.floor(jnp.minimum(ratio * ratio, 2.0**30))  # inf (lr = 0) -> 2**30
        return jnp.maximum(jnp.int32(base), jnp.nan_to_num(h, nan=2.0**30).astype(jnp.int32))

    return schedule
