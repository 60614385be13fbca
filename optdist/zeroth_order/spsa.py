"""Seeded SPSA: zeroth-order training that sends one byte per worker and direction."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from optdist import _checks
from optdist.comm.accounting import ByteCounter
from optdist.comm.axes import AxisName, validate_axis_name
from optdist.comm.channel import Channel
from optdist.comm.packing import compute_dtype

PAYLOADS = ("int8", "float32")
_LEVELS = 127  # int8 codes in [-127, 127]; -128 is reserved for a non-finite projection
_NONFINITE_CODE = -128


class SeededSPSAState(NamedTuple):
    """State of :func:`seeded_spsa` (identical on every worker).

    Attributes:
      count: steps taken so far (int32); with ``seed`` it names every direction.
      bytes_sent: bytes this worker has sent (the gathered projections).
    """

    count: jax.Array
    bytes_sent: ByteCounter


def _direction(key: jax.Array, params: Any) -> Any:
    """z ~ N(0, I) shaped like ``params``: leaf ``l`` drawn from ``fold_in(key, l)``."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    z = [
        jax.random.normal(jax.random.fold_in(key, i), jnp.shape(leaf), compute_dtype(leaf.dtype))
        for i, leaf in enumerate(leaves)
    ]
    return jax.tree_util.tree_unflatten(treedef, z)


def _perturb(params: Any, z: Any, scale: Any) -> Any:
    return jax.tree_util.tree_map(lambda p, d: (p.astype(d.dtype) + scale * d).astype(p.dtype), params, z)


def _encode_int8(p: jax.Array, u: jax.Array, clip: Any) -> jax.Array:
    """Symmetric int8 code of ``clip(p, -clip, clip)`` with stochastic rounding by ``u ~ U[0, 1)``."""
    scaled = jnp.clip(p, -clip, clip) * (_LEVELS / clip)
    code = jnp.clip(jnp.floor(scaled + u), -_LEVELS, _LEVELS)
    return jnp.where(jnp.isfinite(p), code, _NONFINITE_CODE).astype(jnp.int8)


def _decode_int8(code: jax.Array, clip: Any) -> jax.Array:
    value = code.astype(jnp.float32) * (clip / _LEVELS)
    return jnp.where(code == _NONFINITE_CODE, jnp.nan, value)


