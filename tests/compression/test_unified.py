"""One compressor per concept: the old encodings are options of it, bit for bit.

``data/encodings_before_merge.npz`` holds the payloads (``codec.encode`` of a fixed tree and key) of
every compressor encoding as it was before the merge (commit 74c9213, jax 0.10.2, XLA:CPU), keyed by
``case|leaf path|dtype`` (bfloat16 stored as its uint16 bits). The unified factories' options must
reproduce them exactly; the deprecated aliases must be those very compressors.
"""

import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optdist
from optdist import compressors as C

OLD = np.load(Path(__file__).parent / "data" / "encodings_before_merge.npz")
# The payloads were recorded with XLA:CPU's default LLVM optimization (level 3); the suite compiles at -O0
# (tests/conftest.py), whose float rounding differs by an ulp here and there: these programs get level 3.
RECORDED = {"xla_backend_optimization_level": 3}

# case -> the unified call that must reproduce it (old call in the comment). The unfused stochastic QSGD /
# TernGrad draws moved to the counter-based hash (issue 20); rng="jax" is the old jax.random draw.
UNIFIED = {
    "qsgd_7_64": lambda: C.qsgd(7, 64, rng="jax"),  # qsgd(7, 64)
    "qsgd_127_512": lambda: C.qsgd(127, 512, rng="jax"),
    "qsgd_300_64": lambda: C.qsgd(300, 64, rng="jax"),  # int16 codes
    "qsgd_5_100": lambda: C.qsgd(5, 100, rng="jax"),  # a bucket size that is no power of two
    # int8(256, "nearest") / int8(16, "stochastic")
    "int8_256_nearest": lambda: C.qsgd(127, 256, scale="max", rounding="nearest", fused=True, impl="xla"),
    "int8_16_stochastic": lambda: C.qsgd(127, 16, scale="max", fused=True, impl="xla"),
    # ternary(256) / ternary(64, "nearest")
    "ternary_256": lambda: C.terngrad(None, bucket_size=256, impl="xla"),
    "ternary_64_nearest": lambda: C.terngrad(None, bucket_size=64, rounding="nearest", impl="xla"),
    # scaled_sign(256) / scaled_sign(32)
    "scaled_sign_256": lambda: C.sign(bucket_size=256, impl="xla"),
    "scaled_sign_32": lambda: C.sign(bucket_size=32, impl="xla"),
    "sign_scaled": lambda: C.sign(True),
    "sign_vote": lambda: C.sign(False),
    "terngrad_2.5": lambda: C.terngrad(2.5, rng="jax"),
    "terngrad_none": lambda: C.terngrad(None, rng="jax"),
    "top_k_exact": lambda: C.top_k(0.05),
    "top_k_threshold": lambda: C.top_k(0.05, "threshold", sample_size=64),
    # threshold_top_k(0.05, sample_size=256) / threshold_top_k(0.1, tol=0.3, sample_size=128, max_refine=2)
    "threshold_top_k": lambda: C.top_k(0.05, "fused_threshold", 256, impl="xla"),
    "threshold_top_k_tol": lambda: C.top_k(0.1, "fused_threshold", 128, tol=0.3, max_refine=2, impl="xla"),
    "rand_k_stratified": lambda: C.rand_k(0.1),
    "rand_k_uniform": lambda: C.rand_k(0.1, seed=3, sampling="uniform"),
}


def _tree():
    """The encoded tree, saved as it was built before the merge (level 3; see RECORDED):
    ``w = normal(fold_in(key(7), 0), (600,)) * linspace(0.1, 3, 600)``, ``m = normal(fold_in(key(7), 1),
    (20, 30))``, ``h = normal(fold_in(key(7), 2), (300,))`` in bfloat16."""
    saved = np.load(Path(__file__).parent / "data" / "encodings_input_tree.npz")
    return {
        "w": jnp.asarray(saved["w"]),
        "m": jnp.asarray(saved["m"]),
        "h": jnp.asarray(saved["h"].view(jnp.bfloat16)),
    }


def _payload_arrays(compressor, x, key):
    payload = jax.jit(compressor.codec.encode, compiler_options=RECORDED)(x, key)
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(payload)[0]:
        a = np.asarray(leaf)
        bits = a.view(np.uint16) if a.dtype.name == "bfloat16" else a
        out[f"{jax.tree_util.keystr(path)}|{a.dtype.name}"] = bits
    return out


