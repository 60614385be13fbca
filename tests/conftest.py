"""Test setup: 8 forced CPU devices, set before JAX initializes.

``OPTDIST_TEST_ACCELERATOR=1`` leaves the platform alone instead, to run the tests that need no
8 devices (``tests/kernels``: Pallas kernels compiled for the local GPU, not interpreted) on an
accelerator, as ``experiments/benchmarks/gpu.sh`` does.
"""

import os

ON_ACCELERATOR = os.environ.get("OPTDIST_TEST_ACCELERATOR") == "1"
if not ON_ACCELERATOR:
    # LLVM optimization level 0 for the CPU backend: the suite's programs are tiny, so compiling
    # them dominates; -O0 codegen leaves XLA's HLO passes (what the byte audit reads) unchanged.
    # A flag given in XLA_FLAGS comes later and wins.
    os.environ["XLA_FLAGS"] = (
        "--xla_backend_optimization_level=0 "
        + os.environ.get("XLA_FLAGS", "")
        + " --xla_force_host_platform_device_count=8"
    ).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

if not ON_ACCELERATOR:
    assert jax.device_count() == 8, "tests need 8 CPU devices: JAX was initialised before conftest ran"


import pytest  # noqa: E402

# Suites parametrized over tests/test_common.py's REGISTRY share one compiled run per transform
# (functools.cache): keep one transform's tests of one module on one xdist worker.
_PER_TRANSFORM_MODULES = {
    "tests.test_common",
    "tests.test_optax_conventions",
    "tests.test_validation",
    "tests.comm.test_byte_audit",
}


def pytest_configure(config):
    if getattr(config.option, "dist", "no") == "load":
        config.option.dist = "loadgroup"


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        module = getattr(item.module, "__name__", "")
        if module in _PER_TRANSFORM_MODULES and isinstance(params.get("name"), str):
            item.add_marker(pytest.mark.xdist_group(f"{module}:{params['name']}"))
