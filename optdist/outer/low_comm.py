"""Compressed-sync DiLoCo variants: SparseLoCo and MuLoCo, as outer loops with a compressing aggregator."""

from __future__ import annotations

from typing import Any

import optax

from optdist import _checks
from optdist.comm.axes import AxisName
from optdist.compression.low_bit import chunked_top_k, cyclic_top_k, quantize
from optdist.feedback.compressed_mean import compressed
from optdist.outer import _validate
from optdist.outer.outer_loop import SyncEvery, outer_loop


def sparseloco(
    inner_lr: float | optax.Schedule,
    sync_every: SyncEvery = 30,
    axis_name: AxisName = "data",
    *,
    density: float = 0.03,
    chunk_size: int = 4096,
    value_bits: int = 2,
    scale_size: int | None = None,
    indices: str = "own",
    values: str = "gathered",
    error_decay: float = 0.95,
    outer_lr: float = 1.0,
    inner_weight_decay: float = 0.1,
    **kwargs: Any,
) -> optax.GradientTransformationExtraArgs:
    r"""SparseLoCo: DiLoCo whose sync sends a chunk-wise top-k of an error-feedback accumulator at
    2 bits per value, with no outer momentum.

    Every ``H`` inner AdamW steps, on worker ``r`` with pseudo-gradient :math:`Δ_r = θ - θ_r`:

    .. math::

        e_r \leftarrow β e_r + Δ_r, \quad \hat Δ_r = Q(\mathrm{TopK}_{chunk}(e_r)), \quad
        e_r \leftarrow e_r - \hat Δ_r, \quad θ \leftarrow θ - α\, \mathrm{mean}_r \hat Δ_r

    (:func:`optdist.compression.chunked_top_k` with error feedback and ``error_decay=β``; the outer
    step is ``optax.sgd(α)``: the decayed accumulator plays the outer momentum's role). We follow
    the update of arXiv:2508.15706 (v2); its 2-bit quantizer is not specified in the text we could
    read, so the values use our 2-bit ``"uniform"`` grid ``{±s/3, ±s}`` with ``s`` the chunk's largest
    kept magnitude, nearest rounding (error feedback absorbs the bias).

    Bytes per sync: one all-gather of the packed payload, per leaf of ``d`` entries in ``R`` chunks
    with ``k`` kept each: ``R k (value_bits + ⌈log2 chunk⌉) / 8`` bytes plus ``4R`` for the scales.

    Args:
      inner_lr: AdamW learning rate.
      sync_every: ``H`` (paper: 15–30 at its scale).
      axis_name: the worker axis.
      density: kept fraction per chunk (paper: 1–3%).
      chunk_size: entries per chunk (paper: 4096, hence 12-bit indices).
      value_bits: bits per kept value (paper: 2).
      scale_size: entries per float32 value scale, a multiple of ``chunk_size`` (default: one
        scale per chunk, as in the paper); see :func:`optdist.compression.chunked_top_k`.
      indices: ``"own"`` (each worker sends its own positions, the paper) or ``"cyclic"`` (one
        worker's positions per round, in turn, sent once: :func:`optdist.compression.cyclic_top_k`;
        an optdist extension, not in the paper).
      values: with ``indices="cyclic"``, ``"gathered"`` (``value_bits`` codes, all-gathered) or
        ``"summed"`` (int8 codes on a shared scale, all-reduced).
      error_decay: β (the accumulator's decay).
      outer_lr: α.
      inner_weight_decay: AdamW decoupled weight decay.
      **kwargs: forwarded to :func:`optdist.outer_loop` (not ``aggregator``).

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    References:
      Sarfi, Thérien, Lidin, Belilovsky, "Communication Efficient LLM Pre-training with SparseLoCo",
      2025.
    """
    kwargs = _validate.forwarded(kwargs)
    if "aggregator" in kwargs:
        raise TypeError("sparseloco builds its own aggregator; use optdist.outer_loop for another one.")
    inner_lr = _validate.learning_rate(inner_lr, "inner_lr")
    outer_lr = _validate.learning_rate(outer_lr, "outer_lr")
    inner_weight_decay = _checks.in_range(inner_weight_decay, "inner_weight_decay", 0.0, float("inf"))
    if indices not in ("own", "cyclic"):
        raise ValueError(f"indices must be 'own' or 'cyclic'; got {indices!r}.")
    if indices == "own" and values != "gathered":
        raise ValueError(f"values={values!r} needs indices='cyclic' (own positions are gathered).")
    if indices == "cyclic":
        codec = cyclic_top_k(density, chunk_size, value_bits, scale_size=scale_size, values=values)
    else:
        codec = chunked_top_k(density, chunk_size, value_bits, scale_size=scale_size)
    aggregator = compressed(codec, feedback="ef", error_decay=error_decay)
    inner = optax.adamw(inner_lr, weight_decay=inner_weight_decay)
    return outer_loop(inner, optax.sgd(outer_lr), sync_every, axis_name, aggregator=aggregator, **kwargs)