def test_every_old_encoding_has_a_case():
    assert {k.split("|")[0] for k in OLD.files} == set(UNIFIED)


@pytest.mark.parametrize("case", sorted(UNIFIED))
def test_unified_options_reproduce_the_old_payload_bytes(case):
    got = _payload_arrays(UNIFIED[case](), _tree(), jax.random.key(11))
    want = {k.split("|", 1)[1]: OLD[k] for k in OLD.files if k.split("|")[0] == case}
    assert sorted(got) == sorted(want)  # same leaves, same payload fields, same dtypes
    for field, a in got.items():
        assert a.shape == want[field].shape, field
        assert a.tobytes() == want[field].tobytes(), field


ALIASES = [
    ("int8", lambda: C.int8(), lambda: C.qsgd(127, 256, scale="max", rounding="nearest", fused=True)),
    (
        "int8_stochastic_16",
        lambda: C.int8(16, "stochastic", impl="xla"),
        lambda: C.qsgd(127, 16, scale="max", rounding="stochastic", fused=True, impl="xla"),
    ),
    ("ternary", lambda: C.ternary(32), lambda: C.terngrad(None, bucket_size=32)),
    ("scaled_sign", lambda: C.scaled_sign(32), lambda: C.sign(scaled=True, bucket_size=32)),
    ("threshold_top_k", lambda: C.threshold_top_k(0.1), lambda: C.top_k(0.1, method="fused_threshold")),
    # ternary is QSGD with one level and a max-abs scale, on the same kernel scheme
    (
        "qsgd_one_level",
        lambda: C.qsgd(1, 32, scale="max", fused=True),
        lambda: C.terngrad(None, bucket_size=32),
    ),
]
N = 4


def _run(compressor, feedback, grads, params):
    tx = optdist.compressed_mean(compressor, "data", feedback=feedback)
    step = optdist.simulate(lambda g, s: tx.update(g, s, params))
    state = optdist.replicate(tx.init(params), N)
    return step(grads, state)


@pytest.mark.parametrize("name, alias, unified", ALIASES, ids=[a[0] for a in ALIASES])
def test_alias_equals_the_unified_compressor_bit_for_bit(name, alias, unified):
    if name != "qsgd_one_level":
        with pytest.warns(DeprecationWarning, match="deprecated"):
            old = alias()
    else:
        old = alias()
    new = unified()
    assert old.aggregate_ef is not None and new.aggregate_ef is not None  # the fused EF path stays
    key = jax.random.key(3)
    params = {"w": jnp.zeros((10, 30)), "b": jnp.zeros((3,))}
    grads = {
        "w": jax.random.normal(key, (N, 10, 30)) * jnp.arange(1.0, N + 1.0)[:, None, None],
        "b": jax.random.normal(jax.random.fold_in(key, 1), (N, 3)),
    }
    # The fused error-feedback path (aggregate_ef) under 4 simulated workers: outputs, residuals, bytes.
    a, b = _run(old, "ef", grads, params), _run(new, "ef", grads, params)
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)
    # The plain encoding (payload and its decode), as gossip and feedback=None use it.
    x = {"w": grads["w"][0], "b": grads["b"][0]}
    roundtrip = lambda c: jax.jit(
        lambda x, k: (c.codec.encode(x, k), c.codec.decode(c.codec.encode(x, k), x, k))
    )
    jax.tree_util.tree_map(np.testing.assert_array_equal, roundtrip(old)(x, key), roundtrip(new)(x, key))


def test_aliases_warn_and_keep_their_validation():
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        for make in (C.int8, C.ternary, C.scaled_sign, lambda: C.threshold_top_k(0.1)):
            with pytest.raises(DeprecationWarning):
                make()
    with pytest.warns(DeprecationWarning):
        with pytest.raises(ValueError, match="bucket_size"):
            C.int8(100)
        with pytest.raises(ValueError, match="bucket_size"):
            C.scaled_sign(16)
        with pytest.raises(ValueError, match="tol"):
            C.threshold_top_k(0.1, tol=1.0)
        with pytest.raises(ValueError, match="impl"):
            C.ternary(impl="cuda")


