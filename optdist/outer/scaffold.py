"""SCAFFOLD: local SGD corrected by control variates for client drift."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optdist import _checks
from optdist.comm.axes import AxisName
from optdist.outer import _validate
from optdist.outer.outer_loop import SyncEvery, SyncHook, outer_loop


class ScaffoldState(NamedTuple):
    """Control variates: ``c_local`` (``c_i``, **per worker**) and ``c_global`` (``c``, identical)."""

    c_local: Any
    c_global: Any


def scaffold_correction() -> optax.GradientTransformation:
    """Replaces the gradient by ``g_i − c_i + c`` (the control variates live in the state)."""

    def init_fn(params):
        zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
        return ScaffoldState(zeros, zeros)

    def update_fn(updates, state, params=None):
        del params
        out = jax.tree_util.tree_map(lambda g, ci, c: g - ci + c, updates, state.c_local, state.c_global)
        return out, state

    return optax.GradientTransformation(init_fn, update_fn)


def _hook(client_lr: float) -> SyncHook:
    # Option II of the paper: c_i+ = c_i − c + (x − y_i) / (K η_l), with x − y_i = Δ_i.
    def payload(inner_state, deltas, round_steps):
        cv = inner_state[0]
        scale = 1.0 / (round_steps.astype(jnp.float32) * client_lr)
        return jax.tree_util.tree_map(lambda c, d: -c + d * scale.astype(d.dtype), cv.c_global, deltas)

    def apply(inner_state, mine, total, num_participants, num_workers, participates, round_steps):
        del num_participants, round_steps
        cv = inner_state[0]
        c_local = jax.tree_util.tree_map(
            lambda ci, dc: jnp.where(participates, ci + dc, ci), cv.c_local, mine
        )
        # c ← c + (|S|/N) mean_S Δc_i = c + Σ_S Δc_i / N.
        c_global = jax.tree_util.tree_map(lambda c, s: c + s / num_workers, cv.c_global, total)
        return (ScaffoldState(c_local, c_global), *inner_state[1:])

    return SyncHook(payload, apply)


def scaffold(
    client_lr: float,
    sync_every: SyncEvery,
    axis_name: AxisName = "data",
    server_lr: float = 1.0,
    **kwargs: Any,
) -> optax.GradientTransformationExtraArgs:
    r"""SCAFFOLD (Karimireddy et al., 2020), option II control variates.

    Round with server model ``x`` and ``K`` local steps; client ``i`` from ``y_i = x``:

    .. math::

        y_i &\leftarrow y_i - η_l (g_i(y_i) - c_i + c) \quad (K \text{ times}) \\
        c_i^+ &= c_i - c + \frac{x - y_i}{K η_l}, \qquad Δc_i = c_i^+ - c_i \\
        x &\leftarrow x + η_g \,\mathrm{mean}_{i∈S}(y_i - x), \qquad
        c \leftarrow c + \frac{1}{N} \sum_{i∈S} Δc_i

    ``S`` is the round's participants (all ``N`` workers by default;
    ``num_participants=`` / ``participation=`` as in :func:`outer_loop`); only
    participants update their ``c_i``. State: ``c_i`` and the (stateless)
    SGD are per worker; ``c``, ``x`` identical. Bytes per round: two
    all-reduces of the parameter size (``Δy`` through the aggregator and
    ``Δc``), i.e. twice Local SGD's; zero on other steps (plus the 4-byte
    participant count with partial participation). ``K`` is the length of
    the round actually run (so schedules of ``sync_every`` are handled).
    Non-finite policy: as :func:`optdist.outer.outer_loop`.

    Args:
      client_lr: local learning rate ``η_l`` (a positive float: option II divides by it).
      sync_every: local steps ``K`` per round (int or schedule).
      axis_name: the worker axis, or None.
      server_lr: global learning rate ``η_g``.
      **kwargs: forwarded to :func:`outer_loop` (participation, aggregator, seed).

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example::

      tx = optdist.scaffold(client_lr=0.05, sync_every=10, axis_name="data")

    References:
      Karimireddy, Kale, Mohri, Reddi, Stich, Suresh, "SCAFFOLD: Stochastic
      Controlled Averaging for Federated Learning", ICML 2020.
    """
    kwargs = _validate.forwarded(kwargs)
    client_lr = _checks.in_range(client_lr, "client_lr", 0.0, float("inf"), low_open=True, high_open=True)
    server_lr = _checks.in_range(server_lr, "server_lr", 0.0, float("inf"), low_open=True, high_open=True)
    if "reset_inner_state" in kwargs:
        raise ValueError(
            "reset_inner_state is not supported by scaffold: it would erase the control variates."
        )
    inner = optax.chain(scaffold_correction(), optax.sgd(client_lr))
    return outer_loop(
        inner, optax.sgd(server_lr), sync_every, axis_name, sync_hook=_hook(client_lr), **kwargs
    )
