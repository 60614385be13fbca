"""A branch on a per-worker predicate (or index) that stays a branch when workers are simulated.

``jax.vmap`` turns ``lax.cond`` with a batched predicate into a select that runs *both* branches on
every call. Under :func:`optdist.simulate` every per-worker value is batched, including a step counter
that is identical on all workers, so a Shampoo root refresh "every 100 steps" or an outer-loop sync
"every 50 steps" would run on every step. :func:`worker_cond` reduces the predicate over the simulated
(``vmap``) axes only (:func:`optdist.comm.axes.current_simulated_axes`; no device-to-device traffic),
branches on the unbatched result with ``lax.switch``, and stays exact per worker when simulated
workers disagree:

* no worker's predicate holds: ``false_fn`` only;
* every worker's holds: ``true_fn`` only;
* mixed (never for a replicated step counter): both, each worker keeping its own branch's result.

Outside a simulation (``shard_map``, ``pmap``, one worker) it is exactly ``lax.cond``.
:func:`worker_switch` is the same for ``lax.switch`` (e.g. a gossip graph that changes every step).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from optdist.comm.axes import current_simulated_axes


def worker_switch(index: Any, branches: Sequence[Callable[..., Any]], *operands: Any) -> Any:
    """``branches[index](*operands)`` with this worker's ``index``: ``lax.switch`` kept a real branch
    under simulated workers (see the module docstring; index out of range is clamped as by
    ``lax.switch``).

    Under a simulation the index is reduced over the simulated axes: if every worker holds the same
    index, only that branch runs; otherwise every branch runs and each worker keeps its own.
    """
    index = jnp.clip(jnp.asarray(index, jnp.int32), 0, len(branches) - 1)
    axes = current_simulated_axes()
    if not axes:
        return lax.switch(index, branches, *operands)
    try:
        low, high = lax.pmin(index, axes), lax.pmax(index, axes)
    except NameError:  # traced outside the simulated mapping (e.g. a nested transformation)
        return lax.switch(index, branches, *operands)

    def mixed(*ops):
        outs = [branch(*ops) for branch in branches]
        return jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves)[index], *outs)

    agreed = jnp.where(low == high, low, len(branches))
    return lax.switch(agreed, (*branches, mixed), *operands)


def worker_cond(pred: Any, true_fn: Callable[..., Any], false_fn: Callable[..., Any], *operands: Any) -> Any:
    """``true_fn(*operands)`` where this worker's ``pred`` holds, else ``false_fn(*operands)``.

    Same contract as ``lax.cond`` (both branches return the same structure); see the module docstring
    for how it avoids running both branches under simulated workers.
    """
    pred = jnp.asarray(pred, bool)
    if not current_simulated_axes():
        return lax.cond(pred, true_fn, false_fn, *operands)
    return worker_switch(pred.astype(jnp.int32), (false_fn, true_fn), *operands)
