"""Fused EF + quantize and decode kernels: Pallas (interpret mode) vs the XLA reference vs NumPy."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optdist_kernels import decode_accumulate, ef_quantize
from optdist_kernels import quantize as q

B = 256
SEEDS = jnp.array([12345, 678], jnp.uint32)


@functools.cache
def _encode(impl, cfg):
    if impl == "pallas":
        return jax.jit(functools.partial(q._encode_pallas, cfg=cfg, interpret=True, poison=True))
    return jax.jit(functools.partial(q._encode_xla, cfg=cfg))


@functools.cache
def _decode(impl, cfg):
    if impl == "pallas":
        return jax.jit(functools.partial(q._decode_pallas, cfg=cfg, interpret=True, poison=True))
    return jax.jit(functools.partial(q._decode_xla, cfg=cfg))


def _inputs(d, seed=0):
    kg, ke = jax.random.split(jax.random.key(seed))
    return jax.random.normal(kg, (d,)), 0.3 * jax.random.normal(ke, (d,))


def _np_decode(codes, scales, scheme, d):
    """Float64 decoder written from the documented layout: bit field t of word j is entry t*W + j."""
    codes, scales = np.asarray(codes), np.asarray(scales, np.float64)
    rows, width = codes.shape
    if scheme == "int8":
        vals = codes.astype(np.float64)
    else:
        nb, f = (2, 4) if scheme == "ternary" else (1, 32)
        w = codes.astype(np.uint64)
        fields = [(w >> np.uint64(nb * t)) & np.uint64((1 << nb) - 1) for t in range(f)]
        vals = np.concatenate(fields, axis=1).astype(np.int64)  # [rows, f * width], entry t*W + j
        if scheme == "ternary":
            assert not np.any(vals == 2), "code 2 is not a valid ternary code"
            vals = np.where(vals == 3, -1, vals).astype(np.float64)
        else:
            vals = 2.0 * vals - 1.0
    return (vals * scales[:, None]).reshape(-1)[:d]


CASES = [
    ("int8", "nearest", 5),  # tiny: one partial bucket
    ("int8", "stochastic", 2304),  # 9 full buckets: padded to 2 blocks of 8 rows (block edge)
    ("ternary", "stochastic", 1000),
    ("sign", "nearest", 1000),
]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}")
def encoded(request):
    scheme, rounding, d = request.param
    cfg = q.Config(scheme, rounding, "max", 127, B)
    g, e = _inputs(d)
    pal = _encode("pallas", cfg)(g, e, SEEDS)
    ref = _encode("xla", cfg)(g, e, SEEDS)
    return scheme, rounding, d, cfg, g, e, pal, ref


def test_encode_matches_reference_and_writes_everything(encoded):
    scheme, _, d, _, _, _, (pp, pe), (rp, re) = encoded
    rows, _ = q.layout(d, B)
    assert pp["codes"].shape == rp["codes"].shape and pp["codes"].shape[0] == rows
    assert pp["codes"].dtype == {"int8": jnp.int8, "ternary": jnp.uint8, "sign": jnp.uint32}[scheme]
    # Poisoned outputs (NaN / int sentinel) must all be overwritten: equality with XLA checks codes,
    # and no NaN may survive in the float outputs.
    assert not np.isnan(np.asarray(pp["scales"])).any() and not np.isnan(np.asarray(pe)).any()
    np.testing.assert_array_equal(pp["codes"], rp["codes"])
    np.testing.assert_allclose(pp["scales"], rp["scales"], rtol=1e-6)
    np.testing.assert_allclose(pe, re, rtol=0, atol=1e-6)
    if scheme == "int8":
        assert np.asarray(pp["codes"]).min() >= -127


def test_packed_payload_decodes_exactly(encoded):
    """NumPy float64 decode of the packed words + e_new reconstructs p = g + e."""
    scheme, _, d, cfg, g, e, (pp, pe), _ = encoded
    p = np.asarray(g, np.float64) + np.asarray(e, np.float64)
    dec = _np_decode(pp["codes"], pp["scales"], scheme, d)
    np.testing.assert_allclose(dec + np.asarray(pe, np.float64), p, rtol=0, atol=2e-6)
    # The fused decode + accumulate (both paths, poisoned output) equals acc + the NumPy decode.
    acc = jnp.linspace(-1.0, 1.0, d, dtype=jnp.float32)
    for impl in ("pallas", "xla"):
        out = _decode(impl, cfg)(pp["codes"], pp["scales"], acc)
        assert out.shape == (d,) and not np.isnan(np.asarray(out)).any()
        np.testing.assert_allclose(out, np.asarray(acc, np.float64) + dec, rtol=0, atol=2e-6)


def test_scales_and_rounding_error(encoded):
    """Per-bucket scales from a float64 reference (ragged tail: real entries only); error bounds."""
    scheme, rounding, d, _, g, e, (pp, pe), _ = encoded
    p = np.asarray(g, np.float64) + np.asarray(e, np.float64)
    rows = -(-d // B)
    buckets = [p[i * B : (i + 1) * B] for i in range(rows)]
    scales = np.asarray(pp["scales"], np.float64)
    if scheme == "sign":
        want = [np.mean(np.abs(b)) for b in buckets]
    else:
        want = [np.max(np.abs(b)) / (127 if scheme == "int8" else 1) for b in buckets]
    np.testing.assert_allclose(scales[:rows], want, rtol=1e-5)
    np.testing.assert_array_equal(scales[rows:], 0.0)  # padding rows
    err = np.abs(np.asarray(pe, np.float64))
    per_entry_scale = np.repeat(scales[:rows], B)[:d]
    bound = 0.5 if rounding == "nearest" else 1.0
    if scheme != "sign":
        assert np.all(err <= bound * per_entry_scale * (1 + 1e-5) + 1e-7)


def test_stochastic_rounding_unbiased_and_reproducible():
    d, trials = 300, 4000
    g, e = _inputs(d, seed=3)
    p = np.asarray(g, np.float64) + np.asarray(e, np.float64)
    keys = jax.random.split(jax.random.key(7), trials)
    for scheme in ("int8", "ternary"):
        f = lambda k, s=scheme: ef_quantize(g, e, k, scheme=s, rounding="stochastic", levels=3, impl="xla")
        payload, e_new = jax.jit(jax.vmap(f))(keys)
        decoded = p[None, :] - np.asarray(e_new, np.float64)  # D(codes) = p - e_new
        mean, sd = decoded.mean(0), decoded.std(0) + 1e-12
        z = (mean - p) / np.maximum(sd / np.sqrt(trials), 1e-6)  # sd = 0 where |p| is the bucket max
        assert np.max(np.abs(z)) < 5.5, scheme  # 300 coordinates, 5.5 sigma
        assert np.abs(z.mean()) < 4.0 / np.sqrt(d) * 2
        # Not deterministic rounding: most coordinates take two values across keys.
        assert np.mean(sd > 1e-6) > 0.9
    a1, _ = ef_quantize(g, e, jax.random.key(1), rounding="stochastic", impl="xla")
    a2, _ = ef_quantize(g, e, jax.random.key(1), rounding="stochastic", impl="xla")
    b1, _ = ef_quantize(g, e, jax.random.key(2), rounding="stochastic", impl="xla")
    np.testing.assert_array_equal(a1["codes"], a2["codes"])
    assert np.any(np.asarray(a1["codes"]) != np.asarray(b1["codes"]))


def test_l2_norm_and_levels_match_numpy():
    d = 600
    g, e = _inputs(d, seed=5)
    payload, e_new = ef_quantize(g, e, scheme="int8", norm="l2", levels=15, bucket_size=128, impl="xla")
    p = np.asarray(g, np.float64) + np.asarray(e, np.float64)
    pad = np.pad(p, (0, 8 * 128 - d)).reshape(8, 128)
    scale = np.linalg.norm(pad, axis=1) / 15
    safe = np.where(scale > 0, scale, 1)
    codes = np.sign(pad) * np.minimum(np.floor(np.abs(pad) / safe[:, None] + 0.5), 15)
    np.testing.assert_allclose(payload["scales"], scale, rtol=1e-5)
    np.testing.assert_array_equal(payload["codes"], codes)
    np.testing.assert_allclose(e_new, p - (codes * scale[:, None]).reshape(-1)[:d], atol=1e-6)


def test_public_pallas_path_runs_and_matches():
    g, e = _inputs(700, seed=9)
    key = jax.random.key(4)
    a = ef_quantize(g.reshape(7, 100), e, key, scheme="int8", rounding="stochastic", impl="pallas")
    b = ef_quantize(g.reshape(7, 100), e, key, scheme="int8", rounding="stochastic", impl="xla")
    np.testing.assert_array_equal(a[0]["codes"], b[0]["codes"])
    acc = jnp.ones((700,))
    np.testing.assert_allclose(
        decode_accumulate(a[0], acc, impl="pallas"),
        decode_accumulate(b[0], acc, impl="xla"),
        atol=1e-6,
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(scheme="int4"), "scheme"),
        (dict(rounding="up"), "rounding"),
        (dict(norm="l1"), "norm"),
        (dict(levels=200), "levels"),
        (dict(bucket_size=100), "bucket_size"),
        (dict(scheme="sign", bucket_size=16), "bucket_size"),
        (dict(impl="cuda"), "impl"),
        (dict(rounding="stochastic"), "key"),
    ],
)
def test_bad_arguments(kwargs, match):
    g = jnp.ones((10,))
    with pytest.raises(ValueError, match=match):
        ef_quantize(g, g, **kwargs)


def test_bad_sizes():
    with pytest.raises(ValueError, match="e must have the size"):
        ef_quantize(jnp.ones((10,)), jnp.ones((11,)))
    payload, _ = ef_quantize(jnp.ones((10,)), jnp.ones((10,)), impl="xla")
    with pytest.raises(ValueError, match="payload shapes"):
        decode_accumulate(payload, jnp.zeros((3000,)), impl="xla")


@pytest.mark.parametrize("scheme", ["int8", "ternary", "sign"])
def test_decode_accepts_payloads_trimmed_to_the_real_buckets(scheme):
    """A sender transmits ceil(d / b) bucket rows, not the kernel's padded block of rows."""
    g = jax.random.normal(jax.random.key(0), (300,))  # 10 buckets of 32 (the last ragged), 16 rows padded
    payload, _ = ef_quantize(g, jnp.zeros_like(g), scheme=scheme, bucket_size=32, impl="xla")
    assert payload["scales"].shape == (16,)
    trimmed = {k: v[:10] for k, v in payload.items()}
    acc = jax.random.normal(jax.random.key(1), (300,))
    for impl in ("xla", "pallas"):
        full = decode_accumulate(payload, acc, scheme=scheme, bucket_size=32, impl=impl)
        part = decode_accumulate(trimmed, acc, scheme=scheme, bucket_size=32, impl=impl)
        np.testing.assert_array_equal(part, full)
