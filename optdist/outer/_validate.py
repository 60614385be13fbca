"""Hyperparameter checks shared by the outer-loop aliases."""

from __future__ import annotations

from typing import Any

from optdist import _checks


def learning_rate(value: Any, name: str) -> Any:
    """A positive float, or a schedule (callable) left to optax."""
    if callable(value):
        return value
    return _checks.in_range(value, name, 0.0, float("inf"), low_open=True, high_open=True)


def decay(value: Any, name: str) -> float:
    """A momentum/decay rate in [0, 1)."""
    return _checks.in_range(value, name, 0.0, 1.0, high_open=True)
