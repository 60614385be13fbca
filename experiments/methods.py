"""Named optimizer stacks for experiments: ``config.method`` -> optax transform.

Every entry is built for worker axis ``axis_name`` and returns a transform
that takes per-worker gradients. ``communicates`` says whether the method
talks to other workers (then non-finite steps are skipped in agreement over
the axis; otherwise each worker decides alone).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import optax

import optdist


@dataclasses.dataclass(frozen=True)
class Method:
    build: Callable[[object, str], optax.GradientTransformation]
    communicates: bool = True
    description: str = ""


METHODS: dict[str, Method] = {}


def register(name: str, *, communicates: bool = True, description: str = ""):
    def deco(fn):
        METHODS[name] = Method(fn, communicates, description)
        return fn

    return deco


def base_optimizer(config) -> optax.GradientTransformation:
    """The per-step optimizer chained after the communication transform."""
    lr = config.learning_rate
    if config.optimizer == "sgd":
        return optax.sgd(lr, momentum=config.get("momentum", 0.9))
    if config.optimizer == "adam":
        return optax.adam(lr)
    if config.optimizer == "adamw":
        return optax.adamw(lr, weight_decay=config.get("weight_decay", 1e-4))
    raise ValueError(f"Unknown optimizer {config.optimizer!r}: choose 'sgd', 'adam' or 'adamw'.")


@register("exact_mean", description="synchronous data parallel: exact all-reduce mean")
def _exact_mean(config, axis_name):
    return optax.chain(optdist.mean_gradients(axis_name), base_optimizer(config))


@register("local_only", communicates=False, description="each worker trains alone; no communication")
def _local_only(config, axis_name):
    del axis_name
    return base_optimizer(config)


def build(config, axis_name: str = "data") -> optax.GradientTransformation:
    """The transform named by ``config.method``, wrapped in the agreed non-finite skip."""
    if config.method not in METHODS:
        raise ValueError(f"Unknown method {config.method!r}; choose one of {sorted(METHODS)}.")
    method = METHODS[config.method]
    tx = method.build(config, axis_name)
    if config.get("skip_nonfinite", True):
        tx = optdist.skip_nonfinite(tx, axis_name if method.communicates else None)
    return tx