def muloco(
    inner_lr: float | optax.Schedule,
    sync_every: SyncEvery = 30,
    axis_name: AxisName = "data",
    *,
    bits: int = 2,
    chunk_size: int = 4096,
    outer_lr: float = 0.7,
    outer_momentum: float = 0.9,
    inner_weight_decay: float = 0.0,
    adam_learning_rate: float | optax.Schedule | None = None,
    muon_dimension_numbers: Any = None,
    aggregator: Any = None,
    **kwargs: Any,
) -> optax.GradientTransformationExtraArgs:
    r"""MuLoCo: DiLoCo with Muon as the inner optimizer and error-feedback low-bit pseudo-gradients.

    Inner: ``optax.contrib.muon(inner_lr, weight_decay=...)``: Muon on the leaves
    ``muon_dimension_numbers`` marks (by default every 2-D leaf, optax's default), AdamW at
    ``adam_learning_rate`` on the rest. Jordan et al. recommend Muon for the hidden matrices only,
    AdamW for the embeddings, the output head and the non-matrix parameters (the paper uses their
    Muon; the part of its text we could read does not state the split): pass
    ``muon_dimension_numbers`` (None for an AdamW leaf) and an AdamW learning rate to get it.
    Sync: :math:`p_r = Δ_r + e_r`, send :math:`Q_b(p_r)`
    (:func:`optdist.compression.quantize` with ``bits`` bits, per-chunk scale, stochastic rounding),
    :math:`e_r \leftarrow p_r - Q_b(p_r)`; outer Nesterov SGD on the mean, as DiLoCo.

    Args:
      inner_lr: Muon learning rate.
      sync_every: ``H``.
      axis_name: the worker axis.
      bits: bits per pseudo-gradient entry (paper: 2).
      chunk_size: entries per quantization scale.
      outer_lr, outer_momentum: the outer Nesterov step.
      inner_weight_decay: Muon's decoupled weight decay.
      adam_learning_rate: the learning rate of the AdamW part (leaves Muon does not take); None:
        ``inner_lr`` (optax's default; an AdamW step as large as Muon's is usually far too large).
      muon_dimension_numbers: forwarded to ``optax.contrib.muon``'s ``muon_weight_dimension_numbers``:
        a tree (or a function of the parameters returning one) of
        ``optax.contrib.MuonDimensionNumbers`` for the Muon leaves and None for the AdamW ones;
        None: Muon on every 2-D leaf.
      aggregator: the sync's :class:`~optdist.comm.Aggregator`; None: the paper's,
        ``compressed(quantize(bits, chunk_size=chunk_size), "ef")``. Given, ``bits`` and ``chunk_size``
        must keep their defaults (they describe the paper's sync only).
      **kwargs: forwarded to :func:`optdist.outer_loop` (not ``aggregator``).

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    References:
      Thérien et al., "MuLoCo: Muon is a practical inner optimizer for DiLoCo", 2025.
    """
    kwargs = _validate.forwarded(kwargs)
    if aggregator is not None and (bits, chunk_size) != (2, 4096):
        raise ValueError(
            f"muloco(bits={bits}, chunk_size={chunk_size}) describes the paper's sync, which "
            "`aggregator` replaces: leave bits and chunk_size at their defaults, or drop aggregator."
        )
    inner_lr = _validate.learning_rate(inner_lr, "inner_lr")
    outer_lr = _validate.learning_rate(outer_lr, "outer_lr")
    outer_momentum = _validate.decay(outer_momentum, "outer_momentum")
    if adam_learning_rate is not None:
        adam_learning_rate = _validate.learning_rate(adam_learning_rate, "adam_learning_rate")
    if aggregator is None:
        aggregator = compressed(quantize(bits, chunk_size=chunk_size), feedback="ef")
    inner = optax.contrib.muon(
        inner_lr,
        weight_decay=inner_weight_decay,
        adam_learning_rate=adam_learning_rate,
        muon_weight_dimension_numbers=muon_dimension_numbers,
    )
    outer = optax.sgd(outer_lr, momentum=outer_momentum, nesterov=True)
    return outer_loop(inner, outer, sync_every, axis_name, aggregator=aggregator, **kwargs)
