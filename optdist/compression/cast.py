"""Low-precision cast (bf16, fp16, fp8) with a shared per-leaf scale (summable)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from optdist.compression.base import Compressor, summable

_DTYPES = {
    np.dtype(jnp.bfloat16): "bfloat16",
    np.dtype(jnp.float16): "float16",
    np.dtype(jnp.float8_e4m3fn): "float8_e4m3fn",
    np.dtype(jnp.float8_e5m2): "float8_e5m2",
}


def cast(dtype) -> Compressor:
    r"""Sends each leaf in a low-precision float dtype, summed by one all-reduce.

    .. math:: C(x) = \mathrm{dtype}(x / s) \cdot s, \qquad
              \bar x = s \cdot \sum_i \mathrm{dtype}(x_i / s) / n

    For ``float16`` and the fp8 formats, ``s`` is a power of two, identical on
    all workers, chosen so that the *sum* over ``n`` workers fits the format:
    :math:`s = 2^{\lceil \log_2(n \max_i \|x_i\|_\infty / \mathrm{max}) \rceil}` (one
    extra all-reduce (``pmax``) of one float32 per leaf). bfloat16 has float32's
    range and needs no scale (``s = 1``, no extra collective). The sum is done
    in the low-precision dtype (as a real low-precision all-reduce would).

    Payload: ``d`` entries of the dtype per leaf (2 bytes for bf16/fp16, 1 for
    fp8), all-reduced; uncompressed leaves travel in the same all-reduce.
    Stateless. Biased (round-to-nearest); non-finite inputs stay non-finite.

    Args:
      dtype: one of ``jnp.bfloat16``, ``jnp.float16``, ``jnp.float8_e4m3fn``,
        ``jnp.float8_e5m2`` (or their names).

    Returns:
      A :class:`~optdist.compression.Compressor`.

    Example::

      tx = optax.chain(optdist.compressed_mean(optdist.compressors.cast(jnp.bfloat16), "data"),
                       optax.adam(1e-3))

    References:
      Micikevicius et al., "Mixed Precision Training", ICLR 2018.
      Micikevicius et al., "FP8 Formats for Deep Learning", 2022.
    """
    try:
        dtype = np.dtype(dtype)
    except TypeError:
        dtype = None
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES.values())}; got {dtype!r}.")
    fmax = float(jnp.finfo(dtype).max)
    needs_scale = dtype != np.dtype(jnp.bfloat16)

    def prepare(flats, channel):
        if not needs_scale:
            return [None] * len(flats)
        amax = channel.pmax(jnp.stack([jnp.max(jnp.abs(f)).astype(jnp.float32) for f in flats]))
        scale = jnp.exp2(jnp.ceil(jnp.log2(amax * channel.size / fmax)))
        scale = jnp.where(amax > 0, scale, 1.0)
        return list(scale)

    def encode(x, key, scale):
        del key
        scale = 1.0 if scale is None else scale
        return {"values": (x / scale).astype(dtype)}

    def decode(payload, size, key, scale):
        del size, key
        scale = 1.0 if scale is None else scale
        return payload["values"].astype(jnp.float32) * scale

    return summable(f"cast({_DTYPES[dtype]})", encode, decode, prepare=prepare)
