r"""Bucketed quantizers with a fused error-feedback kernel: int8, ternary (2-bit), scaled sign (1-bit).

These compressors have exactly the semantics of :func:`optdist_kernels.ef_quantize` (the fused
``p = g + e``, quantize, ``e <- p - decode`` kernel, or its XLA reference) and receive with
:func:`optdist_kernels.decode_accumulate`. They differ from :func:`~optdist.compression.qsgd`,
:func:`~optdist.compression.terngrad` and :func:`~optdist.compression.sign` (per-leaf or L2 scales,
other RNG and packing), which are unchanged.

Protocol (gathered): every worker's payload (codes + one float32 scale per bucket; the kernel's
padding rows are not sent) is all-gathered, and the receive side sums the ``n`` payloads with the
fused decode + accumulate in worker order, then divides by ``n``. With
``compressed_mean(..., feedback="ef")`` the encoder is the fused kernel: :math:`p = g + e` (float32),
the payload, and :math:`e \leftarrow p - D(\mathrm{payload})` in one pass (the residual is stored in
the leaf's dtype, per worker). Leaves whose payload would not be smaller (e.g. a bias shorter than
a bucket) and scalars go uncompressed through one all-reduce mean (their residual is 0).

State: none. Randomness: stochastic rounding draws from a counter-based hash of (the step key
folded with the worker index and the leaf index; the element index): different per worker,
reproducible. Non-finite policy: that of :func:`optdist.compressed_mean` (a non-finite entry makes
its bucket's scale, hence the mean, non-finite, and the step's state update is skipped).

``impl``: ``"xla"`` runs the pure-JAX reference, ``"pallas"`` the Pallas kernel (interpret mode off
GPU), ``"auto"`` the kernel only where it was measured faster, else XLA (never fails). All three
give the same codes (the kernel and the reference share the block math and the hash RNG).
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from optdist.compression.base import Compressor, gathered_ef

_ROUNDINGS = ("nearest", "stochastic")


def _check_common(bucket_size: int, minimum: int, rounding: str, impl: str) -> None:
    from optdist_kernels._dispatch import IMPLS

    if isinstance(bucket_size, bool) or not isinstance(bucket_size, int):
        raise TypeError(f"bucket_size must be an int; got {bucket_size!r}.")
    if bucket_size < minimum or bucket_size & (bucket_size - 1):
        raise ValueError(f"bucket_size must be a power of two >= {minimum}; got {bucket_size}.")
    if rounding not in _ROUNDINGS:
        raise ValueError(f"rounding must be one of {_ROUNDINGS}; got {rounding!r}.")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}; got {impl!r}.")


def _kernel_compressor(name: str, scheme: str, bucket_size: int, rounding: str, impl: str) -> Compressor:
    """The gathered protocol around the fused kernel; payloads trimmed to the real buckets."""
    from optdist_kernels import quantize

    def encode_ef(x, e, key):
        payload, e_new = quantize.ef_quantize(
            x, e, key, scheme=scheme, rounding=rounding, bucket_size=bucket_size, impl=impl
        )
        buckets = math.ceil(x.shape[0] / bucket_size)  # the kernel pads rows to its block: not sent
        return {"codes": payload["codes"][:buckets], "scales": payload["scales"][:buckets]}, e_new

    def decode_accumulate(payload, acc):
        rows, _ = quantize.layout(acc.shape[0], bucket_size)
        pad = rows - payload["scales"].shape[0]
        full = {k: jnp.pad(v, [(0, pad)] + [(0, 0)] * (v.ndim - 1)) for k, v in payload.items()}
        return quantize.decode_accumulate(full, acc, scheme=scheme, bucket_size=bucket_size, impl=impl)

    return gathered_ef(name, encode_ef, decode_accumulate)


def int8(bucket_size: int = 256, rounding: str = "nearest", impl: str = "auto") -> Compressor:
    r"""Bucketed int8 quantization with a per-bucket max-abs scale (fused error-feedback kernel).

    Per bucket :math:`B` of ``bucket_size`` consecutive entries of the flattened leaf (the last
    bucket may be ragged):

    .. math:: s_B = \max_{j \in B} |x_j| / 127, \qquad
              c_j = \mathrm{sign}(x_j)\min(\lfloor |x_j|/s_B + u_j \rfloor, 127), \qquad
              D(c)_j = s_B c_j,

    with :math:`u_j = 1/2` (``rounding="nearest"``, error :math:`\le s_B/2`) or
    :math:`u_j \sim U[0, 1)` (``"stochastic"``, unbiased: :math:`E[D(c)] = x`).
    Not :func:`~optdist.compression.qsgd` (L2 bucket norm, ``jax.random`` noise, any bucket size).

    Bytes per compressed leaf of ``d`` entries: ``ceil(d/b)·b`` int8 codes + 4 per bucket,
    all-gathered (each worker sends ``(n - 1)`` times that).

    Protocol, state, randomness, non-finite policy and ``impl``: see the module docstring
    (gathered payloads summed with the fused decode + accumulate; stateless; with
    ``compressed_mean(..., feedback="ef")`` the fused error-feedback kernel encodes ``g + e`` and
    writes the per-worker residual in one pass).
    Args:
      bucket_size: entries per bucket, a power of two ``>= 16``.
      rounding: ``"nearest"`` or ``"stochastic"``.
      impl: ``"auto"``, ``"pallas"`` or ``"xla"``.

    Returns:
      A :class:`~optdist.compression.Compressor` (with a fused ``aggregate_ef``).

    Example::

      tx = optax.chain(optdist.compressed_mean(optdist.compressors.int8(256, "stochastic"), "data",
                                               feedback="ef"), optax.sgd(0.1))

    References:
      Alistarh, Grubic, Li, Tomioka, Vojnovic, "QSGD: Communication-Efficient SGD via Gradient
      Quantization and Encoding", NeurIPS 2017 (bucketed stochastic quantization).
      Dettmers, "8-Bit Approximations for Parallelism in Deep Learning", ICLR 2016.
    """
    _check_common(bucket_size, 16, rounding, impl)
    return _kernel_compressor(f"int8({bucket_size}, {rounding})", "int8", bucket_size, rounding, impl)


def ternary(bucket_size: int = 256, rounding: str = "stochastic", impl: str = "auto") -> Compressor:
    r"""Bucketed ternary quantization, 2 bits per entry (TernGrad-style, fused error-feedback kernel).

    Per bucket :math:`B`: :math:`s_B = \max_{j \in B}|x_j|`, :math:`c_j = \mathrm{sign}(x_j)
    \lfloor |x_j|/s_B + u_j \rfloor \in \{-1, 0, 1\}`, :math:`D(c)_j = s_B c_j`. With
    ``rounding="stochastic"`` this is TernGrad's :math:`s\,\mathrm{sign}(x)\,\mathrm{Bernoulli}(|x|/s)`
    (unbiased) with a per-bucket scale and no clipping; ``"nearest"`` sends :math:`\pm s_B` where
    :math:`|x_j| \ge s_B/2`. Not :func:`~optdist.compression.terngrad` (per-leaf scale, ``clip_sigma``
    clipping, bit-plane packing).

    Bytes per compressed leaf of ``d`` entries: ``ceil(d/b)·b/4`` bytes of codes (4 per uint8) + 4 per
    bucket, all-gathered.

    Protocol, state, randomness, non-finite policy and ``impl``: see the module docstring
    (gathered payloads summed with the fused decode + accumulate; stateless; with
    ``compressed_mean(..., feedback="ef")`` the fused error-feedback kernel encodes ``g + e`` and
    writes the per-worker residual in one pass).
    Args:
      bucket_size: entries per bucket, a power of two ``>= 16``.
      rounding: ``"stochastic"`` (default) or ``"nearest"``.
      impl: ``"auto"``, ``"pallas"`` or ``"xla"``.

    Returns:
      A :class:`~optdist.compression.Compressor` (with a fused ``aggregate_ef``).

    Example::

      tx = optax.chain(optdist.compressed_mean(optdist.compressors.ternary(), "data", feedback="ef"),
                       optax.sgd(0.1))

    References:
      Wen, Xu, Yan, Wu, Wang, Chen, Li, "TernGrad: Ternary Gradients to Reduce Communication in
      Distributed Deep Learning", NeurIPS 2017.
    """
    _check_common(bucket_size, 16, rounding, impl)
    return _kernel_compressor(f"ternary({bucket_size}, {rounding})", "ternary", bucket_size, rounding, impl)


def scaled_sign(bucket_size: int = 256, impl: str = "auto") -> Compressor:
    r"""Scaled sign per bucket, 1 bit per entry (EF-signSGD with bucket scales, fused EF kernel).

    Per bucket :math:`B` (its real entries only): :math:`s_B = \|x_B\|_1/|B|`,
    :math:`C(x)_j = s_B\,\mathrm{sign}(x_j)` (zero is sent as ``+``). Each bucket is the
    contraction of EF-signSGD; finer buckets track magnitudes better at 4 bytes per bucket.
    Not :func:`~optdist.compression.sign` (one scale per leaf, uint8 packing).

    Bytes per compressed leaf of ``d`` entries: ``ceil(d/b)·b/8`` bytes of bits (32 per uint32) + 4 per
    bucket, all-gathered.

    Protocol, state, randomness, non-finite policy and ``impl``: see the module docstring
    (gathered payloads summed with the fused decode + accumulate; stateless; with
    ``compressed_mean(..., feedback="ef")`` the fused error-feedback kernel encodes ``g + e`` and
    writes the per-worker residual in one pass).
    Args:
      bucket_size: entries per bucket, a power of two ``>= 32``.
      impl: ``"auto"``, ``"pallas"`` or ``"xla"``.

    Returns:
      A :class:`~optdist.compression.Compressor` (with a fused ``aggregate_ef``).

    Example::

      tx = optax.chain(optdist.compressed_mean(optdist.compressors.scaled_sign(), "data", feedback="ef"),
                       optax.sgd(0.01))

    References:
      Karimireddy, Rebjock, Stich, Jaggi, "Error Feedback Fixes SignSGD and other Gradient
      Compression Schemes", ICML 2019.
    """
    _check_common(bucket_size, 32, "nearest", impl)
    return _kernel_compressor(f"scaled_sign({bucket_size})", "sign", bucket_size, "nearest", impl)
