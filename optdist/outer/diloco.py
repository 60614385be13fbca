"""DiLoCo: inner AdamW for H steps, outer Nesterov SGD on the averaged pseudo-gradient."""

from __future__ import annotations

from typing import Any

import optax

from optdist import _checks
from optdist.comm.axes import AxisName
from optdist.outer import _precision, _validate
from optdist.outer.outer_loop import SyncEvery, outer_loop


def diloco(
    inner_lr: float | optax.Schedule,
    outer_lr: float = 0.7,
    outer_momentum: float = 0.9,
    sync_every: SyncEvery = 500,
    axis_name: AxisName = "data",
    *,
    inner_weight_decay: float = 0.1,
    inner_b1: float = 0.9,
    inner_b2: float = 0.999,
    inner_eps: float = 1e-8,
    inner_dtype: str | None = "auto",
    **kwargs: Any,
) -> optax.GradientTransformationExtraArgs:
    r"""DiLoCo (Douillard et al., 2023): AdamW locally, Nesterov momentum on the pseudo-gradient.

    Every ``H`` inner AdamW steps, with anchor ``θ``:

    .. math::

        Δ = \mathrm{mean}_i(θ - θ_i), \quad m \leftarrow μ m + Δ, \quad
        θ \leftarrow θ - η_{out}(Δ + μ m)

    (``optax.sgd(outer_lr, momentum=outer_momentum, nesterov=True)``); then every
    worker restarts from ``θ``. The inner AdamW state (per worker) is kept
    across rounds, as in the paper. The outer momentum and anchor are
    identical on every worker. Bytes: one all-reduce of the parameters per
    round (``2 (n-1) ceil(E/n) s``), zero on the other ``H - 1`` steps.
    Non-finite policy: as :func:`optdist.outer.outer_loop`.

    Half precision: with ``inner_dtype="auto"`` (default) the inner AdamW runs in float32 on
    float16 / bfloat16 leaves (float32 moments, float32 arithmetic, updates cast back to the
    parameter dtype). In float16 its ``eps = 1e-8`` rounds to 0 and squared gradients below ~2.4e-4
    underflow, so the parameter-dtype AdamW (``inner_dtype=None``, optax's behaviour) returns
    0/0 = NaN and every worker's anchor is NaN after the first sync.

    Args:
      inner_lr: AdamW learning rate (float or schedule).
      outer_lr: outer Nesterov learning rate (paper: 0.7).
      outer_momentum: outer momentum (paper: 0.9).
      sync_every: inner steps per round ``H`` (paper: 500), or a schedule.
      axis_name: the worker axis, or None.
      inner_weight_decay: AdamW decoupled weight decay (paper: 0.1).
      inner_b1, inner_b2: AdamW moment decays.
      inner_eps: AdamW's ``eps``.
      inner_dtype: ``"auto"`` (float32 inner state for half-precision leaves) or None (the
        parameters' dtype).
      **kwargs: forwarded to :func:`outer_loop` (aggregator, participation, reset_inner_state...).

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example::

      tx = optdist.diloco(inner_lr=4e-4, sync_every=50, axis_name="data")

    References:
      Douillard, Feng, Rusu, Chhaparia, Donchev, Kuncoro, Ranzato, Szlam, Shen,
      "DiLoCo: Distributed Low-Communication Training of Language Models", 2023.
    """
    kwargs = _validate.forwarded(kwargs)
    inner_lr = _validate.learning_rate(inner_lr, "inner_lr")
    outer_lr = _validate.learning_rate(outer_lr, "outer_lr")
    outer_momentum = _validate.decay(outer_momentum, "outer_momentum")
    inner_b1 = _validate.decay(inner_b1, "inner_b1")
    inner_b2 = _validate.decay(inner_b2, "inner_b2")
    inner_weight_decay = _checks.in_range(inner_weight_decay, "inner_weight_decay", 0.0, float("inf"))
    inner_eps = _checks.in_range(inner_eps, "inner_eps", 0.0, float("inf"), high_open=True)
    inner = optax.adamw(inner_lr, b1=inner_b1, b2=inner_b2, eps=inner_eps, weight_decay=inner_weight_decay)
    if _precision.inner_dtype(inner_dtype) == "auto":
        inner = _precision.float32_for_half(inner)
    outer = optax.sgd(outer_lr, momentum=outer_momentum, nesterov=True)
    return outer_loop(inner, outer, sync_every, axis_name, **kwargs)
