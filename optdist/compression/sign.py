"""Sign compression: 1 bit per entry, scaled (EF-signSGD) or majority vote (signSGD)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from optdist.comm.channel import ordered_sum
from optdist.compression.base import Compressor, gathered, mean_over_workers, pack_bits, unpack_bits


def _majority_vote(decoded: jax.Array) -> jax.Array:
    return jnp.sign(ordered_sum(decoded))


def sign(scaled: bool = True) -> Compressor:
    r"""Sign of each entry, packed 8 per uint8 byte; gathered protocol.

    ``scaled=True`` (EF-signSGD): per leaf

    .. math:: C(x) = \frac{\|x\|_1}{d} \, \mathrm{sign}(x), \qquad
              \|C(x) - x\|^2 = \Big(1 - \frac{\|x\|_1^2}{d \|x\|_2^2}\Big) \|x\|^2,

    a contraction with :math:`\delta = \|x\|_1^2 / (d\|x\|_2^2)`; the aggregate is
    the mean of the workers' decoded messages. Use with error feedback.
    Payload: ``ceil(d/8)`` bytes + one float32 scale.

    ``scaled=False`` (signSGD with majority vote): the payload is the bits only
    and the aggregate is :math:`\mathrm{sign}(\sum_i \mathrm{sign}(x_i))`
    (0 on ties); the step size comes from the optimizer chained after.

    Zero entries are sent as ``+1`` (one bit has no zero). Leaves where the
    payload would not be smaller go uncompressed through the plain mean.
    Stateless.

    Args:
      scaled: scale by :math:`\|x\|_1/d` (True) or majority vote of raw signs (False).

    Returns:
      A :class:`~optdist.compression.Compressor`.

    Example::

      tx = optax.chain(optdist.compressed_mean(optdist.compressors.sign(), "data", feedback="ef"),
                       optax.sgd(0.01))

    References:
      Karimireddy, Rebjock, Stich, Jaggi, "Error Feedback Fixes SignSGD and other
      Gradient Compression Schemes", ICML 2019.
      Bernstein, Wang, Azizzadenesheli, Anandkumar, "signSGD: Compressed Optimisation
      for Non-Convex Problems", ICML 2018.
    """
    if not isinstance(scaled, bool):
        raise TypeError(f"scaled must be a bool; got {scaled!r}.")

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