def seeded_spsa(
    axis_name: AxisName,
    *,
    perturbation_scale: float = 1e-3,
    payload: str = "int8",
    clip: float = 10.0,
    seed: int = 0,
    num_directions: int = 1,
) -> optax.GradientTransformationExtraArgs:
    r"""Seeded SPSA: a gradient estimate from loss values, exchanging only scalar projections.

    Each worker :math:`i` of :math:`n` at step :math:`t` draws :math:`K` =
    ``num_directions`` directions :math:`z_{m} \sim \mathcal{N}(0, I)` (trees
    shaped like :math:`\theta`, :math:`m = iK + k`, :math:`k < K`) from a key
    that depends only on ``(seed, t, m)``, so every worker can regenerate every
    other worker's directions. It evaluates its own loss :math:`\ell_i` (its
    batch) twice per direction and sends the projected gradient

    .. math::
        p_m = \frac{\ell_i(\theta + \varepsilon z_m) - \ell_i(\theta - \varepsilon z_m)}{2\varepsilon}
        \approx \nabla \ell_i(\theta)^\top z_m ,

    quantized (see below) to :math:`\hat p_m`. After an all-gather of the
    :math:`nK` payloads every worker outputs the same estimate

    .. math:: \hat g = \frac{1}{nK} \sum_{m=0}^{nK-1} \hat p_m \, z_m ,

    summed in the order of :math:`m` (one direction regenerated at a time, so
    memory stays :math:`O(|\theta|)`), which makes :math:`\hat g` bit-identical
    on every worker and keeps the parameters replicated. Chain an optimizer
    after it: ``optax.chain(seeded_spsa(...), optax.sgd(lr))`` is the update
    :math:`\theta \leftarrow \theta - \eta \hat g` of the reference.
    :math:`E[z z^\top] = I`, so :math:`\hat g` is an unbiased estimate of
    :math:`\frac{1}{n} \sum_i \nabla \ell_i` when the central difference is
    exact (quadratic losses; otherwise up to :math:`O(\varepsilon^2)`) and no
    projection is clipped; its variance is about :math:`d / (nK)` times the
    squared gradient norm for :math:`d` parameters, so pair it with small
    learning rates.

    Randomness (reproducible in every execution mode): with
    ``key_m = fold_in(fold_in(key(seed), t), m)``, leaf ``l`` of :math:`z_m`
    (in ``jax.tree_util`` leaf order) is
    ``jax.random.normal(fold_in(key_m, l), leaf.shape, float32)`` (the
    leaf's dtype if wider), and the int8 rounding noise of :math:`p_m` is
    ``jax.random.uniform(fold_in(key_m, L))`` for a tree of ``L`` leaves (a
    key no leaf uses; it differs per worker because :math:`m` does).

    Payload (``payload``):

    * ``"int8"`` (default): :math:`c = \lfloor \mathrm{clip}(p, -C, C) \cdot
      127 / C + u \rfloor` with :math:`u \sim U[0, 1)` (stochastic rounding,
      unbiased for :math:`|p| \le C`; every decoded :math:`\hat p = c\,C/127` is
      within :math:`C/127` of :math:`p`). :math:`C` = ``clip`` should be a few
      times the typical :math:`|p|` (about the gradient norm): larger
      projections are clipped, which biases the step toward zero like
      gradient clipping, while the rounding noise, at most :math:`C/254` per
      projection in standard deviation, is small next to SPSA's own variance
      unless :math:`C` is hundreds of gradient norms. Each worker sends
      :math:`K` bytes: :math:`(n - 1) K` bytes per step in the all-gather.
    * ``"float32"``: :math:`p` exactly; :math:`4 (n - 1) K` bytes per step.

    The state records those bytes exactly (:func:`optdist.bytes_sent`).

    Non-finite policy: a NaN/Inf projection (a NaN or Inf loss on any worker;
    in int8 it is sent as the reserved code -128, which decodes to NaN)
    makes :math:`\hat g` NaN on every worker alike, like
    :func:`optdist.mean_gradients`; wrap the chain in
    :func:`optdist.skip_nonfinite` to skip such a step everywhere.

    Precision: the loss is evaluated at :math:`\theta \pm \varepsilon z`
    rounded to the parameters' dtype; with bfloat16/float16 parameters a
    small :math:`\varepsilon` is mostly rounded away, so use float32
    parameters (or a larger ``perturbation_scale``). :math:`\hat g` is
    returned in the parameters' dtypes.

    Args:
      axis_name: worker axis (str or tuple of str), or None for one worker
        (no communication).
      perturbation_scale: :math:`\varepsilon > 0`.
      payload: ``"int8"`` or ``"float32"``.
      clip: :math:`C > 0`, the int8 range of the projections (unused for float32).
      seed: seed of the shared directions.
      num_directions: :math:`K \ge 1` directions per worker and step (two loss
        evaluations and one payload entry each).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose
      ``update(updates, state, params, *, loss_fn)`` needs ``params`` and
      ``loss_fn(params) -> scalar``, this worker's loss on its batch
      (``optax.chain`` forwards it). ``updates`` is ignored (None or a tree
      like ``params``).

    Example::

      tx = optax.chain(optdist.seeded_spsa("data", clip=50.0), optax.sgd(1e-3))

      def train_step(params, opt_state, batch):         # one worker's view; no backward pass
          loss_fn = lambda p: loss(p, batch)
          updates, opt_state = tx.update(None, opt_state, params, loss_fn=loss_fn)
          return optax.apply_updates(params, updates), opt_state

      step = optdist.simulate(train_step, "data")

    References:
      Spall, "Multivariate Stochastic Approximation Using a Simultaneous Perturbation Gradient
      Approximation", IEEE Transactions on Automatic Control 37(3), 1992.
      Malladi, Gao, Nichani, Damian, Lee, Chen, Arora, "Fine-Tuning Language Models with Just
      Forward Passes" (MeZO), NeurIPS 2023, arXiv:2305.17333.
      Zelikman, Huang, Liang, Haber, Goodman, "Just One Byte (per gradient): A Note on
      Low-Bandwidth Decentralized Language Model Finetuning Using Shared Randomness", 2023,
      arXiv:2306.10015.
    """
    axis_name = validate_axis_name(axis_name)
    eps = _checks.in_range(
        perturbation_scale, "perturbation_scale", 0.0, math.inf, low_open=True, high_open=True
    )
    if payload not in PAYLOADS:
        raise ValueError(f"payload must be one of {PAYLOADS}; got {payload!r}.")
    clip = _checks.in_range(clip, "clip", 0.0, math.inf, low_open=True, high_open=True)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int; got {seed!r}.")
    num_directions = _checks.positive_int(num_directions, "num_directions")

    def init_fn(params):
        del params
        return SeededSPSAState(jnp.zeros((), jnp.int32), ByteCounter.zeros(axis_name))

    def update_fn(updates, state, params=None, *, loss_fn: Callable[[Any], Any] | None = None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError(
                "seeded_spsa needs the current parameters: call "
                "tx.update(updates, state, params, loss_fn=...)."
            )
        if loss_fn is None:
            raise ValueError(
                "seeded_spsa needs this worker's loss: call tx.update(updates, state, params, "
                "loss_fn=lambda p: loss(p, batch)) (optax.chain forwards loss_fn)."
            )
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be a function params -> scalar loss; got {loss_fn!r}.")
        if updates is not None:
            _checks.check_same_structure(updates, params, "params")
        _checks.check_floating(params, "seeded_spsa")

        channel = Channel(axis_name, state.bytes_sent)
        num_leaves = len(jax.tree_util.tree_leaves(params))
        step_key = jax.random.fold_in(jax.random.key(seed), state.count)

        def loss_at(p):
            value = loss_fn(p)
            if jnp.shape(value) != ():
                raise ValueError(f"loss_fn must return a scalar; got shape {jnp.shape(value)}.")
            return jnp.asarray(value).astype(jnp.float32)

        def project(k):
            key = jax.random.fold_in(step_key, channel.index * num_directions + k)
            z = _direction(key, params)
            p = (loss_at(_perturb(params, z, eps)) - loss_at(_perturb(params, z, -eps))) / (2 * eps)
            if payload == "float32":
                return p
            u = jax.random.uniform(jax.random.fold_in(key, num_leaves), (), jnp.float32)
            return _encode_int8(p, u, clip)

        codes = lax.map(project, jnp.arange(num_directions))
        gathered = channel.all_gather(codes)  # [n, K]: worker-major, so row m = i K + k
        total = channel.size * num_directions
        p_hat = gathered.reshape(total)
        p_hat = p_hat if payload == "float32" else _decode_int8(p_hat, clip)

        def accumulate(m, acc):
            z = _direction(jax.random.fold_in(step_key, m), params)
            return jax.tree_util.tree_map(lambda a, d: a + p_hat[m].astype(d.dtype) * d, acc, z)

        zeros = jax.tree_util.tree_map(lambda p: jnp.zeros_like(p, dtype=compute_dtype(p.dtype)), params)
        acc = lax.fori_loop(0, total, accumulate, zeros)
        grads = jax.tree_util.tree_map(lambda a, p: (a / total).astype(p.dtype), acc, params)
        return grads, SeededSPSAState(state.count + 1, channel.counter)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
