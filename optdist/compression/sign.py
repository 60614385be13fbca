"""Sign compression: 1 bit per entry, scaled (EF-signSGD, per leaf or per bucket) or majority vote."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from optdist.comm.channel import ordered_sum
from optdist.compression.base import Compressor, gathered, mean_over_workers, pack_bits, unpack_bits
from optdist.compression.bucketed import check_bucket_size, fused_quantizer


def _majority_vote(decoded: jax.Array) -> jax.Array:
    return jnp.sign(ordered_sum(decoded))


def sign(scaled: bool = True, bucket_size: int | None = None, impl: str = "auto") -> Compressor:
    r"""Sign of each entry, 1 bit per entry; gathered protocol.

    ``scaled=True`` (EF-signSGD): per leaf (``bucket_size=None``)

    .. math:: C(x) = \frac{\|x\|_1}{d} \, \mathrm{sign}(x), \qquad
              \|C(x) - x\|^2 = \Big(1 - \frac{\|x\|_1^2}{d \|x\|_2^2}\Big) \|x\|^2,

    a contraction with :math:`\delta = \|x\|_1^2 / (d\|x\|_2^2)`; the aggregate is
    the mean of the workers' decoded messages. Use with error feedback.
    Payload: ``ceil(d/8)`` bytes (8 signs per uint8) + one float32 scale.

    ``bucket_size=b`` (with ``scaled=True``): one scale per bucket :math:`B` of ``b`` consecutive
    entries (its real entries only), :math:`C(x)_j = \frac{\|x_B\|_1}{|B|}\mathrm{sign}(x_j)`, on
    the fused error-feedback kernel :func:`optdist_kernels.ef_quantize` (``scheme="sign"``; finer
    buckets track magnitudes better at 4 bytes per bucket). Payload: ``ceil(d/b)·b/8`` bytes of bits
    (32 per uint32) + 4 per bucket; a fused ``aggregate_ef`` for ``feedback="ef"``; ``impl`` picks
    Pallas or its XLA reference (protocol: :mod:`optdist.compression.bucketed`). The deprecated
    ``scaled_sign(b)`` returns this compressor.

    ``scaled=False`` (signSGD with majority vote): the payload is the bits only
    and the aggregate is :math:`\mathrm{sign}(\sum_i \mathrm{sign}(x_i))`
    (0 on ties); the step size comes from the optimizer chained after.

    Zero entries are sent as ``+1`` (one bit has no zero). Leaves where the
    payload would not be smaller (and empty leaves) go uncompressed through the plain mean.
    Stateless.

    Args:
      scaled: scale by :math:`\|x\|_1/d` (True) or majority vote of raw signs (False).
      bucket_size: None (one scale per leaf) or entries per bucket, a power of two ``>= 32``
        (needs ``scaled=True``).
      impl: ``"auto"``, ``"pallas"`` or ``"xla"`` for the bucketed kernel (``"pallas"`` needs
        ``bucket_size``).

    Returns:
      A :class:`~optdist.compression.Compressor` (with a fused ``aggregate_ef`` when bucketed).

    Example::

      tx = optax.chain(optdist.compressed_mean(optdist.compressors.sign(), "data", feedback="ef"),
                       optax.sgd(0.01))
      tx = optax.chain(optdist.compressed_mean(optdist.compressors.sign(bucket_size=256), "data",
                                               feedback="ef"), optax.sgd(0.01))

    References:
      Karimireddy, Rebjock, Stich, Jaggi, "Error Feedback Fixes SignSGD and other
      Gradient Compression Schemes", ICML 2019.
      Bernstein, Wang, Azizzadenesheli, Anandkumar, "signSGD: Compressed Optimisation
      for Non-Convex Problems", ICML 2018.
    """
    from optdist_kernels import resolve_impl

    if not isinstance(scaled, bool):
        raise TypeError(f"scaled must be a bool; got {scaled!r}.")
    if bucket_size is not None:
        if not scaled:
            raise ValueError(
                "bucket_size needs scaled=True (a majority vote has no scale to bucket); "
                f"got bucket_size={bucket_size!r} with scaled=False."
            )
        bucket_size = check_bucket_size(bucket_size, 32, "32 signs per uint32 word")
        return fused_quantizer(f"sign(bucket_size={bucket_size})", "sign", bucket_size, "nearest", impl)
    resolve_impl(impl, unsupported="sign(bucket_size=None) has no kernel; give bucket_size for the fused one")

    def encode(x, key):
        del key
        payload = {"bits": pack_bits(x >= 0)}
        if scaled:
            payload["scale"] = (jnp.sum(jnp.abs(x)) / x.shape[0]).astype(jnp.float32)
        return payload

    def decode(payload, size):
        signs = jnp.where(unpack_bits(payload["bits"], size), 1.0, -1.0)
        return signs * payload["scale"] if scaled else signs

    combine = mean_over_workers if scaled else _majority_vote
    return gathered(f"sign(scaled={scaled})", encode, decode, combine=combine)
