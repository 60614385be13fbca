r"""A seeded simulated clock: per-step, per-worker compute times from a documented distribution.

A :class:`DelayModel` draws the compute time (seconds) of each of ``n`` workers for one step:
``model.sample(key, n) -> [n] float32``. :func:`compute_times` derives the key from a seed and the
step number (``fold_in(key(seed), step)``), so every worker draws the *same* ``[n]`` vector for a
step without any communication, a run is reproducible, and the step may be traced.

Distributions (times are i.i.d. over workers and steps, optionally scaled per worker):

* :func:`exponential`: :math:`T \sim \mathrm{Exp}(\text{mean})`;
* :func:`shifted_exponential`: :math:`T = \text{shift} + \mathrm{Exp}(\text{mean})` (a fixed compute
  time plus a random slowdown: the model of most straggler papers, e.g. Lee et al. 2018);
* :func:`pareto`: :math:`P(T > t) = (\text{scale}/t)^\alpha`, :math:`t \ge \text{scale}` (heavy tail);
* :func:`lognormal`: :math:`\log T \sim \mathcal N(\mu, \sigma^2)`;
* :func:`constant`: every worker takes ``time`` (no stragglers).

``worker_scale`` (a length-``n`` sequence) multiplies worker ``i``'s time by ``worker_scale[i]``
(persistently slow machines). The step's wall time when the server waits for the ``k`` fastest
workers is the ``k``-th order statistic of the vector (:func:`kth_fastest`); communication time is not
modelled here (report bytes next to it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from optdist import _checks
from optdist._tree import instances


class DelayModel(NamedTuple):
    """``sample(key, n) -> [n]`` float32 compute times (seconds); ``name`` and ``mean`` for reports.

    Attributes:
      sample: the sampler.
      name: e.g. ``"shifted_exponential(1.0, 0.5)"``.
      mean: the expected time of a worker with scale 1 (``inf`` for a Pareto with ``alpha <= 1``).
    """

    sample: Callable[[jax.Array, int], jax.Array]
    name: str
    mean: float


def _scaled(draw: Callable[[jax.Array, tuple[int]], jax.Array], worker_scale: Sequence[float] | None):
    scale = None
    if worker_scale is not None:
        scale = tuple(
            _checks.in_range(s, "worker_scale[i]", 0.0, float("inf"), low_open=True) for s in worker_scale
        )

    def sample(key, n):
        t = draw(key, (n,)).astype(jnp.float32)
        if scale is None:
            return t
        if len(scale) != n:
            raise ValueError(f"worker_scale has {len(scale)} entries for {n} workers: pass one per worker.")
        return t * jnp.asarray(scale, jnp.float32)

    return sample


def _positive(value: Any, name: str) -> float:
    return _checks.in_range(value, name, 0.0, float("inf"), low_open=True)


def exponential(mean: float = 1.0, worker_scale: Sequence[float] | None = None) -> DelayModel:
    r"""Exponential compute times, :math:`T \sim \mathrm{Exp}` with mean ``mean`` (> 0)."""
    mean = _positive(mean, "mean")
    return DelayModel(
        _scaled(lambda k, s: mean * jax.random.exponential(k, s), worker_scale), f"exponential({mean})", mean
    )


def shifted_exponential(
    shift: float = 1.0, mean: float = 0.5, worker_scale: Sequence[float] | None = None
) -> DelayModel:
    r""":math:`T = \text{shift} + E`, :math:`E \sim \mathrm{Exp}` with mean ``mean``
    (``shift >= 0``, ``mean > 0``); :math:`\mathbb E T = \text{shift} + \text{mean}`."""
    shift = _checks.in_range(shift, "shift", 0.0, float("inf"))
    mean = _positive(mean, "mean")
    draw = lambda k, s: shift + mean * jax.random.exponential(k, s)  # noqa: E731
    return DelayModel(_scaled(draw, worker_scale), f"shifted_exponential({shift}, {mean})", shift + mean)


def pareto(scale: float = 1.0, alpha: float = 2.0, worker_scale: Sequence[float] | None = None) -> DelayModel:
    r"""Pareto (type I) times: :math:`P(T > t) = (\text{scale}/t)^{\alpha}` for :math:`t \ge` ``scale``;
    mean :math:`\alpha\,\text{scale}/(\alpha - 1)` for :math:`\alpha > 1` (infinite otherwise).
    Sampled by inversion, :math:`T = \text{scale}\, U^{-1/\alpha}`."""
    scale = _positive(scale, "scale")
    alpha = _positive(alpha, "alpha")
    draw = lambda k, s: scale * jax.random.uniform(k, s, minval=jnp.finfo(jnp.float32).tiny) ** (-1.0 / alpha)  # noqa: E731
    m = alpha * scale / (alpha - 1) if alpha > 1 else float("inf")
    return DelayModel(_scaled(draw, worker_scale), f"pareto({scale}, {alpha})", m)


def lognormal(mu: float = 0.0, sigma: float = 0.5, worker_scale: Sequence[float] | None = None) -> DelayModel:
    r"""Log-normal times, :math:`\log T \sim \mathcal N(\mu, \sigma^2)`; mean :math:`e^{\mu + \sigma^2/2}`."""
    mu = _checks.in_range(mu, "mu", float("-inf"), float("inf"))
    sigma = _checks.in_range(sigma, "sigma", 0.0, float("inf"))
    draw = lambda k, s: jnp.exp(mu + sigma * jax.random.normal(k, s))  # noqa: E731
    return DelayModel(
        _scaled(draw, worker_scale), f"lognormal({mu}, {sigma})", float(jnp.exp(mu + sigma**2 / 2))
    )


def constant(time: float = 1.0, worker_scale: Sequence[float] | None = None) -> DelayModel:
    """Every worker takes ``time`` seconds (times ``worker_scale[i]``): no randomness."""
    time = _positive(time, "time")
    return DelayModel(_scaled(lambda k, s: jnp.full(s, time), worker_scale), f"constant({time})", time)


def check_delay_model(model: Any, who: str) -> DelayModel:
    if not isinstance(model, DelayModel):
        raise TypeError(
            f"{who}: delays must be an optdist.stragglers.clock.DelayModel (e.g. "
            f"clock.shifted_exponential(1.0, 0.5)); got {model!r}."
        )
    return model


def compute_times(model: DelayModel, seed: int, step: Any, n: int) -> jax.Array:
    """The ``[n]`` compute times of step ``step`` (int, may be traced): the same on every worker."""
    return model.sample(jax.random.fold_in(jax.random.key(seed), jnp.asarray(step, jnp.uint32)), n)


def fastest_mask(times: jax.Array, k: Any) -> jax.Array:
    """``[n]`` bool: the ``k`` smallest times (ties broken by lower worker index); ``k`` may be traced."""
    n = times.shape[0]
    order = jnp.argsort(times, stable=True)
    rank = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
    return rank < k


def kth_fastest(times: jax.Array, k: Any) -> jax.Array:
    """The ``k``-th smallest time (1-based): the step's wall time when the server waits for ``k``."""
    return jnp.sort(times)[jnp.asarray(k, jnp.int32) - 1]


def simulated_time(state: Any) -> float | None:
    """The simulated wall time (seconds) recorded in ``state`` by the straggler aggregators
    (:class:`~optdist.stragglers.backup.BackupState`, ``DynamicBackupState``,
    :class:`~optdist.stragglers.gradient_coding.CodedMeanState`): the largest over the states found and
    over workers (they agree), or None when ``state`` holds none. Host-side (reads the values)."""
    from optdist.stragglers.backup import BackupState, DynamicBackupState
    from optdist.stragglers.gradient_coding import CodedMeanState

    kinds = (BackupState, DynamicBackupState, CodedMeanState)
    found = [float(np.max(np.asarray(x.wall_time))) for x in instances(state, kinds)]
    return max(found) if found else None
