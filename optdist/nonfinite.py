"""Skipping steps with non-finite updates, in agreement across workers."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optdist.comm.accounting import ByteCounter
from optdist.comm.axes import AxisName, validate_axis_name
from optdist.comm.channel import Channel


class SkipNonFiniteState(NamedTuple):
    """State of :func:`skip_nonfinite`.

    Attributes:
      inner_state: the wrapped transform's state (unchanged on skipped steps,
        except its byte counters, which record what was really sent).
      skipped: number of skipped steps (identical on every worker).
      bytes_sent: bytes of the agreement flag's all-reduce.
    """

    inner_state: Any
    skipped: jax.Array
    bytes_sent: ByteCounter


def _is_counter(x: Any) -> bool:
    return isinstance(x, ByteCounter)


def _any_nonfinite(tree: Any) -> jax.Array:
    flags = [jnp.any(~jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]
    return jnp.any(jnp.stack(flags)) if flags else jnp.array(False)


def skip_nonfinite(
    inner: optax.GradientTransformation, axis_name: AxisName = None, *, check_inputs: bool = True
) -> optax.GradientTransformationExtraArgs:
    r"""Runs ``inner``; if any worker's gradient or output is NaN/Inf, every worker skips the step.

    ``optax.apply_if_finite`` checks its *input* on each worker alone: with a
    communicating transform inside, a NaN from one worker reaches the others
    through the mean after their check, and their parameters become NaN while
    the faulty worker alone skips. This wrapper checks the inner transform's
    *input* gradient and its *output* and agrees across workers (one
    all-reduce of a 4-byte flag, by ``pmax``), so on a bad step every worker
    returns zero updates and keeps its previous inner state — except byte
    counters, which keep what was sent. Checking the input matters for
    compressors that can drop a NaN coordinate silently (a sparsifier that does
    not pick it, TernGrad whose NaN scale decodes to zeros).

    With ``check_inputs=False`` only the output decides: use it with robust
    aggregation, where a faulty worker's NaN is meant to be discarded by the
    aggregator rather than stop training.

    Args:
      inner: the transform (usually the whole chain) to protect.
      axis_name: the worker axis to agree over, or None for one worker.
      check_inputs: also skip when this worker's incoming gradient is non-finite.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.
    """
    if not (callable(getattr(inner, "init", None)) and callable(getattr(inner, "update", None))):
        raise TypeError(f"inner must be an optax.GradientTransformation; got {inner!r}.")
    axis_name = validate_axis_name(axis_name)
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        return SkipNonFiniteState(inner.init(params), jnp.zeros((), jnp.int32), ByteCounter.zeros(axis_name))

    def update_fn(updates, state, params=None, **extra_args):
        new_updates, new_inner = inner.update(updates, state.inner_state, params, **extra_args)
        bad = _any_nonfinite(new_updates)
        if check_inputs:
            bad = bad | _any_nonfinite(updates)
        channel = Channel(axis_name)
        bad = channel.pmax(bad.astype(jnp.int32)) > 0

        def keep(old, new):
            if _is_counter(new):
                return new
            return jnp.where(bad, old, new)

        inner_state = jax.tree_util.tree_map(keep, state.inner_state, new_inner, is_leaf=_is_counter)
        new_updates = jax.tree_util.tree_map(lambda u: jnp.where(bad, jnp.zeros_like(u), u), new_updates)
        return new_updates, SkipNonFiniteState(
            inner_state, state.skipped + bad.astype(jnp.int32), state.bytes_sent.add(channel.nbytes)
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
