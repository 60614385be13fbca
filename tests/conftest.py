"""Test setup: 8 forced CPU devices, set before JAX initializes.

``OPTDIST_TEST_ACCELERATOR=1`` leaves the platform alone instead, to run the tests that need no
8 devices (``tests/kernels``: Pallas kernels compiled for the local GPU, not interpreted) on an
accelerator, as ``experiments/benchmarks/gpu.sh`` does.
"""

import os

ON_ACCELERATOR = os.environ.get("OPTDIST_TEST_ACCELERATOR") == "1"
if not ON_ACCELERATOR:
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

if not ON_ACCELERATOR:
    assert jax.device_count() == 8, "tests need 8 CPU devices: JAX was initialised before conftest ran"
