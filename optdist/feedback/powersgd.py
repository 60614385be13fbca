"""optdist.powersgd: PowerSGD with error feedback, as a ready-made transform."""

from __future__ import annotations

import optax

from optdist.comm.axes import AxisName
from optdist.compression.powersgd import powersgd as powersgd_compressor
from optdist.feedback.compressed_mean import compressed_mean


def powersgd(
    rank: int,
    axis_name: AxisName,
    *,
    warm_start: bool = True,
    orthogonalization: str = "auto",
    min_compression_rate: float = 2.0,
    start_step: int = 0,
    seed: int = 0,
    matrix_layout: str = "channels_last",
    impl: str = "auto",
    orthogonalize_q: bool = True,
) -> optax.GradientTransformationExtraArgs:
    r"""PowerSGD (rank ``r``) with its error feedback, replacing gradients by the decoded mean.

    Equal to ``compressed_mean(compressors.powersgd(rank, ...), axis_name, feedback="ef")``:
    :math:`M_i = g_i + e_i`; two all-reduces (P, then Q) give :math:`\bar M = \hat P Q^\top`;
    :math:`e_i \leftarrow M_i - \bar M`; the update is :math:`\bar M`. See
    :func:`optdist.compression.powersgd` for the protocol, bytes and state
    (``Q`` shared, ``e_i`` per worker) and :func:`optdist.compressed_mean` for
    the non-finite policy.

    The warm-started ``Q`` is re-orthogonalized before :math:`P = M Q`, as PyTorch's hook does
    (``orthogonalize_q=True``; False is the paper's form, the same in exact arithmetic but
    ``cond(M)^2`` instead of ``cond(M)`` in float32).

    The error feedback is fused (the compressor's ``aggregate_ef``): on the XLA path per matrix,
    :math:`M_i = g_i + e_i` written once and read in place by both products, the decoded
    :math:`\bar M` fused into the output and residual writes; ``impl="pallas"`` runs the same
    steps as Pallas kernels per batch of same-shaped matrices. ``"auto"`` runs XLA until a GPU
    measurement lists the kernels in :data:`optdist_kernels.AUTO_BACKENDS`.

    Residuals: :math:`e_i - \bar e = \sum_t (g_{i,t} - \bar g_t)` exactly (only the mean is
    compressed), so each worker's residual grows like :math:`\sqrt t` under i.i.d. gradient noise
    while the mean residual :math:`\bar e` stays bounded (numbers in
    :func:`optdist.compression.powersgd`); this is inherent to the protocol, not drift.

    Args:
      rank: target rank ``r >= 1``.
      axis_name: worker axis, or None for one worker.
      warm_start, orthogonalization, min_compression_rate, start_step, seed, matrix_layout: see
        :func:`optdist.compression.powersgd`.
      impl: ``"auto"``, ``"pallas"`` or ``"xla"``: how the fused error-feedback steps and
        Gram–Schmidt run (see :func:`optdist.compression.powersgd`).
      orthogonalize_q: re-orthogonalize the warm-started ``Q`` each step (PyTorch's hook, default)
        or not (the paper's Algorithm 1); see :func:`optdist.compression.powersgd`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example::

      tx = optax.chain(optdist.powersgd(4, "data"), optax.sgd(0.1, momentum=0.9))

    References:
      Vogels, Karimireddy, Jaggi, "PowerSGD: Practical Low-Rank Gradient Compression for
      Distributed Optimization", NeurIPS 2019.
    """
    compressor = powersgd_compressor(
        rank,
        warm_start=warm_start,
        orthogonalization=orthogonalization,
        min_compression_rate=min_compression_rate,
        start_step=start_step,
        seed=seed,
        matrix_layout=matrix_layout,
        impl=impl,
        orthogonalize_q=orthogonalize_q,
    )
    return compressed_mean(compressor, axis_name, feedback="ef", seed=seed)
