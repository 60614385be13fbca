r"""The fused-kernel path of the bucketed quantizers, and the deprecated names of its encodings.

:func:`fused_quantizer` builds the compressor behind ``qsgd(..., fused=True)``,
``terngrad(None, bucket_size=b)`` and ``sign(bucket_size=b)``: exactly the semantics of
:func:`optdist_kernels.ef_quantize` (the fused ``p = g + e``, quantize, ``e <- p - decode`` kernel, or
its XLA reference), received with :func:`optdist_kernels.decode_accumulate`.

Protocol (gathered): every worker's payload (codes + one float32 scale per bucket; the kernel's
padding rows are not sent) is all-gathered, and the receive side sums the ``n`` payloads with the
fused decode + accumulate in worker order, then divides by ``n``. With
``compressed_mean(..., feedback="ef")`` the encoder is the fused kernel: :math:`p = g + e` (float32),
the payload, and :math:`e \leftarrow p - D(\mathrm{payload})` in one pass (the residual is stored in
the leaf's dtype, per worker). Leaves whose payload would not be smaller (e.g. a bias shorter than
a bucket), scalars and empty leaves go uncompressed through one all-reduce mean (their residual is 0).

State: none. Randomness: stochastic rounding draws from a counter-based hash of (the step key
folded with the worker index and the leaf index; the element index): different per worker,
reproducible. Non-finite policy: that of :func:`optdist.compressed_mean` (a non-finite entry makes
its bucket's scale, hence the mean, non-finite, and the step's state update is skipped).

``impl``: ``"xla"`` runs the pure-JAX reference, ``"pallas"`` the Pallas kernel (interpret mode off
GPU), ``"auto"`` the kernel only where it was measured faster, else XLA (never fails;
:func:`optdist_kernels.resolve_impl`). All three give the same codes (the kernel and the reference
share the block math and the hash RNG).

Deprecated names (each returns the unified compressor with the matching options, bit for bit):

* ``int8(b, rounding, impl)`` = ``qsgd(127, b, scale="max", rounding=rounding, fused=True, impl=impl)``
* ``ternary(b, rounding, impl)`` = ``terngrad(None, bucket_size=b, rounding=rounding, impl=impl)``
* ``scaled_sign(b, impl)`` = ``sign(scaled=True, bucket_size=b, impl=impl)``
"""

from __future__ import annotations

import math
import warnings

import jax.numpy as jnp

from optdist.compression.base import Compressor, gathered_ef

ROUNDINGS = ("stochastic", "nearest")


def check_rounding(rounding: str) -> str:
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}; got {rounding!r}.")
    return rounding


def check_bucket_size(bucket_size: int, minimum: int, why: str) -> int:
    """A power of two ``>= minimum`` (what the fused kernel's bucket rows need)."""
    if isinstance(bucket_size, bool) or not isinstance(bucket_size, int):
        raise TypeError(f"bucket_size must be an int; got {bucket_size!r}.")
    if bucket_size < minimum or bucket_size & (bucket_size - 1):
        raise ValueError(f"bucket_size must be a power of two >= {minimum} ({why}); got {bucket_size}.")
    return bucket_size


def fused_quantizer(
    name: str,
    scheme: str,
    bucket_size: int,
    rounding: str,
    impl: str,
    *,
    norm: str = "max",
    levels: int = 127,
) -> Compressor:
    """The gathered protocol around :func:`optdist_kernels.ef_quantize` (module docstring).

    ``scheme``, ``norm``, ``levels``, ``rounding`` and ``bucket_size`` are the kernel's; payloads are
    trimmed to the real buckets (the kernel pads rows to its block; those rows are not sent).
    """
    from optdist_kernels import decode_accumulate, ef_quantize, resolve_impl

    resolve_impl(impl, "ef_quantize")  # validates impl (the kernel entry points decide per shape)

    encode_xla = _xla_encoder(scheme, bucket_size, rounding, norm, levels)

    def encode_ef(x, e, key):
        if resolve_impl(impl, "ef_quantize") == "xla":
            return encode_xla(x, e, key)
        payload, e_new = ef_quantize(
            x,
            e,
            key,
            scheme=scheme,
            rounding=rounding,
            norm=norm,
            levels=levels,
            bucket_size=bucket_size,
            impl=impl,
        )
        buckets = math.ceil(x.shape[0] / bucket_size)
        return {"codes": payload["codes"][:buckets], "scales": payload["scales"][:buckets]}, e_new

    def decode_into(payload, acc):
        if acc.shape[0] == 0:  # an empty leaf: nothing to decode (it travels uncompressed anyway)
            return acc
        return decode_accumulate(payload, acc, scheme=scheme, bucket_size=bucket_size, impl=impl)

    # The sign's bit-packed words: a scan over the workers keeps their unpacking out of the consumers.
    return gathered_ef(name, encode_ef, decode_into, receive="scan" if scheme == "sign" else "unrolled")


