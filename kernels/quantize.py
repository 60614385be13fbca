r"""Fused error feedback + bucketed quantization (int8 / ternary / scaled sign), and the fused decode.

Encode, in one pass over ``g`` and ``e`` (flattened, length ``d``, cut into buckets of ``b`` entries;
the last bucket may be ragged):

.. math:: p = g + e, \qquad c = Q(p) \ \text{per bucket}, \qquad e_{\mathrm{new}} = p - D(c)

Schemes (``s`` is the bucket's scale, ``L`` the number of levels, ``u`` the rounding offset):

* ``"int8"``: :math:`s = \mathrm{norm}(p_B)/L` with ``norm`` the max-abs (default) or the L2 norm of
  the bucket, :math:`c_j = \mathrm{sign}(p_j)\min(\lfloor |p_j|/s + u_j \rfloor, L)`, int8 codes,
  :math:`D(c) = s\,c`. ``L = levels <= 127``.
* ``"ternary"``: the same with ``L = 1`` (codes in {-1, 0, 1}: TernGrad with a per-bucket max scale,
  or QSGD with one level for ``norm="l2"``), packed 2 bits per code, 4 codes per uint8.
* ``"sign"``: :math:`s = \|p_B\|_1 / |B|` (over the bucket's real entries), :math:`c_j = [p_j \ge 0]`,
  :math:`D(c) = s(2c - 1)`, packed 1 bit per code, 32 codes per uint32. Rounding does not apply.

Rounding: ``"nearest"`` uses :math:`u = 1/2` (Triton has no ``round`` primitive, so ``floor(x + 1/2)``
everywhere); ``"stochastic"`` draws :math:`u \sim U[0, 1)` from a counter-based hash of
``(key, element index)``, so :math:`E[D(c)] = p` (while no code is clipped at ``L``, which the
max-abs scale guarantees), reproducible for a fixed key and identical in the kernel and the reference.

Packing layout (per bucket row of ``b`` entries, ``f`` codes per word, ``W = b / f`` words): bit field
``t`` of word ``j`` holds entry ``t·W + j``. This strided layout lets a kernel build each word from ``f``
contiguous column slices, with no in-register reshapes.

Payload: ``{"codes": [rows, W], "scales": float32 [rows]}`` with ``rows = ceil(d / b)`` rounded up to
the kernel's row block (the extra rows are zeros). Bytes: ``d`` (int8), ``d/4`` (ternary) or ``d/8``
(sign) plus 4 per bucket.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from optdist_kernels import _dispatch

SCHEMES = ("int8", "ternary", "sign")
ROUNDINGS = ("nearest", "stochastic")
NORMS = ("max", "l2")
_CODES_PER_WORD = {"int8": 1, "ternary": 4, "sign": 32}
_WORD_DTYPE = {"int8": jnp.int8, "ternary": jnp.uint8, "sign": jnp.uint32}
_BLOCK_ROWS = 8  # buckets per program (DESIGN.md: 8 rows of 256 reached 95% of copy bandwidth)


class Config:
    """Static configuration of one quantizer (hashable, so jitted/compiled variants are cached)."""

    def __init__(self, scheme: str, rounding: str, norm: str, levels: int, bucket_size: int):
        if scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {SCHEMES}; got {scheme!r}.")
        if rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {ROUNDINGS}; got {rounding!r}.")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}; got {norm!r}.")
        if scheme == "ternary":
            levels = 1
        if not isinstance(levels, int) or not 1 <= levels <= 127:
            raise ValueError(f"levels must be an int in [1, 127]; got {levels!r}.")
        f = _CODES_PER_WORD[scheme]
        if not isinstance(bucket_size, int) or bucket_size < max(f, 16) or bucket_size & (bucket_size - 1):
            raise ValueError(
                f"bucket_size must be a power of two >= {max(f, 16)} for scheme {scheme!r}; "
                f"got {bucket_size!r}."
            )
        self.scheme, self.rounding, self.norm = scheme, rounding, norm
        self.levels, self.bucket = levels, bucket_size
        self.per_word = f
        self.width = bucket_size // f

    def _key(self) -> tuple:
        return (self.scheme, self.rounding, self.norm, self.levels, self.bucket)

    def __hash__(self) -> int:
        return hash(self._key())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Config) and self._key() == other._key()


def layout(d: int, bucket_size: int, block_rows: int = _BLOCK_ROWS) -> tuple[int, int]:
    """``(rows, block)``: padded bucket rows of a length-``d`` vector and the kernel's rows per program."""
    rows = max(1, -(-d // bucket_size))
    block = min(block_rows, _dispatch.next_pow2(rows))
    return -(-rows // block) * block, block


def _rows(x: jax.Array, rows: int, bucket: int) -> jax.Array:
    """Flat ``x`` as ``[rows, bucket]`` float32, zero-padded (no copy when nothing is padded)."""
    flat = x.reshape(-1).astype(jnp.float32)
    pad = rows * bucket - flat.shape[0]
    return (jnp.pad(flat, (0, pad)) if pad else flat).reshape(rows, bucket)


def _unrows(x: jax.Array, d: int) -> jax.Array:
    flat = x.reshape(-1)
    return flat if flat.shape[0] == d else flat[:d]


# ---------------------------------------------------------------------------------------------------
# Block math, shared verbatim by the kernels (on a block of R rows) and the references (on all rows).


def _indices(row0: Any, nrows: int, cfg: Config, t: int) -> jax.Array:
    """Flat element index of column slice ``t`` (int32 ``[nrows, W]``)."""
    r = jax.lax.broadcasted_iota(jnp.int32, (nrows, cfg.width), 0) + row0
    j = jax.lax.broadcasted_iota(jnp.int32, (nrows, cfg.width), 1)
    return r * cfg.bucket + (t * cfg.width) + j


def _encode_block(p: list, row0: Any, d: int, seeds: Any, cfg: Config) -> tuple[jax.Array, jax.Array, list]:
    """``p``: ``f`` column slices ``[R, W]`` of ``g + e``. Returns ``(words, scale, e_new slices)``."""
    nrows = p[0].shape[0]
    idx = [_indices(row0, nrows, cfg, t) for t in range(cfg.per_word)]
    p = [jnp.where(i < d, x, 0.0) for i, x in zip(idx, p)]
    a = [jnp.abs(x) for x in p]
    if cfg.scheme == "sign":
        total = functools.reduce(jnp.add, [jnp.sum(x, axis=1) for x in a])
        row = jax.lax.broadcasted_iota(jnp.int32, (nrows,), 0) + row0
        count = jnp.clip(d - row * cfg.bucket, 1, cfg.bucket).astype(jnp.float32)
        scale = total / count
        bits = [(x >= 0.0) for x in p]
        values = [jnp.where(b, scale[:, None], -scale[:, None]) for b in bits]
        words = functools.reduce(
            jnp.bitwise_or, [b.astype(jnp.uint32) << jnp.uint32(t) for t, b in enumerate(bits)]
        )
    else:
        if cfg.norm == "max":
            norm = functools.reduce(jnp.maximum, [jnp.max(x, axis=1) for x in a])
        else:
            norm = jnp.sqrt(functools.reduce(jnp.add, [jnp.sum(x * x, axis=1) for x in a]))
        scale = norm * jnp.float32(1.0 / cfg.levels)
        inv = jnp.where(scale > 0.0, 1.0 / jnp.where(scale > 0.0, scale, 1.0), 0.0)[:, None]
        codes = []
        for t, (x, ax) in enumerate(zip(p, a)):
            if cfg.rounding == "stochastic":
                u = _dispatch.hash_uniform(idx[t].astype(jnp.uint32), seeds[0], seeds[1])
            else:
                u = jnp.float32(0.5)
            mag = jnp.minimum(jnp.floor(ax * inv + u), jnp.float32(cfg.levels)).astype(jnp.int32)
            codes.append(jnp.where(x < 0.0, -mag, mag))
        values = [c.astype(jnp.float32) * scale[:, None] for c in codes]
        if cfg.scheme == "int8":
            words = codes[0].astype(jnp.int8)
        else:
            words = functools.reduce(
                jnp.bitwise_or,
                [(c.astype(jnp.uint32) & jnp.uint32(3)) << jnp.uint32(2 * t) for t, c in enumerate(codes)],
            ).astype(jnp.uint8)
    e_new = [jnp.where(i < d, x - v, 0.0) for i, x, v in zip(idx, p, values)]
    return words, scale, e_new


def _decode_block(words: jax.Array, scale: jax.Array, cfg: Config) -> list:
    """The decoded ``f`` column slices ``[R, W]`` of a block of packed words."""
    s = scale[:, None]
    if cfg.scheme == "int8":
        return [words.astype(jnp.float32) * s]
    w = words.astype(jnp.uint32)
    out = []
    for t in range(cfg.per_word):
        if cfg.scheme == "sign":
            bit = (w >> jnp.uint32(t)) & jnp.uint32(1)
            out.append(jnp.where(bit == 1, s, -s))
        else:
            c = ((w >> jnp.uint32(2 * t)) & jnp.uint32(3)).astype(jnp.int32)
            out.append(jnp.where(c == 3, -1, c).astype(jnp.float32) * s)
    return out


def _split(x: jax.Array, cfg: Config) -> list:
    return [x[:, t * cfg.width : (t + 1) * cfg.width] for t in range(cfg.per_word)]


# ---------------------------------------------------------------------------------------------------
# References (the XLA path).


def _encode_xla(g, e, seeds, *, cfg: Config):
    d = g.size
    rows, _ = layout(d, cfg.bucket)
    p = _rows(g, rows, cfg.bucket) + _rows(e, rows, cfg.bucket)
    words, scale, e_new = _encode_block(_split(p, cfg), 0, d, seeds, cfg)
    return {"codes": words, "scales": scale}, _unrows(jnp.concatenate(e_new, axis=1), d)


def _decode_xla(codes, scales, acc, *, cfg: Config):
    d = acc.size
    values = _decode_block(codes, scales, cfg)
    return _unrows(_rows(acc, codes.shape[0], cfg.bucket) + jnp.concatenate(values, axis=1), d)


# ---------------------------------------------------------------------------------------------------
# Pallas kernels.


def _encode_pallas(g, e, seeds, *, cfg: Config, interpret: bool, poison: bool = False):
    from jax.experimental import pallas as pl

    d = g.size
    rows, block = layout(d, cfg.bucket)
    B, W, f = cfg.bucket, cfg.width, cfg.per_word

    def kernel(g_ref, e_ref, s_ref, codes_ref, scale_ref, enew_ref):
        row0 = pl.program_id(0) * block
        p = [g_ref[:, t * W : (t + 1) * W] + e_ref[:, t * W : (t + 1) * W] for t in range(f)]
        seeds_ = (s_ref[0], s_ref[1])
        words, scale, e_new = _encode_block(p, row0, d, seeds_, cfg)
        codes_ref[...] = words
        scale_ref[...] = scale
        for t in range(f):
            enew_ref[:, t * W : (t + 1) * W] = e_new[t]

    rowspec = pl.BlockSpec((block, B), lambda i: (i, 0))
    codes, scales, e_new = _dispatch.call_kernel(
        kernel,
        [_rows(g, rows, B), _rows(e, rows, B), seeds],
        [rowspec, rowspec, pl.BlockSpec((2,), lambda i: (0,))],
        [
            jax.ShapeDtypeStruct((rows, W), _WORD_DTYPE[cfg.scheme]),
            jax.ShapeDtypeStruct((rows,), jnp.float32),
            jax.ShapeDtypeStruct((rows, B), jnp.float32),
        ],
        [pl.BlockSpec((block, W), lambda i: (i, 0)), pl.BlockSpec((block,), lambda i: (i,)), rowspec],
        (rows // block,),
        interpret=interpret,
        poison=poison,
    )
    return {"codes": codes, "scales": scales}, _unrows(e_new, d)


def _decode_pallas(codes, scales, acc, *, cfg: Config, interpret: bool, poison: bool = False):
    from jax.experimental import pallas as pl

    d = acc.size
    rows, block = codes.shape[0], layout(acc.size, cfg.bucket)[1]
    B, W, f = cfg.bucket, cfg.width, cfg.per_word

    def kernel(c_ref, s_ref, a_ref, o_ref):
        values = _decode_block(c_ref[...], s_ref[...], cfg)
        for t in range(f):
            o_ref[:, t * W : (t + 1) * W] = a_ref[:, t * W : (t + 1) * W] + values[t]

    rowspec = pl.BlockSpec((block, B), lambda i: (i, 0))
    (out,) = _dispatch.call_kernel(
        kernel,
        [codes, scales, _rows(acc, rows, B)],
        [pl.BlockSpec((block, W), lambda i: (i, 0)), pl.BlockSpec((block,), lambda i: (i,)), rowspec],
        [jax.ShapeDtypeStruct((rows, B), jnp.float32)],
        [rowspec],
        (rows // block,),
        interpret=interpret,
        poison=poison,
    )
    return _unrows(out, d)


# ---------------------------------------------------------------------------------------------------
# Public API.


def ef_quantize(
    g: jax.Array,
    e: jax.Array,
    key: jax.Array | None = None,
    *,
    scheme: str = "int8",
    rounding: str = "nearest",
    norm: str = "max",
    levels: int = 127,
    bucket_size: int = 256,
    impl: str = "auto",
) -> tuple[dict, jax.Array]:
    r"""Fused error feedback + quantize: ``p = g + e``, ``codes = Q(p)``, ``e_new = p - D(codes)``.

    See the module docstring for the schemes, rounding and packing.

    Args:
      g: gradient (any shape; flattened, computed in float32).
      e: error-feedback residual, same size as ``g``.
      key: PRNG key for ``rounding="stochastic"`` (ignored otherwise). Fold the worker index in where
        workers must draw independently.
      scheme: ``"int8"``, ``"ternary"`` or ``"sign"``.
      rounding: ``"nearest"`` or ``"stochastic"``.
      norm: bucket scale of int8/ternary, ``"max"`` (max-abs) or ``"l2"`` (QSGD).
      levels: positive levels of int8 (``1..127``).
      bucket_size: entries per bucket, a power of two (``>= 16``, ``>= 32`` for sign).
      impl: ``"auto"``, ``"pallas"`` or ``"xla"``.

    Returns:
      ``(payload, e_new)``: ``payload = {"codes", "scales"}`` and the new residual (flat, float32).

    Example::

      payload, e = ef_quantize(g, e, key, scheme="ternary", rounding="stochastic")
      total = decode_accumulate(payload, total, scheme="ternary")
    """
    cfg = Config(scheme, rounding, norm, levels, bucket_size)
    if g.size != e.size:
        raise ValueError(f"e must have the size of g ({g.size}); got {e.size}.")
    if rounding == "stochastic" and scheme != "sign":
        if key is None:
            raise ValueError("key is required for rounding='stochastic'.")
        seeds = _dispatch.seeds_from_key(key)
    else:
        seeds = jnp.zeros((2,), jnp.uint32)
    return _dispatch.dispatch(
        "ef_quantize",
        impl,
        functools.partial(_encode_pallas, cfg=cfg),
        functools.partial(_encode_xla, cfg=cfg),
        g,
        e,
        seeds,
    )


def decode_accumulate(
    payload: dict,
    acc: jax.Array,
    *,
    scheme: str = "int8",
    bucket_size: int = 256,
    impl: str = "auto",
) -> jax.Array:
    """Fused decode + accumulate for the receive side: ``acc + D(payload)`` (flat, float32).

    Args:
      payload: ``{"codes", "scales"}`` from :func:`ef_quantize` with the same ``scheme``/``bucket_size``,
        with the kernel's padding rows or trimmed to the ``ceil(d / bucket_size)`` real buckets (what
        a sender transmits; the padding rows are zeros and are restored here).
      acc: the running sum (its size is the decoded length ``d``); pass zeros for a plain decode.
      scheme: ``"int8"``, ``"ternary"`` or ``"sign"``.
      bucket_size: as in :func:`ef_quantize`.
      impl: ``"auto"``, ``"pallas"`` or ``"xla"``.

    Returns:
      ``acc + decode(payload)`` as a flat float32 vector of ``acc.size`` entries.
    """
    cfg = Config(scheme, "nearest", "max", 127, bucket_size)
    rows, _ = layout(acc.size, bucket_size)
    codes, scales = payload["codes"], payload["scales"]
    buckets = max(1, -(-acc.size // bucket_size))
    if codes.shape == (buckets, cfg.width) and scales.shape == (buckets,) and buckets < rows:
        codes = jnp.pad(codes, ((0, rows - buckets), (0, 0)))  # trimmed payload: zero padding rows
        scales = jnp.pad(scales, (0, rows - buckets))
    if codes.shape != (rows, cfg.width) or scales.shape != (rows,):
        raise ValueError(
            f"payload shapes {codes.shape}/{scales.shape} do not match acc of size {acc.size} "
            f"(expected ({rows}, {cfg.width})/({rows},), or ({buckets}, {cfg.width})/({buckets},) trimmed)."
        )
    return _dispatch.dispatch(
        "decode_accumulate",
        impl,
        functools.partial(_decode_pallas, cfg=cfg),
        functools.partial(_decode_xla, cfg=cfg),
        codes,
        scales,
        acc,
    )
