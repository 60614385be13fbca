"""The one timing helper of the benchmark scripts: warm-up, ``block_until_ready``, median (or best) of
repeats, and a description of the machine the numbers come from.

Every script under :mod:`experiments.benchmarks` times through :func:`seconds_per_call`, so "ms/step"
means the same thing in every table: compile and warm-up calls excluded, each timed call waits for its
result (``jax.block_until_ready``), and the reported figure is the median (or the minimum, where a
script says so) over ``repeats`` timed calls.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax

REDUCTIONS = ("median", "min")


def seconds_per_call(
    fn: Callable[..., Any],
    *args: Any,
    repeats: int = 3,
    warmup: int = 1,
    number: int = 1,
    reduce: str = "median",
) -> float:
    """Wall seconds of one ``fn(*args)`` call, compile and warm-up excluded.

    Args:
      fn: the function to time (usually jitted); called as ``fn(*args)``.
      *args: its arguments (a closure with no arguments works too).
      repeats: timed samples; the result is their ``reduce``.
      warmup: untimed calls first (the first compiles).
      number: calls per timed sample (the sample is divided by ``number``); more than one lets
        asynchronous dispatch overlap consecutive calls, as a training loop does.
      reduce: ``"median"`` (robust to one disturbed sample) or ``"min"`` (the least-disturbed one).

    Returns:
      Seconds per call.
    """
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}; got {reduce!r}.")
    for name, value, least in (("repeats", repeats, 1), ("warmup", warmup, 0), ("number", number, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an int >= {least}; got {value!r}.")
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = None
        for _ in range(number):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - start) / number)
    return statistics.median(samples) if reduce == "median" else min(samples)


def machine() -> dict[str, Any]:
    """What the numbers were measured on: device, backend, host CPU and cores, versions."""
    device = jax.devices()[0]
    return {
        "device": str(getattr(device, "device_kind", device)),
        "backend": jax.default_backend(),
        "device_count": jax.device_count(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "jax": jax.__version__,
        "python": platform.python_version(),
    }


def describe(info: dict[str, Any] | None = None) -> str:
    """One line for a table's title, e.g. ``cpu (x86_64, 2 cores), jax 0.10.2``."""
    info = info or machine()
    return f"{info['device']} ({info['cpu']}, {info['cpu_cores']} cores), jax {info['jax']}"
