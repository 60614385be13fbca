"""MASHA1 / MASHA2: extragradient with compressed operator differences and random full refreshes."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optdist import _checks
from optdist.aggregation import Aggregator, compressed
from optdist.comm.accounting import ByteCounter
from optdist.comm.axes import AxisName, validate_axis_name
from optdist.comm.channel import Channel
from optdist.comm.packing import compute_dtype
from optdist.compression.base import Compressor
from optdist.minmax.extragradient import _check_inputs, _difference, _wide


class MashaState(NamedTuple):
    """State of :func:`masha1` / :func:`masha2`.

    Attributes:
      count: iterations :math:`k` completed (int32; with ``seed`` it draws the refresh bits).
      refresh: 1 when the next call evaluates the operator at a fresh anchor :math:`w` (its full
        value is then all-reduced), 0 when it evaluates it at :math:`z^{k+1/2}` (int32).
      z: the iterate :math:`z^k` (compute dtype; identical on every worker).
      w: the anchor :math:`w^k` (identical on every worker).
      local_w: this worker's operator at the anchor, :math:`F_m(w^k)` (**per worker**).
      mean_w: :math:`F(w^k) = \\frac1M \\sum_m F_m(w^k)` (identical on every worker).
      aggregator: the compressed aggregator's state (MASHA2: the error-feedback residuals :math:`e_m`,
        **per worker**).
      bytes_sent: bytes this worker has sent.
    """

    count: jax.Array
    refresh: jax.Array
    z: Any
    w: Any
    local_w: Any
    mean_w: Any
    aggregator: Any
    bytes_sent: ByteCounter


def _masha(
    name: str, learning_rate: Any, agg: Aggregator, axis_name: AxisName, tau: Any, seed: Any
) -> optax.GradientTransformationExtraArgs:
    axis_name = validate_axis_name(axis_name)
    gamma = _checks.in_range(learning_rate, "learning_rate", 0.0, float("inf"), low_open=True, high_open=True)
    tau = _checks.in_range(tau, "tau", 0.0, 1.0, high_open=True)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int; got {seed!r}.")

    def init_fn(params):
        wide = jax.tree_util.tree_map(lambda p: jnp.asarray(p).astype(compute_dtype(p.dtype)), params)
        zeros = jax.tree_util.tree_map(jnp.zeros_like, wide)
        return MashaState(
            jnp.zeros((), jnp.int32),
            jnp.ones((), jnp.int32),
            wide,
            wide,
            zeros,
            zeros,
            agg.init(params),
            ByteCounter.zeros(axis_name),
        )

    def update_fn(updates, state, params=None, **extra):
        del extra
        _check_inputs(updates, params, name)
        g = jnp.asarray(gamma, jnp.float32)
        t = jnp.asarray(tau, jnp.float32)
        f_i = _wide(updates)
        tmap = jax.tree_util.tree_map

        def extrapolate(z, w, mean_w):  # z^{k+1/2} = τ z + (1 - τ) w - γ F(w)
            return tmap(lambda a, b, f: t * a + (1 - t) * b - g * f, z, w, mean_w)

        def refresh(channel, state):
            # params = w = z; F(w) exactly (the paper's full exchange); then the next point z^{k+1/2}.
            mean_w = _wide(channel.pmean(updates))
            nxt = extrapolate(state.z, state.w, mean_w)
            new = state._replace(refresh=jnp.zeros((), jnp.int32), local_w=f_i, mean_w=mean_w)
            return nxt, new

        def iterate(channel, state):
            # params = z^{k+1/2}; γ (F_m(z^{k+1/2}) - F_m(w^k)) compressed and averaged.
            half = extrapolate(state.z, state.w, state.mean_w)
            diff = tmap(lambda f, fw: g * (f - fw), f_i, state.local_w)
            diff = tmap(lambda d, u: d.astype(u.dtype), diff, updates)
            q, agg_state = agg.aggregate(diff, state.aggregator, channel)
            z = tmap(lambda h, c: h - c.astype(h.dtype), half, q)  # z^{k+1}
            bit_key = jax.random.fold_in(jax.random.key(seed), state.count)
            b = jax.random.uniform(bit_key) >= t  # 1 with probability 1 - τ (shared by every worker)
            w = tmap(lambda zz, ww: jnp.where(b, zz, ww), z, state.w)
            nxt = tmap(lambda zz, e: jnp.where(b, zz, e), z, extrapolate(z, w, state.mean_w))
            new = state._replace(
                count=state.count + 1, refresh=b.astype(jnp.int32), z=z, w=w, aggregator=agg_state
            )
            return nxt, new

        channel = Channel(axis_name, state.bytes_sent)
        nxt, new_state = channel.cond(state.refresh == 1, refresh, iterate, state)
        return _difference(nxt, params), new_state._replace(bytes_sent=channel.counter)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


_COMMON = r"""
    One call is one operator evaluation (a plain ``update(operator)`` transform: the parameters are
    the point where the next operator value is wanted). Iteration :math:`k` of the paper's algorithm,
    on worker :math:`m` of :math:`M` with :math:`\bar z^k = \tau z^k + (1-\tau) w^k`:

    .. math::
        z^{k+1/2} &= \bar z^k - \gamma F(w^k) \\
        z^{k+1} &= z^{k+1/2} - \frac1M \sum_m \hat\Delta_m, \qquad
            \Delta_m = \gamma\,(F_m(z^{k+1/2}) - F_m(w^k)) \\
        w^{k+1} &= z^{k+1} \text{ if } b_k = 1 \text{ else } w^k, \qquad
            b_k \sim \mathrm{Bernoulli}(1 - \tau)

    (unconstrained: the paper's prox of a regulariser :math:`h` is the identity here.) The call at
    :math:`z^{k+1/2}` sends the compressed :math:`\Delta_m`; when :math:`b_k = 1` the next call is at
    :math:`w^{k+1}` and all-reduces the full :math:`F_m(w^{k+1})` (exactly, as the paper does). The
    first call (at :math:`z^0 = w^0`, the initial parameters) is such a refresh. So an iteration costs
    :math:`1 + b_k` calls, and in expectation one compressed message plus :math:`1 - \tau` full ones;
    the byte counter records exactly what was sent (:func:`optdist.bytes_sent`), a refresh's
    all-reduce only on refresh calls (``channel.cond``).

    :math:`b_k` comes from ``fold_in(key(seed), k)`` (identical on every worker, the paper's server
    bit); the compressor's keys are those of :func:`optdist.aggregation.compressed` (its own count).
    Choosing :math:`\tau`, :math:`\gamma`: the analysis (that of the loopless variance-reduced
    extragradient MASHA builds on) balances the expected bytes with :math:`1 - \tau` about the
    compressor's kept fraction (rand-k: :math:`k/d`) and takes :math:`\gamma \propto
    \sqrt{1-\tau}/\hat L`, :math:`\hat L^2` the mean-square Lipschitz constant of the compressed
    difference (:math:`\omega L^2` for rand-k, :math:`\omega = d/k - 1`): small kept fractions need
    small steps (measured on the bilinear game of ``experiments/configs/bilinear_game.py``: rand-k 25%
    converges at :math:`\gamma = 0.2`, rand-k 5% diverges at 0.1).

    Bytes against uncompressed extragradient: the paper counts what workers send to a server; here
    every exchange is a ring all-reduce (or, for top-k, an all-gather of values and indices), whose
    per-worker bytes include the broadcast half. With shared-seed rand-k (one summable all-reduce,
    no variance reduction across workers) the expected bytes to :math:`\varepsilon` are then of the
    order of extragradient's at best: on that bilinear game (8 workers, 50 + 50 dimensions) MASHA1
    with rand-k 25% needs fewer bytes than the single-call methods but more than extragradient at
    its best step (BENCHMARKS.md).

    Deviations from the paper: compression is one-directional (workers to the all-reduce); the
    server-side (bidirectional) compression the paper also analyses is not implemented, since in an
    all-reduce every worker decodes the same aggregate (shared-seed rand-k already carries only the
    :math:`k` values). The step size is constant (no schedule).

    Non-finite policy: like :func:`optdist.mean_gradients` (wrap in :func:`optdist.skip_nonfinite`).

    Tested against a float64 NumPy reference of the rule above (``tests/minmax/test_masha.py``), not
    against the authors' code.

    Args:
      learning_rate: :math:`\gamma > 0`.
      compressor: an :class:`optdist.compression.Compressor` (see above for the kind).
      axis_name: the worker axis (str or tuple), or None for one worker.
      tau: :math:`\tau \in [0, 1)`: the anchor weight in :math:`\bar z^k` and the probability of
        keeping the anchor (no refresh).
      seed: seed of the refresh bits and of the compressor's shared keys.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` that outputs parameter updates (the move to the
      next evaluation point): chain nothing after it.

    References:
      Beznosikov, Richtárik, Diskin, Ryabinin, Gasnikov, "Distributed Methods with Compressed
      Communication for Solving Variational Inequalities, with Theoretical Guarantees",
      NeurIPS 2022, arXiv:2110.03313.
      Alacaoglu, Malitsky, "Stochastic Variance Reduction for Variational Inequality Methods",
      COLT 2022 (the loopless variance-reduced extragradient MASHA builds on).
"""


def _compressor(compressor: Any, who: str) -> Compressor:
    if not isinstance(compressor, Compressor):
        raise TypeError(
            f"{who}: compressor must be an optdist.compression.Compressor, e.g. "
            f"optdist.compressors.rand_k(0.1); got {compressor!r}."
        )
    return compressor


def masha1(
    learning_rate: float, compressor: Compressor, axis_name: AxisName = None, *, tau: float, seed: int = 0
) -> optax.GradientTransformationExtraArgs:
    compressor = _compressor(compressor, "masha1")
    agg = compressed(compressor, None, seed=seed)
    return _masha("masha1", learning_rate, agg, axis_name, tau, seed)


masha1.__doc__ = (
    r"""MASHA1: variance-reduced extragradient whose workers send *unbiased* compressed differences.

    :math:`\hat\Delta_m = Q_m(\Delta_m)` with an unbiased compressor
    (:math:`E\,Q(x) = x`, e.g. ``optdist.compressors.rand_k``): no error feedback.

    Example::

      tx = optdist.minmax.masha1(0.05, optdist.compressors.rand_k(0.1), "data", tau=0.9)
      updates, opt_state = tx.update(F(params, batch), opt_state, params)
"""
    + _COMMON
)


def masha2(
    learning_rate: float, compressor: Compressor, axis_name: AxisName = None, *, tau: float, seed: int = 0
) -> optax.GradientTransformationExtraArgs:
    compressor = _compressor(compressor, "masha2")
    agg = compressed(compressor, "ef", seed=seed)
    return _masha("masha2", learning_rate, agg, axis_name, tau, seed)


masha2.__doc__ = (
    r"""MASHA2: variance-reduced extragradient with a *contractive* compressor and error feedback.

    :math:`\hat\Delta_m = C_m(\Delta_m + e_m)`, :math:`e_m \leftarrow \Delta_m + e_m - \hat\Delta_m`
    (error feedback on the workers, :func:`optdist.aggregation.compressed` with ``feedback="ef"``),
    for a contractive :math:`C` (:math:`\|C(x) - x\|^2 \le (1-\delta)\|x\|^2`, e.g.
    ``optdist.compressors.top_k``). The residual :math:`e_m` is per worker and lives in the state.

    Example::

      tx = optdist.minmax.masha2(0.05, optdist.compressors.top_k(0.1), "data", tau=0.9)
      updates, opt_state = tx.update(F(params, batch), opt_state, params)
"""
    + _COMMON
)
