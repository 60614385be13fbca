r"""Backup workers on a simulated clock: the mean of the fastest ``n - b`` gradients, ``b`` static or online.

Both aggregators draw every step's per-worker compute times from a seeded
:class:`~optdist.stragglers.clock.DelayModel` (the same ``[n]`` vector on every worker, no
communication), keep the ``k = n - b`` fastest workers and average their trees; the step's simulated
wall time is the ``k``-th fastest time, accumulated in the state (``state.wall_time``, identical on
every worker) so experiments report simulated time next to steps.

Bytes: the masked mean is one all-reduce of ``(m_i x_i, m_i)`` (:func:`optdist.aggregation.exact_mean`
with participation weights ``m_i \in \{0, 1\}``): a backup worker still takes part in the all-reduce
and sends its zeros, so the bytes per worker are those of the full mean plus the packed float32
weight, whatever ``b``. (A parameter server that drops late pushes would save their bytes; a
collective cannot.) :func:`dynamic_backup_mean` adds two float32 scalars per step to the same
all-reduce (packed with the weight).

References:
  Chen, Pan, Monga, Bengio, Jozefowicz, "Revisiting Distributed Synchronous SGD", 2016 (backup
  workers); Xu, Neglia, Sebastianelli, "Dynamic Backup Workers for Parallel Machine Learning", 2021
  (DBW).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optdist import _checks
from optdist.comm.aggregation import Aggregator, as_transform, exact_mean
from optdist.comm.axes import AxisName
from optdist.stragglers import clock


class BackupState(NamedTuple):
    """State of :func:`backup_mean` (identical on every worker).

    Attributes:
      step: steps aggregated so far (indexes the clock).
      wall_time: simulated seconds so far (sum of each step's ``(n - b)``-th fastest compute time).
      num_backup: ``b`` at the last step.
    """

    step: jax.Array
    wall_time: jax.Array
    num_backup: jax.Array


def _init_clock() -> tuple[jax.Array, jax.Array, jax.Array]:
    return jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32)


def _participation(mask: jax.Array, channel, weights) -> jax.Array:
    mine = mask[channel.index].astype(jnp.float32) if channel.size > 1 else mask[0].astype(jnp.float32)
    return mine if weights is None else mine * jnp.asarray(weights, jnp.float32)


def backup_mean(b: int, delays: clock.DelayModel, seed: int = 0) -> Aggregator:
    r"""The mean of the ``n - b`` fastest workers' trees on a simulated clock (``b`` backup workers).

    At step :math:`t` with compute times :math:`\tau_{t,1..n}` (``delays``, seed ``seed``), let
    :math:`S_t` be the ``n - b`` smallest (ties to the lower index) and :math:`m_i = [i \in S_t]`:

    .. math:: \hat g_t = \frac{\sum_i m_i x_i}{\sum_i m_i}, \qquad
       \text{wall}_{t+1} = \text{wall}_t + \tau_{t,(n-b)}.

    With participation ``weights`` (partial participation), :math:`m_i` is multiplied by the
    weight and the mean is over the remaining participants.

    Bytes: one all-reduce of the masked tree and the float32 mask (backup workers send zeros; see
    the module docstring): the bytes of :func:`~optdist.aggregation.exact_mean` with weights.

    State: :class:`BackupState`, identical on every worker.

    Args:
      b: backup workers, ``0 <= b < n`` (checked at trace time, when ``n`` is known).
      delays: the :class:`~optdist.stragglers.clock.DelayModel` of per-worker compute times.
      seed: seed of the clock (the same on every worker).

    Returns:
      An :class:`~optdist.comm.aggregation.Aggregator`; as a gradient transformation:
      ``optdist.comm.as_transform(backup_mean(2, clock.shifted_exponential()), "data")``.

    References:
      Chen, Pan, Monga, Bengio, Jozefowicz, "Revisiting Distributed Synchronous SGD", 2016.
    """
    if isinstance(b, bool) or not isinstance(b, int) or b < 0:
        raise ValueError(f"b (backup workers) must be an integer >= 0; got {b!r}.")
    delays = clock.check_delay_model(delays, "backup_mean")
    seed = int(seed)
    mean = exact_mean()

    def init(params):
        return BackupState(*_init_clock())

    def aggregate(tree, state, channel, *, weights=None):
        n = channel.size
        if b >= n:
            raise ValueError(f"backup_mean(b={b}) needs b < n workers; got n={n}. Lower b.")
        times = clock.compute_times(delays, seed, state.step, n)
        mask = clock.fastest_mask(times, n - b)
        estimate, _ = mean.aggregate(tree, (), channel, weights=_participation(mask, channel, weights))
        new = BackupState(
            state.step + 1, state.wall_time + clock.kth_fastest(times, n - b), jnp.asarray(b, jnp.int32)
        )
        return estimate, new

    return Aggregator(init, aggregate, f"backup_mean({b}, {delays.name})")


class DynamicBackupState(NamedTuple):
    r"""State of :func:`dynamic_backup_mean` (identical on every worker).

    Attributes:
      step, wall_time, num_backup: as in :class:`BackupState` (``num_backup``: the ``b`` chosen at the
        last step).
      times: running (EMA) estimate of the sorted compute-time vector (``times[k-1]`` estimates the
        ``k``-th fastest time).
      grad_sq: EMA estimate of :math:`\|\nabla F\|^2`.
      variance: EMA estimate of a worker gradient's variance :math:`\sigma^2`.
      smoothness: running estimate of the smoothness constant ``L`` (seeded by its first observation;
        0 until then), or the fixed value.
      debias: :math:`1 - \beta^t`, the bias correction of ``times``, ``grad_sq`` and ``variance``.
      previous: the previous step's estimate (for ``L``).
      previous_k: the previous step's number of averaged workers.
    """

    step: jax.Array
    wall_time: jax.Array
    num_backup: jax.Array
    times: jax.Array
    grad_sq: jax.Array
    variance: jax.Array
    smoothness: jax.Array
    debias: jax.Array
    previous: Any
    previous_k: jax.Array


def dbw_choice(times, grad_sq, variance, smoothness, learning_rate):
    r"""DBW's ``k`` (workers waited for): :math:`\arg\max_{2 \le k \le n} \mathrm{gain}(k) / \hat T_k`,
    ``n`` if no gain is positive. ``times``: ``[n]`` estimated order statistics (see
    :func:`dynamic_backup_mean`)."""
    n = times.shape[0]
    k = jnp.arange(1, n + 1, dtype=jnp.float32)
    eta = learning_rate
    grad_sq = jnp.maximum(grad_sq, 0.0)
    gain = eta * grad_sq - 0.5 * smoothness * eta**2 * (grad_sq + variance / k)
    speed = gain / jnp.maximum(times, jnp.finfo(jnp.float32).tiny)
    # k >= 2: with one gradient the variance (hence the gain) could no longer be estimated.
    speed = jnp.where(k >= min(2, n), speed, -jnp.inf)
    best = jnp.argmax(speed) + 1
    return jnp.where(jnp.max(gain) > 0, best, n).astype(jnp.int32)


def dynamic_backup_mean(
    num_workers: int,
    delays: clock.DelayModel,
    learning_rate: float,
    seed: int = 0,
    smoothness: float | None = None,
    decay: float = 0.9,
    initial_backup: int = 0,
) -> Aggregator:
    r"""DBW: backup workers whose number is chosen online to maximise the expected loss decrease per second.

    Our reading of Xu, Neglia & Sebastianelli (DBW). For SGD with step :math:`\eta` on an
    ``L``-smooth loss, averaging ``k`` unbiased worker gradients of variance :math:`\sigma^2` gives the
    expected decrease

    .. math:: \mathrm{gain}(k) = \eta \|\nabla F\|^2 - \frac{L \eta^2}{2}\Big(\|\nabla F\|^2 +
       \frac{\sigma^2}{k}\Big),

    and waiting for the ``k`` fastest costs :math:`\hat T_k` seconds. Each step DBW waits for
    :math:`k_t = \arg\max_k \mathrm{gain}(k)/\hat T_k` (``b = n - k_t``; ``k = n`` whenever no gain
    is positive; ``b = initial_backup`` until the estimates exist), then updates its estimates from
    what it received:

    * :math:`\sigma^2 = \frac{\sum_i m_i\|x_i\|^2 - k\|\hat g\|^2}{k - 1}` (kept when ``k = 1``);
    * :math:`\|\nabla F\|^2 = \|\hat g\|^2 - \sigma^2/k` (unbiased; clipped at 0 after averaging);
    * ``L`` from successive estimates, assuming the update was :math:`-\eta \hat g_{t-1}`:
      :math:`L^2 = \max(\|\hat g_t - \hat g_{t-1}\|^2 - \sigma^2/k_t - \sigma^2/k_{t-1}, 0) /
      (\eta^2 \|\hat g_{t-1}\|^2)` (the first one without the noise terms: an upper estimate, so
      the second step errs toward more workers), or the fixed ``smoothness``;
    * :math:`\hat T_k`: an EMA of the step's sorted compute times.

    All estimates are EMAs with ``decay`` and bias correction. Deviations: the simulated clock
    reveals every worker's time, so :math:`\hat T_k` uses all ``n`` (a parameter server sees late
    workers' times only when they arrive); the gain is that of plain SGD at ``learning_rate``
    (with momentum or Adam downstream it is a heuristic).

    Caveat (measured): the choice hinges on ``L``, and the online ``L`` is a difference of two noisy
    means, so at a small step or a low gradient-to-noise ratio it comes out several times too large
    (noisy least squares with true ``L = 1``: 5-15) and DBW then waits for nearly every worker;
    ``tests/stragglers`` and ``experiments/configs/digits_stragglers.py`` pass a fixed
    ``smoothness``. Choosing ``L`` replaces choosing ``b``, but one ``L`` serves the whole run while
    the best ``b`` changes with the stage of training.

    Bytes: one all-reduce of the masked tree with three packed float32 scalars (mask, masked
    :math:`\|x_i\|^2`); backup workers send zeros (see the module docstring).

    Args:
      num_workers: ``n`` (sizes the time estimates at ``init``; checked against the axis).
      delays: the :class:`~optdist.stragglers.clock.DelayModel`.
      learning_rate: the SGD step :math:`\eta` the gain assumes, ``> 0``.
      seed: the clock's seed.
      smoothness: a fixed ``L > 0``, or None to estimate it online.
      decay: EMA decay of the estimates, in ``[0, 1)``.
      initial_backup: ``b`` while the estimates do not exist yet (the first step, and until a first
        ``L`` is observed), ``0 <= initial_backup <= n - 2`` (at least two workers, for the variance).

    Returns:
      An :class:`~optdist.comm.aggregation.Aggregator` with :class:`DynamicBackupState`.

    References:
      Xu, Neglia, Sebastianelli, "Dynamic Backup Workers for Parallel Machine Learning", Computer
      Networks, 2021.
    """
    num_workers = _checks.positive_int(num_workers, "num_workers")
    delays = clock.check_delay_model(delays, "dynamic_backup_mean")
    learning_rate = _checks.in_range(learning_rate, "learning_rate", 0.0, float("inf"), low_open=True)
    if smoothness is not None:
        smoothness = _checks.in_range(smoothness, "smoothness", 0.0, float("inf"), low_open=True)
    decay = _checks.in_range(decay, "decay", 0.0, 1.0, high_open=True)
    seed = int(seed)
    n = num_workers
    if (
        isinstance(initial_backup, bool)
        or not isinstance(initial_backup, int)
        or not 0 <= initial_backup <= max(n - 2, 0)
    ):
        raise ValueError(
            f"initial_backup must be an integer in [0, num_workers - 2] = [0, {max(n - 2, 0)}]; "
            f"got {initial_backup!r}."
        )

    def init(params):
        z = jnp.zeros((), jnp.float32)
        return DynamicBackupState(
            *_init_clock(),
            times=jnp.zeros((n,), jnp.float32),
            grad_sq=z,
            variance=z,
            smoothness=jnp.asarray(smoothness or 0.0, jnp.float32),
            debias=z,
            previous=jax.tree_util.tree_map(lambda p: jnp.zeros_like(p, jnp.float32), params),
            previous_k=jnp.asarray(n, jnp.int32),
        )

    def aggregate(tree, state, channel, *, weights=None):
        if channel.size != n:
            raise ValueError(
                f"dynamic_backup_mean(num_workers={n}) runs over {channel.size} workers: "
                f"pass num_workers={channel.size}."
            )
        times = clock.compute_times(delays, seed, state.step, n)
        d = jnp.maximum(state.debias, jnp.finfo(jnp.float32).tiny)
        chosen = dbw_choice(
            state.times / d, state.grad_sq / d, state.variance / d, state.smoothness, learning_rate
        )
        # k = n until the estimates exist: the first step, and (estimating L) until a first L is seen.
        k = jnp.where((state.step == 0) | (state.smoothness <= 0), n - initial_backup, chosen)
        m = _participation(clock.fastest_mask(times, k), channel, weights)
        sq = sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree_util.tree_leaves(tree))
        weighted = jax.tree_util.tree_map(lambda x: x * m.astype(x.dtype), tree)
        total, count, total_sq = channel.psum((weighted, m, m * sq))
        kf = jnp.maximum(count, 1.0)
        estimate = jax.tree_util.tree_map(lambda t: (t / kf.astype(t.dtype)).astype(t.dtype), total)

        est32 = jax.tree_util.tree_map(lambda t: t.astype(jnp.float32), estimate)
        mean_sq = sum(jnp.sum(jnp.square(x)) for x in jax.tree_util.tree_leaves(est32))
        var_obs = jnp.maximum(total_sq - kf * mean_sq, 0.0) / jnp.maximum(kf - 1.0, 1.0)
        var_prev = state.variance / d
        var_new = jnp.where(kf >= 2, var_obs, jnp.where(state.step == 0, 0.0, var_prev))
        gsq_obs = mean_sq - var_new / kf  # unbiased, clipped only after averaging (in dbw_choice)
        prev_sq = sum(jnp.sum(jnp.square(x)) for x in jax.tree_util.tree_leaves(state.previous))
        diff_sq = sum(
            jnp.sum(jnp.square(a - p))
            for a, p in zip(jax.tree_util.tree_leaves(est32), jax.tree_util.tree_leaves(state.previous))
        )
        # The first L is an upper estimate (noise not subtracted: a larger L asks for more workers),
        # the later ones subtract the two estimates' noise.
        noise = var_new / kf + var_new / state.previous_k.astype(jnp.float32)
        noise = jnp.where(state.smoothness > 0, noise, 0.0)
        l_obs = jnp.sqrt(jnp.maximum(diff_sq - noise, 0.0) / jnp.maximum(learning_rate**2 * prev_sq, 1e-30))
        has_l = (state.step > 0) & (prev_sq > 0)

        debias = decay * state.debias + (1 - decay)
        new_times = decay * state.times + (1 - decay) * jnp.sort(times)
        new_var = decay * state.variance + (1 - decay) * var_new
        new_gsq = decay * state.grad_sq + (1 - decay) * gsq_obs
        if smoothness is None:  # a running mean seeded by the first observation
            seeded = jnp.where(state.smoothness > 0, decay * state.smoothness + (1 - decay) * l_obs, l_obs)
            l_ema = jnp.where(has_l, seeded, state.smoothness)
        else:
            l_ema = state.smoothness
        new = DynamicBackupState(
            step=state.step + 1,
            wall_time=state.wall_time + clock.kth_fastest(times, k),
            num_backup=(n - k).astype(jnp.int32),
            times=new_times,
            grad_sq=new_gsq,
            variance=new_var,
            smoothness=l_ema,
            debias=debias,
            previous=est32,
            previous_k=jnp.maximum(count, 1.0).astype(jnp.int32),
        )
        return estimate, new

    return Aggregator(init, aggregate, f"dynamic_backup_mean({delays.name})")


def backup_mean_gradients(
    b: int, axis_name: AxisName, delays: clock.DelayModel, seed: int = 0
) -> optax.GradientTransformationExtraArgs:
    """:func:`backup_mean` as a gradient transformation over ``axis_name`` (state:
    :class:`~optdist.comm.AggregationState` holding a :class:`BackupState` and the byte counter).

    Example::

      tx = optax.chain(backup_mean_gradients(2, "data", clock.shifted_exponential(1.0, 0.5)),
                       optax.sgd(0.1))
    """
    agg = backup_mean(b, delays, seed)
    return as_transform(agg, axis_name, check=lambda u: _checks.check_floating(u, "backup_mean_gradients"))


def dynamic_backup_mean_gradients(
    axis_name: AxisName, num_workers: int, delays: clock.DelayModel, learning_rate: float, **options: Any
) -> optax.GradientTransformationExtraArgs:
    """:func:`dynamic_backup_mean` (DBW) as a gradient transformation over ``axis_name``; ``options``
    are its ``seed``, ``smoothness``, ``decay`` and ``initial_backup``. ``learning_rate`` is the SGD
    step DBW's gain model assumes (chain the same step after it)."""
    agg = dynamic_backup_mean(num_workers, delays, learning_rate, **options)
    return as_transform(
        agg, axis_name, check=lambda u: _checks.check_floating(u, "dynamic_backup_mean_gradients")
    )