def _xla_encoder(scheme: str, bucket_size: int, rounding: str, norm: str, levels: int):
    """The XLA path of :func:`optdist_kernels.ef_quantize` on the real buckets only, same codes.

    The kernel's reference pads ``g`` and ``e`` separately to its 8-bucket row blocks (two copies of
    every ragged leaf), adds them, and then trims the payload; here ``p = g + e`` is padded once, to
    whole buckets only, and the payload comes out trimmed. The block math is the kernel's own
    (``_encode_block``, per bucket row), so codes, scales and residuals are those of
    ``ef_quantize(..., impl="xla")`` on every real bucket.
    """
    from optdist_kernels import seeds_from_key
    from optdist_kernels.quantize import Config, _encode_block, _split

    cfg = Config(scheme, rounding, norm, levels, bucket_size)

    def encode(x, e, key):
        d = x.shape[0]
        rows = max(1, -(-d // bucket_size))
        pad = rows * bucket_size - d
        if rounding == "stochastic" and scheme != "sign":
            seeds = seeds_from_key(key)
        else:
            seeds = jnp.zeros((2,), jnp.uint32)
        p = x.astype(jnp.float32) + e.astype(jnp.float32)
        p = (jnp.pad(p, (0, pad)) if pad else p).reshape(rows, bucket_size)
        words, scales, e_new = _encode_block(_split(p, cfg), 0, d, seeds, cfg)
        e_new = (e_new[0] if len(e_new) == 1 else jnp.concatenate(e_new, axis=1)).reshape(-1)
        if d == 0:  # an empty leaf (only sized, never sent): no bucket
            words, scales = words[:0], scales[:0]
        return {"codes": words, "scales": scales}, (e_new[:d] if pad else e_new)

    return encode


def _deprecated(old: str, new: str) -> None:
    warnings.warn(
        f"optdist.compressors.{old} is deprecated; use optdist.compressors.{new} (the same compressor).",
        DeprecationWarning,
        stacklevel=3,
    )


def int8(bucket_size: int = 256, rounding: str = "nearest", impl: str = "auto") -> Compressor:
    """Deprecated: ``qsgd(127, bucket_size, scale="max", rounding=rounding, fused=True, impl=impl)``.

    Bucketed int8 with a per-bucket max-abs scale on the fused error-feedback kernel; see
    :func:`~optdist.compression.qsgd` (this returns exactly that compressor).

    Args:
      bucket_size: entries per bucket, a power of two ``>= 16``.
      rounding: ``"nearest"`` (default) or ``"stochastic"``.
      impl: ``"auto"``, ``"pallas"`` or ``"xla"``.

    Returns:
      The :func:`~optdist.compression.qsgd` compressor with those options.
    """
    from optdist.compression.qsgd import qsgd

    _deprecated("int8(b, rounding)", 'qsgd(127, b, scale="max", rounding=rounding, fused=True)')
    return qsgd(127, bucket_size, scale="max", rounding=rounding, fused=True, impl=impl)


def ternary(bucket_size: int = 256, rounding: str = "stochastic", impl: str = "auto") -> Compressor:
    """Deprecated: ``terngrad(None, bucket_size=bucket_size, rounding=rounding, impl=impl)``.

    Bucketed ternary (2-bit) codes with a per-bucket max-abs scale on the fused error-feedback
    kernel; see :func:`~optdist.compression.terngrad` (this returns exactly that compressor).

    Args:
      bucket_size: entries per bucket, a power of two ``>= 16``.
      rounding: ``"stochastic"`` (default) or ``"nearest"``.
      impl: ``"auto"``, ``"pallas"`` or ``"xla"``.

    Returns:
      The :func:`~optdist.compression.terngrad` compressor with those options.
    """
    from optdist.compression.terngrad import terngrad

    _deprecated("ternary(b, rounding)", "terngrad(None, bucket_size=b, rounding=rounding)")
    return terngrad(None, bucket_size=bucket_size, rounding=rounding, impl=impl)


def scaled_sign(bucket_size: int = 256, impl: str = "auto") -> Compressor:
    """Deprecated: ``sign(scaled=True, bucket_size=bucket_size, impl=impl)``.

    Scaled sign with one ``||x_B||_1 / |B|`` scale per bucket on the fused error-feedback kernel; see
    :func:`~optdist.compression.sign` (this returns exactly that compressor).

    Args:
      bucket_size: entries per bucket, a power of two ``>= 32``.
      impl: ``"auto"``, ``"pallas"`` or ``"xla"``.

    Returns:
      The :func:`~optdist.compression.sign` compressor with those options.
    """
    from optdist.compression.sign import sign

    _deprecated("scaled_sign(b)", "sign(bucket_size=b)")
    return sign(scaled=True, bucket_size=bucket_size, impl=impl)