# ---- zero-element leaves (issue 18, item 3) -------------------------------------------------------

EMPTY_CASES = {
    "top_k": lambda: C.top_k(0.1),
    "top_k_threshold": lambda: C.top_k(0.1, "threshold"),
    "top_k_fused": lambda: C.top_k(0.1, "fused_threshold"),
    "rand_k": lambda: C.rand_k(0.1),
    "rand_k_uniform": lambda: C.rand_k(0.1, sampling="uniform"),
    "terngrad": lambda: C.terngrad(),
    "qsgd": lambda: C.qsgd(7, 16),
    "qsgd_fused": lambda: C.qsgd(127, 16, fused=True),  # the fused quantizer of terngrad / sign too
    "sign_vote": lambda: C.sign(False),
    "cast_fp16": lambda: C.cast(jnp.float16),
}


@pytest.mark.parametrize(
    "case, feedback",
    [(c, None) for c in sorted(EMPTY_CASES)] + [(c, "ef") for c in ("top_k_fused", "qsgd_fused", "terngrad")],
)
def test_zero_element_leaves_pass_through_untouched(case, feedback):
    """``compressed_mean`` under ``simulate`` on a tree with (0,) and (3, 0) leaves: they come back
    empty (shape, dtype) and change nothing else (the other leaf's result and the bytes)."""
    comp = EMPTY_CASES[case]()
    w = jax.random.normal(jax.random.key(0), (N, 64))
    # "w" sorts first, so it keeps leaf index 0 (its per-leaf key) with and without the empty leaves
    params = {"w": jnp.zeros((64,)), "z0": jnp.zeros((0,)), "z1": jnp.zeros((3, 0), jnp.bfloat16)}
    grads = {"w": w, "z0": jnp.zeros((N, 0)), "z1": jnp.zeros((N, 3, 0), jnp.bfloat16)}
    out, state = _run(comp, feedback, grads, params)
    ref, ref_state = _run(comp, feedback, {"w": w}, {"w": params["w"]})
    assert out["z0"].shape == (N, 0) and out["z1"].shape == (N, 3, 0) and out["z1"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(out["w"], ref["w"])
    np.testing.assert_array_equal(optdist.bytes_sent(state), optdist.bytes_sent(ref_state))


def test_empty_leaves_through_the_point_to_point_codec():
    """What gossip sends: an empty leaf travels raw and comes back empty."""
    x = {"a": jnp.zeros((0,)), "b": jnp.ones((40,))}
    comps = [make() for make in EMPTY_CASES.values()]
    comps = [c for c in comps if c.codec is not None]

    @jax.jit
    def roundtrip(x, key):
        return [c.codec.decode(c.codec.encode(x, key), x, key) for c in comps]

    for comp, decoded in zip(comps, roundtrip(x, jax.random.key(0))):
        assert decoded["a"].shape == (0,), comp.name


# ---- validation of the merged options ------------------------------------------------------------


def test_levels_beyond_int32_are_named():
    with pytest.raises(ValueError, match="levels"):
        C.qsgd(levels=2**40)
    with pytest.raises(ValueError, match="levels"):
        C.qsgd(levels=200, fused=True)  # int8 codes
    with pytest.raises(ValueError, match="levels"):
        C.qsgd(levels=2**24 + 1)  # float32 codes would no longer be exact
    C.qsgd(levels=2**24)  # the largest still builds


@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda: C.qsgd(7, 64, impl="pallas"), ValueError, "impl='pallas'.*fused=True"),
        (lambda: C.qsgd(7, 64, impl="cuda"), ValueError, "impl"),
        (lambda: C.qsgd(7, 64, fused="yes"), TypeError, "fused"),
        (lambda: C.qsgd(7, 100, fused=True), ValueError, "bucket_size"),
        (lambda: C.qsgd(7, 64, scale="l1"), ValueError, "scale"),
        (lambda: C.qsgd(7, 64, rounding="up"), ValueError, "rounding"),
        (lambda: C.sign(impl="pallas"), ValueError, "impl='pallas'.*bucket_size"),
        (lambda: C.sign(scaled=False, bucket_size=32), ValueError, "scaled=True"),
        (lambda: C.sign(bucket_size=16), ValueError, "bucket_size"),
        (lambda: C.terngrad(bucket_size=256), ValueError, "clip_sigma"),
        (lambda: C.terngrad(None, bucket_size=8), ValueError, "bucket_size"),
        (lambda: C.terngrad(rounding="up"), ValueError, "rounding"),
        (lambda: C.terngrad(impl="pallas"), ValueError, "impl='pallas'"),
        (lambda: C.top_k(0.1, impl="pallas"), ValueError, "impl='pallas'.*fused_threshold"),
        (lambda: C.top_k(0.1, tol=0.2), ValueError, "tol"),
        (lambda: C.top_k(0.1, "threshold", max_refine=2), ValueError, "max_refine"),
        (lambda: C.top_k(0.1, "fused_threshold", tol=1.0), ValueError, "tol"),
        (lambda: C.top_k(0.1, "fused_threshold", max_refine=-1), ValueError, "max_refine"),
        (lambda: C.top_k(0.1, "fused_threshold", impl="triton"), ValueError, "impl"),
    ],
)
def test_bad_options_are_named(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


# ---- the options new to a factory: float64 references --------------------------------------------


def _decoded(comp, x, key):
    return np.asarray(comp.codec.decode(comp.codec.encode(x, key), x, key)["v"], np.float64)


def test_qsgd_max_scale_nearest_matches_a_float64_reference():
    """qsgd(s, b, scale="max", rounding="nearest"): sigma_B = max|v|, xi = floor(s|v|/sigma + 1/2)."""
    s, b = 7, 16
    v = np.asarray(jax.random.normal(jax.random.key(4), (50,)), np.float64)
    padded = np.pad(v, (0, -len(v) % b)).reshape(-1, b)
    sigma = np.abs(padded).max(1, keepdims=True)
    ref = (sigma / s * np.sign(padded) * np.minimum(np.floor(s * np.abs(padded) / sigma + 0.5), s)).ravel()
    for fused in (False, True):
        comp = C.qsgd(s, b, scale="max", rounding="nearest", fused=fused)
        got = _decoded(comp, {"v": jnp.asarray(v, jnp.float32)}, jax.random.key(0))
        np.testing.assert_allclose(got, ref[: len(v)], rtol=1e-6, atol=1e-7)
        assert np.abs(got - v).max() <= sigma.max() / (2 * s) + 1e-6


def test_qsgd_fused_norm_scale_is_unbiased_with_l2_buckets():
    """qsgd(fused=True) with the default L2 scale: E[Q(v)] = v, codes bounded by s, one level = 2 bits."""
    s, b = 3, 16
    v = jax.random.normal(jax.random.key(1), (40,)) * jnp.linspace(0.1, 3.0, 40)
    comp = C.qsgd(s, b, fused=True)
    keys = jax.random.split(jax.random.key(2), 3000)
    decode = lambda k: comp.codec.decode(comp.codec.encode({"v": v}, k), {"v": v}, k)["v"]
    samples = np.asarray(jax.jit(jax.vmap(decode))(keys), np.float64)
    mean, std = samples.mean(0), samples.std(0)
    assert np.all(np.abs(mean - np.asarray(v)) <= 5.0 * std / np.sqrt(len(keys)) + 1e-6)
    norms = np.linalg.norm(np.pad(np.asarray(v, np.float64), (0, 8)).reshape(-1, b), axis=1)
    step = np.repeat(norms / s, b)[:40]
    codes = samples / step
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-4)  # multiples of sigma / s
    assert np.abs(codes).max() <= s + 1e-4
    payload = C.qsgd(1, b, fused=True).codec.encode({"v": v}, keys[0])[0]
    assert payload["codes"].dtype == jnp.uint8 and payload["codes"].shape == (3, b // 4)


def test_terngrad_nearest_per_leaf_matches_a_float64_reference():
    v = np.asarray(jax.random.normal(jax.random.key(6), (40,)), np.float64)
    s = np.abs(v).max()
    ref = np.where(np.abs(v) >= s / 2, s * np.sign(v), 0.0)
    comp = C.terngrad(None, rounding="nearest")
    got = _decoded(comp, {"v": jnp.asarray(v, jnp.float32)}, jax.random.key(0))
    np.testing.assert_allclose(got, ref, rtol=1e-6)
