"""A simulator of asynchronous Local-SGD: heterogeneous worker speeds, stale pseudo-gradients."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from optdist import _checks
from optdist.comm.accounting import ByteCounter, payload_bytes
from optdist.comm.axes import AxisName, validate_axis_name
from optdist.comm.channel import Channel
from optdist.outer import _validate
from optdist.outer.delayed_nesterov import delayed_nesterov_outer


class AsyncLocalSGDState(NamedTuple):
    """State of :func:`async_local_sgd`.

    Attributes:
      tick: simulated clock ticks (update calls) so far (identical).
      steps_done: this worker's inner steps in its current round (**per worker**).
      start: the global parameters this worker started its round from (**per worker**).
      server: the global (server) parameters (identical).
      outer_state: the server optimizer's state (identical).
      inner_state: the inner optimizer's state (**per worker**).
      arrivals: pseudo-gradients the server has applied (identical).
      bytes_sent: bytes this worker has pushed to the server (per worker).
    """

    tick: jax.Array
    steps_done: jax.Array
    start: Any
    server: Any
    outer_state: Any
    inner_state: Any
    arrivals: jax.Array
    bytes_sent: ByteCounter


def _as_tuple(value: Any, name: str) -> tuple[int, ...]:
    values = tuple(value) if isinstance(value, Sequence) else (value,)
    return tuple(_checks.positive_int(v, name) for v in values)


def async_local_sgd(
    inner: optax.GradientTransformation,
    local_steps: int | Sequence[int],
    speeds: Sequence[int],
    axis_name: AxisName = "data",
    outer_lr: float = 0.7,
    momentum: float = 0.9,
    buffer_size: int = 1,
    dynamic_local_steps: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""Simulates asynchronous Local-SGD with a Delayed Nesterov server, one clock tick per ``update``.

    Worker ``i`` takes an inner step every ``speeds[i]`` ticks (1 = fastest)
    and, after ``H_i`` of its own steps, pushes ``Δ_i = θ_start,i − θ_i`` to the
    server. The server applies arrivals one by one, in worker order within a
    tick, with :func:`delayed_nesterov_outer` (momentum every ``buffer_size``
    arrivals), and the arriving worker restarts from the server's current
    parameters. Workers that are slower push pseudo-gradients computed from
    older server parameters (staleness), and arrivals interleave out of
    round order. ``dynamic_local_steps`` sets ``H_i = max(1, floor(H ·
    min(speeds) / speeds[i]))`` so every worker's round takes about the same
    wall time (the paper's adjustment of local steps to computation speed).

    With equal speeds and ``buffer_size = n`` all ``n`` pseudo-gradients arrive
    on the same tick, and one server "round" equals DiLoCo's Nesterov outer
    step on their mean (tested).

    Simulation of a parameter server: the arrivals are exchanged with an
    all-gather through a :class:`~optdist.comm.Channel` on every tick (compute
    cost only); ``bytes_sent`` counts the modelled protocol instead: a worker
    sends its ``Δ_i`` (payload bytes) when it arrives, nothing otherwise.

    Non-finite policy: a non-finite ``Δ_i`` reaches the server parameters
    (no guard). Call the step under ``optdist.simulate``/``data_parallel``;
    the per-worker arrays (params, this state) carry the worker axis.

    Args:
      inner: the local optimizer.
      local_steps: ``H`` for every worker, or one ``H_i`` per worker.
      speeds: ticks per inner step for each worker (ints >= 1), length ``n``.
      axis_name: the worker axis.
      outer_lr, momentum, buffer_size: the Delayed Nesterov server.
      dynamic_local_steps: scale ``H_i`` by the worker's speed.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example::

      tx = optdist.outer.async_local_sgd(optax.adamw(1e-3), 20, speeds=(1, 1, 2, 4), buffer_size=4)

    References:
      Liu, Chhaparia, Douillard, Kale, Rusu, Shen, Szlam, Ranzato,
      "Asynchronous Local-SGD Training for Language Modeling", 2024.
    """
    axis_name = validate_axis_name(axis_name)
    speeds = _as_tuple(speeds, "speeds")
    steps = _as_tuple(local_steps, "local_steps")
    if len(steps) == 1:
        steps = steps * len(speeds)
    if len(steps) != len(speeds):
        raise ValueError(f"local_steps has {len(steps)} entries but speeds has {len(speeds)} workers.")
    if dynamic_local_steps:
        steps = tuple(max(1, h * min(speeds) // k) for h, k in zip(steps, speeds))
    inner = optax.with_extra_args_support(_validate.transformation(inner, "inner"))
    outer = delayed_nesterov_outer(_validate.learning_rate(outer_lr, "outer_lr"), momentum, buffer_size)
    speeds_arr, steps_arr = np.asarray(speeds, np.int32), np.asarray(steps, np.int32)

    def init_fn(params):
        _checks.check_floating(params, "async_local_sgd", "parameters")
        params = jax.tree_util.tree_map(jnp.asarray, params)
        zero = jnp.zeros((), jnp.int32)
        return AsyncLocalSGDState(
            zero,
            zero,
            params,
            params,
            outer.init(params),
            inner.init(params),
            zero,
            ByteCounter.zeros(axis_name),
        )

    def update_fn(updates, state, params=None, **extra_args):
        if params is None:
            raise ValueError("async_local_sgd needs params in update(grads, state, params).")
        _checks.check_same_structure(updates, params, "params")
        _checks.check_floating(params, "async_local_sgd", "parameters")
        channel = Channel(axis_name)
        if channel.size != len(speeds):
            raise ValueError(f"speeds has {len(speeds)} entries but there are {channel.size} workers.")
        me = channel.index
        active = state.tick % jnp.asarray(speeds_arr)[me] == 0
        u, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
        u = jax.tree_util.tree_map(lambda x: jnp.where(active, x, jnp.zeros_like(x)), u)
        inner_state = jax.tree_util.tree_map(
            lambda n, o: jnp.where(active, n, o), inner_state, state.inner_state
        )
        local = jax.tree_util.tree_map(lambda p, d: (p + d).astype(p.dtype), params, u)
        steps_done = state.steps_done + active.astype(jnp.int32)
        arrive = steps_done >= jnp.asarray(steps_arr)[me]
        delta = jax.tree_util.tree_map(lambda s, x: s - x, state.start, local)
        all_deltas, all_arrive = channel.all_gather((delta, arrive))

        def serve(carry, j):
            server, ostate, count = carry
            d = jax.tree_util.tree_map(lambda x: x[j], all_deltas)
            step, new_ostate = outer.update(d, ostate, server)
            new_server = optax.apply_updates(server, step)
            take = all_arrive[j]
            pick = lambda n, o: jnp.where(take, n, o)  # noqa: E731
            server = jax.tree_util.tree_map(pick, new_server, server)
            ostate = jax.tree_util.tree_map(pick, new_ostate, ostate)
            return (server, ostate, count + take.astype(jnp.int32)), None

        (server, outer_state, arrivals), _ = lax.scan(
            serve, (state.server, state.outer_state, state.arrivals), jnp.arange(channel.size)
        )
        out = jax.tree_util.tree_map(
            lambda s, p, x: jnp.where(arrive, (s - p).astype(p.dtype), x), server, params, u
        )
        start = jax.tree_util.tree_map(lambda s, o: jnp.where(arrive, s, o), server, state.start)
        return out, AsyncLocalSGDState(
            tick=state.tick + 1,
            steps_done=jnp.where(arrive, 0, steps_done),
            start=start,
            server=server,
            outer_state=outer_state,
            inner_state=inner_state,
            arrivals=arrivals,
            bytes_sent=state.bytes_sent.add(payload_bytes(delta), where=arrive),
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
