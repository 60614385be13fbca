"""Deprecated name: ``threshold_top_k`` is ``top_k(ratio, method="fused_threshold", ...)``."""

from __future__ import annotations

import warnings

from optdist.compression.base import Compressor
from optdist.compression.top_k import top_k


def threshold_top_k(
    ratio: float,
    tol: float = 0.1,
    sample_size: int = 4096,
    max_refine: int = 4,
    impl: str = "auto",
) -> Compressor:
    """Deprecated: ``top_k(ratio, "fused_threshold", sample_size, tol=, max_refine=, impl=)``.

    Sparsification by a sampled magnitude threshold (no sort) on the fused error-feedback + top-k
    kernel; see :func:`~optdist.compression.top_k` (this returns exactly that compressor).

    Args:
      ratio: target fraction of coordinates kept, in (0, 1].
      tol: accepted relative shortfall/excess of the kept count, in [0, 1); sets the capacity.
      sample_size: coordinates sampled for the threshold estimate (``>= 1``).
      max_refine: extra counting passes allowed (``>= 0``).
      impl: ``"auto"``, ``"pallas"`` or ``"xla"``.

    Returns:
      The :func:`~optdist.compression.top_k` compressor with ``method="fused_threshold"``.
    """
    warnings.warn(
        "optdist.compressors.threshold_top_k is deprecated; use "
        'optdist.compressors.top_k(ratio, method="fused_threshold") (the same compressor).',
        DeprecationWarning,
        stacklevel=2,
    )
    return top_k(ratio, "fused_threshold", sample_size, tol=tol, max_refine=max_refine, impl=impl)
