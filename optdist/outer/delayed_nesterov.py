"""Delayed Nesterov: the outer optimizer of Asynchronous Local-SGD (momentum applied every N arrivals)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optdist import _checks
from optdist.comm.axes import AxisName
from optdist.outer import _validate
from optdist.outer.outer_loop import SyncEvery, outer_loop


class DelayedNesterovState(NamedTuple):
    """Outer state (identical on every worker): momentum, buffered pseudo-gradients, arrivals."""

    momentum: Any
    buffer: Any
    arrivals: jax.Array


def delayed_nesterov_outer(
    learning_rate: Any, momentum: float = 0.9, buffer_size: int = 1
) -> optax.GradientTransformation:
    r"""Delayed Nesterov outer optimizer: one pseudo-gradient ``Δ_t`` per call ("arrival").

    Our reading of Liu et al.'s Delayed Nesterov (their Algorithm 3): every
    arrival is applied at once without momentum, scaled by ``1/N``; the
    arrivals are also buffered, and every ``N``-th arrival the momentum
    absorbs the buffer's mean and its Nesterov look-ahead is applied:

    .. math::

        b &\leftarrow b + Δ_t \\
        t \bmod N \ne 0:&\quad θ \leftarrow θ - η\, Δ_t / N \\
        t \bmod N = 0:&\quad m \leftarrow μ m + b / N,\ \ θ \leftarrow θ - η (μ m + Δ_t / N),
                        \ \ b \leftarrow 0

    With ``N = 1`` this is exactly ``optax.sgd(η, momentum=μ, nesterov=True)``
    (DiLoCo's outer step); between momentum updates the model moves by plain
    (stale-gradient-safe) SGD, so stale pseudo-gradients are not amplified
    by momentum on every arrival.
    """
    learning_rate = _validate.learning_rate(learning_rate, "learning_rate")
    momentum = _validate.decay(momentum, "momentum")
    buffer_size = _checks.positive_int(buffer_size, "buffer_size")

    def init_fn(params):
        zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
        return DelayedNesterovState(zeros, zeros, jnp.zeros((), jnp.int32))

    def update_fn(updates, state, params=None):
        del params
        arrivals = state.arrivals + 1
        lr = learning_rate(state.arrivals) if callable(learning_rate) else learning_rate
        flush = arrivals % buffer_size == 0
        buffer = jax.tree_util.tree_map(lambda b, d: b + d, state.buffer, updates)
        new_m = jax.tree_util.tree_map(lambda m, b: momentum * m + b / buffer_size, state.momentum, buffer)
        m = jax.tree_util.tree_map(lambda n, o: jnp.where(flush, n, o), new_m, state.momentum)
        out = jax.tree_util.tree_map(
            lambda d, mm: -lr * (d / buffer_size + jnp.where(flush, momentum * mm, 0)).astype(d.dtype),
            updates,
            m,
        )
        buffer = jax.tree_util.tree_map(lambda b: jnp.where(flush, jnp.zeros_like(b), b), buffer)
        return out, DelayedNesterovState(m, buffer, arrivals)

    return optax.GradientTransformation(init_fn, update_fn)


def delayed_nesterov(
    inner: optax.GradientTransformation,
    sync_every: SyncEvery,
    axis_name: AxisName = "data",
    outer_lr: Any = 0.7,
    momentum: float = 0.9,
    buffer_size: int = 1,
    **kwargs: Any,
) -> optax.GradientTransformationExtraArgs:
    r"""A local-update loop whose outer optimizer is :func:`delayed_nesterov_outer`.

    In this synchronous loop one aggregated pseudo-gradient arrives per round,
    so ``buffer_size=N`` applies the momentum every ``N`` rounds. State, bytes
    and non-finite policy as :func:`optdist.outer.outer_loop` (one all-reduce of
    the parameters per round). Asynchronous arrivals of single workers' stale
    pseudo-gradients are not simulated here.

    Args:
      inner: the local optimizer (the paper uses AdamW).
      sync_every: local steps per round (int or schedule).
      axis_name: the worker axis, or None.
      outer_lr: outer learning rate ``η``.
      momentum: outer momentum ``μ``.
      buffer_size: arrivals ``N`` between momentum updates.
      **kwargs: forwarded to :func:`outer_loop`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example::

      tx = optdist.delayed_nesterov(optax.adamw(1e-3), sync_every=50, buffer_size=4)

    References:
      Liu, Chhaparia, Douillard, Kale, Rusu, Shen, Szlam, Ranzato,
      "Asynchronous Local-SGD Training for Language Modeling", 2024.
    """
    outer = delayed_nesterov_outer(_validate.learning_rate(outer_lr, "outer_lr"), momentum, buffer_size)
    return outer_loop(inner, outer, sync_every, axis_name, **kwargs)
