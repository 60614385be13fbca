"""A branch on a per-worker predicate that stays a branch when workers are simulated.

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
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from optdist.comm.axes import current_simulated_axes


def worker_cond(pred: Any, true_fn: Callable[..., Any], false_fn: Callable[..., Any], *operands: Any) -> Any:
    """``true_fn(*operands)`` where this worker's ``pred`` holds, else ``false_fn(*operands)``.

    Same contract as ``lax.cond`` (both branches return the same structure); see the module docstring
    for how it avoids running both branches under simulated workers.
    """
    pred = jnp.asarray(pred, bool)
    axes = current_simulated_axes()
    if not axes:
        return lax.cond(pred, true_fn, false_fn, *operands)
    flag = pred.astype(jnp.int32)
    try:
        any_true = lax.pmax(flag, axes) > 0
        all_true = lax.pmin(flag, axes) > 0
    except NameError:  # traced outside the simulated mapping (e.g. a nested transformation)
        return lax.cond(pred, true_fn, false_fn, *operands)

    def mixed(*ops):
        return jax.tree_util.tree_map(lambda t, f: jnp.where(pred, t, f), true_fn(*ops), false_fn(*ops))

    index = jnp.where(all_true, 1, jnp.where(any_true, 2, 0))
    return lax.switch(index, (false_fn, true_fn, mixed), *operands)
