r"""Threshold top-k with a fixed-capacity payload, on the fused error-feedback + top-k kernel."""

from __future__ import annotations

import math

from optdist import _checks
from optdist.compression.base import Compressor, gathered_ef
from optdist.compression.top_k import num_kept


def threshold_top_k(
    ratio: float,
    tol: float = 0.1,
    sample_size: int = 4096,
    max_refine: int = 4,
    impl: str = "auto",
) -> Compressor:
    r"""Sparsification by a sampled magnitude threshold (no sort), fused with error feedback.

    The semantics of :func:`optdist_kernels.ef_threshold_topk`: with :math:`k = \lceil
    \mathrm{ratio}\cdot d\rceil` and capacity :math:`c = \min(d, \lfloor k(1 + \mathrm{tol})\rfloor)`,
    a threshold :math:`t` is estimated from ``sample_size`` random coordinates of :math:`|x|` and
    refined by counting passes (at most ``max_refine``) until between :math:`k(1 - \mathrm{tol})` and
    :math:`c` entries pass; the payload holds the entries with :math:`|x_j| \ge t` (at most :math:`c`,
    lowest indices first) and their int32 indices:

    .. math:: C(x) = \sum_{j \in S} x_j e_j, \qquad S = \{j : |x_j| \ge t\} \text{ (first } c\text{)}.

    So :math:`|S|` is only approximately ``k`` (exact top-k when the threshold is exact), and
    :math:`e_{\mathrm{new}} + C(p) = p` holds exactly. This differs from
    ``top_k(ratio, method="threshold")`` (candidate buffer of ``2k`` then an exact top-k of it),
    which is unchanged.

    Protocol (gathered): each worker's payload is all-gathered; the receive side scatter-adds the
    ``n`` payloads in worker order and divides by ``n``. With
    ``compressed_mean(..., feedback="ef")`` the fused kernel computes :math:`p = g + e`, the payload
    and the residual (``p`` off the kept set, 0 on it) in one write pass. Leaves where the payload
    would not be smaller, and scalars, go uncompressed through one all-reduce mean.

    Bytes per compressed leaf: ``c`` float32 values + ``c`` int32 indices + a 4-byte int32 count,
    all-gathered (each worker sends ``(n - 1)`` times that). Stateless (the EF residual, per worker,
    lives in ``compressed_mean``). The threshold sample uses a key that differs per worker.
    Non-finite policy: that of :func:`optdist.compressed_mean` (a NaN entry is never kept: it stays
    in this worker's residual, where the entry-wise guard keeps its previous value).

    Args:
      ratio: target fraction of coordinates kept, in (0, 1].
      tol: accepted relative shortfall/excess of the kept count, in [0, 1); sets the capacity.
      sample_size: coordinates sampled for the threshold estimate (``>= 1``).
      max_refine: extra counting passes allowed (``>= 0``).
      impl: ``"auto"``, ``"pallas"`` or ``"xla"`` (the receive side is an XLA scatter either way).

    Returns:
      A :class:`~optdist.compression.Compressor` (with a fused ``aggregate_ef``).

    Example::

      tx = optax.chain(
          optdist.compressed_mean(optdist.compressors.threshold_top_k(0.01), "data", feedback="ef"),
          optax.sgd(0.1))

    References:
      Stich, Cordonnier, Jaggi, "Sparsified SGD with Memory", NeurIPS 2018.
      Shi, Chu, Cheung, See, "Understanding Top-k Sparsification in Distributed Deep Learning",
      2019 (threshold estimation instead of sorting).
    """
    from optdist_kernels import topk
    from optdist_kernels._dispatch import IMPLS

    ratio = _checks.in_range(ratio, "ratio", 0.0, 1.0, low_open=True)
    tol = _checks.in_range(tol, "tol", 0.0, 1.0, high_open=True)
    sample_size = _checks.positive_int(sample_size, "sample_size")
    if isinstance(max_refine, bool) or not isinstance(max_refine, int) or max_refine < 0:
        raise ValueError(f"max_refine must be an int >= 0; got {max_refine!r}.")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}; got {impl!r}.")

    def encode_ef(x, e, key):
        d = x.shape[0]
        k = num_kept(ratio, d)
        capacity = min(d, math.floor(k * (1.0 + tol)))
        return topk.ef_threshold_topk(
            x,
            e,
            key,
            k,
            capacity=capacity,
            tol=tol,
            sample_size=sample_size,
            max_refine=max_refine,
            impl=impl,
        )

    def decode_accumulate(payload, acc):
        # Slots from ``count`` on hold value 0 at index 0: adding them changes nothing.
        return acc.at[payload["indices"]].add(payload["values"].astype(acc.dtype))

    return gathered_ef(f"threshold_top_k({ratio:g})", encode_ef, decode_accumulate)
