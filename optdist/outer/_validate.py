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


def forwarded(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments an alias forwards to :func:`optdist.outer_loop`.

    ``optax.inject_hyperparams`` binds a factory's signature and passes the ``**kwargs`` catch-all
    back *by name* (``kwargs={...}``); this unpacks it, so the aliases can be injected.
    """
    nested = kwargs.pop("kwargs", None)
    if nested is None:
        return kwargs
    if not isinstance(nested, dict):
        raise TypeError(f"kwargs must be a dict of outer_loop options; got {nested!r}.")
    return {**nested, **kwargs}


def transformation(value: Any, name: str) -> Any:
    """An optax gradient transformation (anything with ``init`` and ``update``), else a TypeError."""
    if not (callable(getattr(value, "init", None)) and callable(getattr(value, "update", None))):
        raise TypeError(
            f"{name} must be an optax.GradientTransformation (e.g. optax.adamw(1e-3)); got {value!r}."
        )
    return value
