"""impl="auto" never fails: where the Pallas path cannot lower/compile it falls back to XLA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optdist_kernels
from optdist_kernels import _dispatch, batched_inverse_pth_root, ef_quantize, ef_threshold_topk, quantize


@pytest.fixture
def pallas_on_cpu(monkeypatch):
    """Pretend Pallas was measured faster on CPU, so "auto" tries to compile it there (non-interpret
    Pallas cannot lower on CPU, so the compile check must fail and XLA must run)."""
    table = {name: ("cpu",) for name in _dispatch.AUTO_BACKENDS}
    monkeypatch.setattr(_dispatch, "AUTO_BACKENDS", table)
    attempts = []
    real = _dispatch._compiles

    def spy(*args):
        ok = real(*args)
        attempts.append(ok)
        return ok

    monkeypatch.setattr(_dispatch, "_compiles", spy)
    return attempts


def test_auto_falls_back_when_the_backend_cannot_lower(pallas_on_cpu):
    g = jax.random.normal(jax.random.key(0), (300,))
    e = jnp.zeros((300,))
    auto = jax.jit(lambda g, e: ef_quantize(g, e, impl="auto"))(g, e)  # also inside an outer jit
    xla = ef_quantize(g, e, impl="xla")
    assert pallas_on_cpu == [False]  # the compiled Pallas path was tried, and rejected
    np.testing.assert_array_equal(auto[0]["codes"], xla[0]["codes"])
    np.testing.assert_allclose(auto[1], xla[1], atol=1e-6)
    # The compiled (non-interpret) Pallas path really does fail on this backend.
    cfg = quantize.Config("int8", "nearest", "max", 127, 256)
    with pytest.raises(Exception):  # noqa: B017 - whatever the lowering raises
        quantize._encode_pallas(g, e, jnp.zeros((2,), jnp.uint32), cfg=cfg, interpret=False)

    key = jax.random.key(1)
    auto = ef_threshold_topk(g, e, key, 5, impl="auto")
    xla = ef_threshold_topk(g, e, key, 5, impl="xla")
    np.testing.assert_array_equal(auto[0]["indices"], xla[0]["indices"])
    assert pallas_on_cpu[-1] is False


def test_auto_falls_back_for_a_rejected_shape(pallas_on_cpu):
    a = jnp.broadcast_to(2.0 * jnp.eye(24), (2, 24, 24))  # m = 24: not a power of two
    roots, res = batched_inverse_pth_root(a, 2, impl="auto")
    assert pallas_on_cpu == [False]
    np.testing.assert_allclose(roots, jnp.broadcast_to(jnp.eye(24) / np.sqrt(2.0), (2, 24, 24)), rtol=1e-5)


def test_auto_uses_xla_where_pallas_was_not_measured(monkeypatch):
    monkeypatch.setattr(_dispatch, "AUTO_BACKENDS", {})
    calls = []
    monkeypatch.setattr(_dispatch, "_compiles", lambda *a: calls.append(a) or True)
    g = jnp.arange(10.0)
    ef_quantize(g, g, impl="auto")
    assert calls == []  # never even tried on an unlisted backend


def test_exports():
    assert set(optdist_kernels.__all__) >= {"ef_quantize", "decode_accumulate", "ef_threshold_topk"}
    assert optdist_kernels.IMPLS == ("auto", "pallas", "xla")


def test_resolve_impl_is_the_one_decision(monkeypatch):
    resolve = optdist_kernels.resolve_impl
    assert resolve("xla", "ef_quantize") == "xla" and resolve("pallas", "ef_quantize") == "pallas"
    assert resolve("auto", "ef_quantize") == "xla"  # nothing measured on CPU
    assert resolve("auto", "ef_quantize", backend="gpu") == "xla"  # nor on GPU yet
    assert resolve("auto") == "xla"  # no kernel named: nothing listed
    monkeypatch.setattr(_dispatch, "AUTO_BACKENDS", {"ef_quantize": ("gpu",)})
    assert resolve("auto", "ef_quantize", backend="gpu") == "pallas"
    assert resolve("auto", "ef_quantize", backend="cpu") == "xla"
    assert resolve("auto", "ef_threshold_topk", backend="gpu") == "xla"  # unlisted in the patched table
    # A reason the kernel cannot take the inputs: "auto" and "xla" fall back, "pallas" says why.
    assert resolve("auto", "ef_quantize", backend="gpu", unsupported="rank 9 > 8") == "xla"
    assert resolve("xla", unsupported="rank 9 > 8") == "xla"
    with pytest.raises(ValueError, match=r"root_impl='pallas': rank 9 > 8\. Use root_impl='auto'"):
        resolve("pallas", unsupported="rank 9 > 8", param="root_impl")
    for bad in ("cuda", None, "AUTO", 1):
        with pytest.raises(ValueError, match=r"root_impl must be one of \('auto', 'pallas', 'xla'\)"):
            resolve(bad, param="root_impl")
    with pytest.raises(ValueError, match="kernel must be one of"):
        resolve("auto", "ef_quantise")
    assert set(optdist_kernels.KERNELS) == set(optdist_kernels.AUTO_BACKENDS)
    assert {"resolve_impl", "KERNELS", "IMPLS", "AUTO_BACKENDS"} <= set(optdist_kernels.__all__)


def test_the_library_imports_no_private_kernel_module():
    """Callers use optdist_kernels' public names; only the kernel package touches _dispatch."""
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[2] / "optdist"
    offenders = [
        str(path.relative_to(root))
        for path in root.rglob("*.py")
        if "optdist_kernels._dispatch" in path.read_text() or "import _dispatch" in path.read_text()
    ]
    assert offenders == []
