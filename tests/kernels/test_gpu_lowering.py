"""Every Pallas kernel lowers for CUDA through Triton, checked on a CPU-only machine.

``jax.jit(f).trace(...).lower(lowering_platforms=("cuda",))`` runs the Pallas -> Triton IR lowering
(no GPU, no CUDA needed; the target is an abstract H100, which jax >= 0.11 requires), so it rejects
what Triton's Pallas lowering rejects: unsupported primitives
(``round``, ``sort``, ...), non-power-of-two array shapes inside the kernel, and so on. It does not
run Triton's compiler (register limits, dot shape rules are checked only when XLA compiles on a GPU).
"""

import contextlib
import functools
import inspect

import jax
import jax.numpy as jnp
import pytest
from jax.experimental import pallas as pl

from optdist_kernels import _dispatch
from optdist_kernels import powersgd as P
from optdist_kernels import quantize as Q
from optdist_kernels import roots as R
from optdist_kernels import topk as T

TRITON_CALL = "__gpu$xla.gpu.triton"
S = jax.ShapeDtypeStruct
F32 = jnp.float32


def _target_h100():
    """An abstract H100 to lower for: jax >= 0.11's Triton lowering asks the device for its compute
    capability and, with no GPU present, needs an abstract one (``jax.sharding.AbstractDevice``)."""
    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
    return jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device))


def _cuda_hlo(fn, *specs) -> str:
    if "lowering_platforms" not in inspect.signature(jax.stages.Traced.lower).parameters:
        pytest.skip("this jax has no cross-platform lowering through Traced.lower(lowering_platforms=)")
    on_gpu = jax.default_backend() == "gpu"  # a real device answers for itself
    with contextlib.nullcontext() if on_gpu else _target_h100():
        return (
            jax.jit(functools.partial(fn, interpret=False))
            .trace(*specs)
            .lower(lowering_platforms=("cuda",))
            .as_text()
        )


def _quantize_cases():
    d = 3000  # 12 buckets of 256, the last one ragged: 2 programs of 8 rows
    rows = Q.layout(d, 256)[0]
    for scheme, rounding in [
        ("int8", "nearest"),
        ("int8", "stochastic"),
        ("ternary", "stochastic"),
        ("sign", "nearest"),
    ]:
        cfg = Q.Config(scheme, rounding, "max", 127, 256)
        yield (
            f"ef_quantize[{scheme},{rounding}]",
            functools.partial(Q._encode_pallas, cfg=cfg),
            (S((d,), F32), S((d,), F32), S((2,), jnp.uint32)),
            1,
        )
        yield (
            f"decode_accumulate[{scheme}]",
            functools.partial(Q._decode_pallas, cfg=cfg),
            (S((rows, cfg.width), Q._WORD_DTYPE[scheme]), S((rows,), F32), S((d,), F32)),
            1,
        )


def _cases():
    yield from _quantize_cases()
    key = S((), jax.random.key(0).dtype)
    topk = functools.partial(T._topk, k=90, cap=99, tol=0.1, sample_size=512, max_refine=2, pallas=True)
    yield "ef_threshold_topk", topk, (S((9000,), F32), S((9000,), F32), key), 3  # count (x2) + select
    for m in (16, 128):
        for schulz in (False, True):
            roots = functools.partial(
                R._roots_pallas, p=4, iters=3, eps=1e-6, schulz=schulz, precision=jax.lax.Precision.HIGHEST
            )
            yield f"inverse_root[m={m},schulz={schulz}]", roots, (S((2, m, m), F32),), 1
    for b, rows, cols, rank in [(2, 40, 96, 3), (1, 17, 300, 8)]:
        mats = S((b, rows, cols), F32)
        yield (
            f"ef_project[{rows}x{cols},r{rank}]",
            P._ef_project_pallas,
            (mats, mats, S((b, cols, rank), F32)),
            1,
        )
        yield (
            f"decode_residual[{rows}x{cols},r{rank}]",
            P._decode_residual_pallas,
            (mats, S((b, rows, rank), F32), S((b, cols, rank), F32)),
            1,
        )
        yield f"gram_schmidt[{rows},r{rank}]", P._gram_schmidt_pallas, (S((b, rows, rank), F32),), 1


CASES = list(_cases())


@pytest.mark.parametrize("name, fn, specs, calls", CASES, ids=[c[0] for c in CASES])
def test_kernel_lowers_to_triton_for_cuda(name, fn, specs, calls):
    hlo = _cuda_hlo(fn, *specs)
    assert hlo.count(TRITON_CALL) == calls, name
    assert "mosaic_gpu" not in hlo  # jax >= 0.10 defaults pallas_call to Mosaic GPU: we pin Triton


def test_the_check_rejects_what_triton_cannot_lower():
    """The same lowering fails on a kernel using ``round`` and on a non-power-of-two block."""

    def run(kernel, n, block):
        spec = pl.BlockSpec((block,), lambda i: (i,))
        f = lambda x, interpret: _dispatch.call_kernel(  # noqa: E731
            kernel, [x], [spec], [S((n,), F32)], [spec], (n // block,), interpret=interpret
        )[0]
        return _cuda_hlo(f, S((n,), F32))

    def rounds(x_ref, o_ref):
        o_ref[...] = jnp.round(x_ref[...])

    def floors(x_ref, o_ref):
        o_ref[...] = jnp.floor(x_ref[...] + 0.5)

    assert TRITON_CALL in run(floors, 64, 16)
    with pytest.raises(NotImplementedError, match="round"):
        run(rounds, 64, 16)
    with pytest.raises(ValueError, match="power of 2"):
        run(floors, 48, 24)
