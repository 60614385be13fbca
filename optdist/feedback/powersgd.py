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
) -> optax.GradientTransformationExtraArgs:
    r"""PowerSGD (rank ``r``) with its error feedback, replacing gradients by the decoded mean.

    Equal to ``compressed_mean(compressors.powersgd(rank, ...), axis_name, feedback="ef")``:
    :math:`M_i = g_i + e_i`; two all-reduces (P, then Q) give :math:`\bar M = \hat P Q^\top`;
    :math:`e_i \leftarrow M_i - \bar M`; the update is :math:`\bar M`. See
    :func:`optdist.compression.powersgd` for the protocol, bytes and state
    (``Q`` shared, ``e_i`` per worker) and :func:`optdist.compressed_mean` for
    the non-finite policy.

    The error feedback is fused per batch of same-shaped matrices: :math:`M_i = g_i + e_i` with
    the projection :math:`M_i Q` in one pass, and the decoded :math:`\bar M` with the residual
    :math:`M_i - \bar M` in one pass (the compressor's ``aggregate_ef``); ``impl`` picks the
    Pallas kernels or their XLA references for those passes. ``"auto"`` runs XLA until a GPU
    measurement lists the kernels in :data:`optdist_kernels.AUTO_BACKENDS`.

    Args:
      rank: target rank ``r >= 1``.
      axis_name: worker axis, or None for one worker.
      warm_start, orthogonalization, min_compression_rate, start_step, seed, matrix_layout: see
        :func:`optdist.compression.powersgd`.
      impl: ``"auto"``, ``"pallas"`` or ``"xla"``: how the fused error-feedback steps and
        Gram–Schmidt run (see :func:`optdist.compression.powersgd`).

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
    )
    return compressed_mean(compressor, axis_name, feedback="ef", seed=seed)
