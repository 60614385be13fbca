"""Local methods with adaptivity via scaling: a diagonal preconditioner refreshed only at sync rounds."""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optdist import _checks
from optdist.comm.axes import AxisName
from optdist.outer import _validate
from optdist.outer.outer_loop import SyncEvery, SyncHook, outer_loop


class RoundScalingState(NamedTuple):
    """State of :func:`scale_by_round_scaling`.

    Attributes:
      scaling: the frozen diagonal ``D`` used this round (identical on every worker).
      nu: running second moment of the aggregated statistics (identical).
      rounds: refreshes so far (identical; for Adam's bias correction).
      sq_sum: sum of this worker's squared gradients in the current round (**per worker**).
    """

    scaling: Any
    nu: Any
    rounds: jax.Array
    sq_sum: Any


def scale_by_round_scaling() -> optax.GradientTransformation:
    """Divides by the frozen diagonal ``D`` and accumulates ``g²`` for the next refresh."""

    def init_fn(params):
        zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
        ones = jax.tree_util.tree_map(jnp.ones_like, params)
        return RoundScalingState(ones, zeros, jnp.zeros((), jnp.int32), zeros)

    def update_fn(updates, state, params=None):
        del params
        out = jax.tree_util.tree_map(lambda g, d: g / d, updates, state.scaling)
        sq_sum = jax.tree_util.tree_map(lambda s, g: s + g * g, state.sq_sum, updates)
        return out, state._replace(sq_sum=sq_sum)

    return optax.GradientTransformation(init_fn, update_fn)


def _hook(scaling: str, b2: float, eps: float) -> SyncHook:
    def payload(inner_state, deltas, round_steps):
        del deltas
        s = inner_state[0]
        return jax.tree_util.tree_map(lambda q: q / round_steps.astype(q.dtype), s.sq_sum)

    def apply(inner_state, mine, total, num_participants, num_workers, participates, round_steps):
        del mine, num_workers, participates, round_steps
        s = inner_state[0]
        rounds = s.rounds + 1
        nu = jax.tree_util.tree_map(
            lambda v, t: b2 * v + (1 - b2) * t / jnp.maximum(num_participants, 1.0).astype(t.dtype),
            s.nu,
            total,
        )
        if scaling == "adam":
            correction = 1 - jnp.float32(b2) ** rounds.astype(jnp.float32)
            d = jax.tree_util.tree_map(lambda v: jnp.sqrt(v / correction.astype(v.dtype)) + eps, nu)
        else:
            d = jax.tree_util.tree_map(lambda v: jnp.sqrt(v) + eps, nu)
        zeros = jax.tree_util.tree_map(jnp.zeros_like, s.sq_sum)
        return (RoundScalingState(d, nu, rounds, zeros), *inner_state[1:])

    return SyncHook(payload, apply)


def local_adaptive(
    learning_rate: Any,
    sync_every: SyncEvery,
    axis_name: AxisName = "data",
    scaling: Literal["adam", "rmsprop"] = "adam",
    b2: float = 0.999,
    eps: float = 1e-8,
    **kwargs: Any,
) -> optax.GradientTransformationExtraArgs:
    r"""Local SGD with a diagonal scaling ``D`` that changes only at sync rounds (Local Adam / RMSProp).

    Our reading of "Local Methods with Adaptivity via Scaling" (the scaled
    Local SGD whose preconditioner ``D̂^{t_p}`` is the one of the last
    communication round ``t_p``): within round ``r`` every worker steps

    .. math:: θ_i \leftarrow θ_i - γ\, g_i / D_r

    with the same frozen ``D_r``, then parameters are averaged (Local SGD's
    outer step). At the sync the workers also average their mean squared
    gradients of the round, ``s = mean_{i∈S} (1/K) Σ_k g_{i,k}²``, and

    .. math::

        v \leftarrow β_2 v + (1 - β_2) s, \qquad
        D_{r+1} = \sqrt{v / (1 - β_2^{r+1})} + ε \ (\text{adam}), \quad
        \sqrt{v} + ε \ (\text{rmsprop})

    ``D_0 = 1`` (the first round is plain Local SGD). No momentum (the paper's
    scaling-only form). State: the accumulated ``g²`` is per worker; ``D``,
    ``v`` and the anchor are identical. Bytes per round: two all-reduces of
    the parameter size (parameters and ``s``); zero otherwise.
    Non-finite policy: as :func:`optdist.outer.outer_loop`.

    Args:
      learning_rate: local step size ``γ`` (float or schedule).
      sync_every: local steps per round (int or schedule).
      axis_name: the worker axis, or None.
      scaling: ``"adam"`` (bias-corrected) or ``"rmsprop"``.
      b2: second-moment decay ``β₂`` in [0, 1).
      eps: ``ε > 0``.
      **kwargs: forwarded to :func:`outer_loop` (participation, aggregator).

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example::

      tx = optdist.local_adaptive(1e-2, sync_every=16, axis_name="data", scaling="adam")

    References:
      Chezhegov, Skorik, Khachaturov, Shalagin, Avetisyan, Takáč, Kholodov,
      Beznosikov, "Local Methods with Adaptivity via Scaling", 2024.
    """
    kwargs = _validate.forwarded(kwargs)
    if scaling not in ("adam", "rmsprop"):
        raise ValueError(f"scaling must be 'adam' or 'rmsprop'; got {scaling!r}.")
    learning_rate = _validate.learning_rate(learning_rate, "learning_rate")
    b2 = _validate.decay(b2, "b2")
    eps = _checks.in_range(eps, "eps", 0.0, float("inf"), low_open=True, high_open=True)
    if "reset_inner_state" in kwargs:
        raise ValueError("reset_inner_state is not supported by local_adaptive: it would erase the scaling.")
    inner = optax.chain(scale_by_round_scaling(), optax.scale_by_learning_rate(learning_rate))
    return outer_loop(
        inner, optax.sgd(1.0), sync_every, axis_name, sync_hook=_hook(scaling, b2, eps), **kwargs
    )
