r"""Simulated Byzantine workers: transforms that replace chosen workers' updates.

Chain :func:`byzantine` *before* the robust aggregation::

  tx = optax.chain(
      optdist.attacks.byzantine(optdist.attacks.alie(), num_byzantine=2, axis_name="data"),
      optdist.robust_mean(optdist.aggregators.trimmed_mean(2), "data"),
      optax.sgd(0.1),
  )

Workers whose index is marked Byzantine (the first ``num_byzantine`` by
default, or an explicit ``mask``) send the attack's vector instead of their
honest update; the others pass theirs through unchanged. Attacks that need the
honest distribution (:func:`alie`, :func:`ipm`, :func:`mimic`) are
*omniscient*: they all-gather every worker's update through a
:class:`~optdist.comm.Channel`. That gather is a simulation device, not part
of the protocol being measured, so its bytes are **not** recorded in any
:class:`~optdist.comm.ByteCounter` (``optdist.bytes_sent`` reports only the
honest protocol's traffic).

Randomness (:func:`gaussian`): the key is ``fold_in(fold_in(key(seed), step),
worker_index)``, so it differs across workers and steps and is reproducible in
every execution mode.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from optdist import _checks
from optdist.comm.accounting import ByteCounter
from optdist.comm.axes import AxisName, num_workers, validate_axis_name, worker_index
from optdist.comm.channel import Channel


class AttackContext(NamedTuple):
    """What an attack sees on one Byzantine worker.

    Attributes:
      own: this worker's honest flattened update ``[d]``.
      gathered: every worker's flattened update ``[n, d]`` (None unless the
        attack declared ``needs_honest``).
      honest: ``[n]`` bool, True for honest workers.
      key: a PRNG key distinct per worker and step.
      num_workers: ``n`` (static).
      num_byzantine: ``f`` (static).
    """

    own: jax.Array
    gathered: jax.Array | None
    honest: jax.Array
    key: jax.Array
    num_workers: int
    num_byzantine: int


class Attack(NamedTuple):
    """An attack: ``apply(ctx) -> [d]`` malicious vector; ``needs_honest`` asks for the gather."""

    apply: Callable[[AttackContext], jax.Array]
    needs_honest: bool


def _honest_moments(ctx: AttackContext) -> tuple[jax.Array, jax.Array]:
    """Coordinate-wise mean and (population) std of the honest rows."""
    w = ctx.honest.astype(ctx.gathered.dtype)[:, None]
    count = jnp.sum(w)
    mu = jnp.sum(w * ctx.gathered, axis=0) / count
    var = jnp.sum(w * (ctx.gathered - mu) ** 2, axis=0) / count
    return mu, jnp.sqrt(var)


def sign_flip(scale: float = 1.0) -> Attack:
    r"""Sends :math:`-s\,g_i` (its own update reversed and scaled by ``scale >= 0``)."""
    scale = _checks.in_range(scale, "scale", 0.0, float("inf"))
    return Attack(lambda ctx: -scale * ctx.own, needs_honest=False)


def ipm(eps: float = 0.1) -> Attack:
    r"""Inner-product manipulation: sends :math:`-\varepsilon\,\bar g_{\text{honest}}`.

    References:
      Xie, Koyejo, Gupta, "Fall of Empires: Breaking Byzantine-tolerant SGD by
      Inner Product Manipulation", 2019.
    """
    eps = _checks.in_range(eps, "eps", 0.0, float("inf"), low_open=True)
    return Attack(lambda ctx: -eps * _honest_moments(ctx)[0], needs_honest=True)


def alie_z(num_workers: int, num_byzantine: int) -> float:
    r"""The ALIE paper's :math:`z_{\max}`: :math:`s = \lfloor n/2 + 1\rfloor - f`,
    :math:`z = \Phi^{-1}((n - s)/n)` (probability clipped into (0, 1))."""
    s = (num_workers // 2 + 1) - num_byzantine
    p = min(max((num_workers - s) / num_workers, 1e-6), 1 - 1e-6)
    return statistics.NormalDist().inv_cdf(p)


def alie(z: float | None = None) -> Attack:
    r"""A little is enough: sends :math:`\mu - z\,\sigma` (coordinate-wise honest mean and std).

    Args:
      z: the shift in standard deviations; None uses :func:`alie_z` from
        ``n`` and ``f`` at trace time.

    References:
      Baruch, Baruch, Goldberg, "A Little Is Enough: Circumventing Defenses
      For Distributed Learning", 2019.
    """
    if z is not None:
        z = _checks.in_range(z, "z", float("-inf"), float("inf"))

    def apply(ctx):
        mu, sigma = _honest_moments(ctx)
        zz = alie_z(ctx.num_workers, ctx.num_byzantine) if z is None else z
        return mu - zz * sigma

    return Attack(apply, needs_honest=True)


def gaussian(std: float = 1.0) -> Attack:
    r"""Sends pure noise :math:`\mathcal N(0, \text{std}^2 I)` (fresh per worker and step)."""
    std = _checks.in_range(std, "std", 0.0, float("inf"), low_open=True)
    return Attack(lambda ctx: std * jax.random.normal(ctx.key, ctx.own.shape, ctx.own.dtype), False)


def mimic(target: int | None = None) -> Attack:
    """Sends a copy of one honest worker's update (``target``, default the first honest worker).

    References:
      Karimireddy, He, Jaggi, "Byzantine-Robust Learning on Heterogeneous
      Datasets via Bucketing", 2022.
    """
    if target is not None:
        target = int(_checks.in_range(target, "target", 0, float("inf")))

    def apply(ctx):
        if target is not None and target >= ctx.num_workers:
            raise ValueError(f"mimic target={target} is not a worker index (n={ctx.num_workers}).")
        idx = jnp.argmax(ctx.honest) if target is None else target
        return ctx.gathered[idx]

    return Attack(apply, needs_honest=True)


def nan_inf(value: float = float("nan")) -> Attack:
    """Sends a vector filled with ``value`` (NaN by default; pass ``float("inf")`` for Inf)."""
    value = float(value)
    if np.isfinite(value):
        raise ValueError(f"value must be NaN or +-Inf; got {value!r}.")
    return Attack(lambda ctx: jnp.full_like(ctx.own, value), needs_honest=False)


def label_flip(labels: jax.Array, num_classes: int) -> jax.Array:
    """Data-side attack: maps label ``y`` to ``num_classes - 1 - y``.

    Apply it to the batches of the Byzantine workers only, e.g.
    ``jnp.where(is_byzantine[:, None], label_flip(y, 10), y)`` on ``[W, b]`` labels.
    """
    num_classes = _checks.positive_int(num_classes, "num_classes")
    return (num_classes - 1 - labels).astype(jnp.asarray(labels).dtype)


class ByzantineState(NamedTuple):
    """Step count (for the attack's keys); identical on every worker. No bytes: see the module doc."""

    count: jax.Array


def _static_mask(num_byzantine: int | None, mask: Sequence[bool] | None, n: int) -> np.ndarray:
    """The Byzantine workers as ``[n]`` bools, checked once ``n`` is known (at trace time): at least
    one worker must stay honest (with every worker Byzantine there is no honest update to attack,
    to simulate an omniscient attacker from, or for a robust aggregator to recover)."""
    if mask is not None:
        arr = np.asarray(mask, dtype=bool)
        if arr.shape != (n,):
            raise ValueError(f"mask must have one entry per worker (n={n}); got shape {arr.shape}.")
        if arr.all():
            raise ValueError(f"mask marks all n={n} workers Byzantine; leave at least one honest worker.")
        return arr
    if num_byzantine > n:
        raise ValueError(f"num_byzantine={num_byzantine} exceeds the number of workers n={n}.")
    if num_byzantine == n:
        raise ValueError(
            f"num_byzantine={num_byzantine} makes all n={n} workers Byzantine; it must leave at least one "
            f"honest worker (0 <= num_byzantine <= {n - 1})."
        )
    return np.arange(n) < num_byzantine


def byzantine(
    attack: Attack,
    num_byzantine: int | None = None,
    mask: Sequence[bool] | None = None,
    axis_name: AxisName = "data",
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    r"""Replaces the updates of the Byzantine workers by ``attack``'s vector.

    .. math:: g_i \leftarrow \begin{cases} \text{attack}(g_i, \{g_j\}_{j \text{ honest}}, \xi_{i,t})
       & i \in \mathcal B \\ g_i & \text{otherwise} \end{cases}

    The whole update tree is flattened (``ravel_pytree``) so attacks act on the
    same vector the robust aggregators see. Chain it before
    :func:`optdist.robust_mean` (and after any per-worker momentum if the
    attacker should control the momentum it sends).

    Bytes: none recorded (the omniscient gather of :func:`alie`/:func:`ipm`/
    :func:`mimic` is not part of the measured protocol).

    State: the step count, identical on every worker.

    Non-finite policy: passes honest updates through untouched; :func:`nan_inf`
    deliberately sends non-finite vectors.

    Args:
      attack: an :class:`Attack` (``sign_flip()``, ``alie()``, ...).
      num_byzantine: ``f``: workers ``0..f-1`` are Byzantine (default when
        ``mask`` is None); ``0 <= f < n``, checked at trace time when ``n`` is known.
      mask: alternatively, one bool per worker (static), True = Byzantine; at least one False.
      axis_name: worker axis (str or tuple of str), or None for one worker.
      seed: seed of the attack's randomness.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example::

      tx = optax.chain(attacks.byzantine(attacks.sign_flip(), num_byzantine=2, axis_name="data"),
                       optdist.robust_mean(aggregators.median(), "data"), optax.sgd(0.1))
    """
    if not isinstance(attack, Attack):
        raise TypeError(
            f"attack must be an optdist.attacks.Attack (e.g. attacks.sign_flip()); got {attack!r}."
        )
    if (num_byzantine is None) == (mask is None):
        raise ValueError("Pass exactly one of num_byzantine (first f workers) or mask (one bool per worker).")
    if num_byzantine is not None:
        num_byzantine = int(_checks.in_range(num_byzantine, "num_byzantine", 0, float("inf")))
    if mask is not None and np.asarray(mask, dtype=bool).all():
        _static_mask(None, mask, np.size(mask))  # all Byzantine: raises now (the worker count is known)
    axis_name = validate_axis_name(axis_name)
    seed = int(seed)

    def init_fn(params):
        del params
        return ByzantineState(jnp.zeros((), jnp.int32))

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        _checks.check_same_structure(updates, params, "params")
        n = num_workers(axis_name)
        bad = _static_mask(num_byzantine, mask, n)
        f = int(bad.sum())
        flat, unravel = ravel_pytree(updates)
        idx = worker_index(axis_name)
        gathered = None
        if attack.needs_honest:
            # The omniscient attacker's view of every update is a simulation device, not traffic of the
            # method under test: gather on a channel with a throwaway counter, discarded right here.
            omniscient = Channel(axis_name, ByteCounter.zeros(axis_name))
            gathered = omniscient.all_gather(flat)
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), state.count), idx)
        ctx = AttackContext(flat, gathered, jnp.asarray(~bad), key, n, f)
        malicious = attack.apply(ctx).astype(flat.dtype)
        out = jnp.where(jnp.asarray(bad)[idx], malicious, flat)
        return unravel(out), ByzantineState(state.count + 1)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


__all__ = [
    "Attack",
    "AttackContext",
    "ByzantineState",
    "alie",
    "alie_z",
    "byzantine",
    "gaussian",
    "ipm",
    "label_flip",
    "mimic",
    "nan_inf",
    "sign_flip",
]
