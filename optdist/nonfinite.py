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


def _communicating_axes(inner_state: Any) -> list:
    """The axes named by the byte counters in ``inner_state`` (the axes the inner chain talks over)."""
    leaves = jax.tree_util.tree_leaves(inner_state, is_leaf=_is_counter)
    axes = {repr(c.axis): c.axis for c in leaves if _is_counter(c) and c.axis is not None}
    return [axes[k] for k in sorted(axes)]


def _check_axis(axis_name: AxisName, inner_state: Any) -> None:
    """Without an axis the skip decision is this worker's alone, so a communicating inner chain would
    desynchronize the replicas: refuse it, naming the axis to pass."""
    if axis_name is not None:
        return
    axes = _communicating_axes(inner_state)
    if axes:
        fix = f"axis_name={axes[0]!r}" if len(axes) == 1 else "axis_name=(every one of them, outermost first)"
        raise ValueError(
            f"skip_nonfinite(inner, axis_name=None) wraps a chain that communicates over "
            f"{', '.join(repr(a) for a in axes)}: without an axis each worker decides alone, a faulty "
            "worker skips while its peers apply the step, and the replicas drift apart. Pass the "
            f"worker axis: skip_nonfinite(inner, {fix})."
        )


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

    ``axis_name`` must be the workers' axis whenever ``inner`` communicates: with
    ``axis_name=None`` a worker would skip on its own NaN while its peers apply a step
    computed from the others' gradients, and the replicas would silently drift apart.
    So with ``axis_name=None`` and an inner state holding a byte counter for some axis
    (every communicating optdist transform keeps one), ``init`` and ``update`` raise a
    ValueError naming that axis. (The axis is not inferred: a chain may talk over several
    axes, and the flag must span all of them.)

    ``check_inputs``: with the default ``True`` a non-finite gradient on *any* worker skips
    the step everywhere, which is right when the inner chain would spread it (an exact or
    compressed mean, gossip, an outer loop). Pass ``check_inputs=False`` when the inner
    chain absorbs a faulty worker by design — a robust aggregator (trimmed mean, median,
    Krum, ...) that discards a NaN row: then only a non-finite *output* skips. With the
    default, one persistently faulty worker would stop training altogether (every step
    skipped), although the aggregate is finite.

    Args:
      inner: the transform (usually the whole chain) to protect.
      axis_name: the worker axis to agree over; None only for one worker (or an inner chain
        that does not communicate).
      check_inputs: also skip when this worker's incoming gradient is non-finite (see above).

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example::

      tx = optdist.skip_nonfinite(optax.chain(optdist.mean_gradients("data"), optax.adam(1e-3)), "data")
      robust = optdist.skip_nonfinite(
          optax.chain(optdist.robust_mean(optdist.aggregators.trimmed_mean(1), "data"), optax.sgd(0.1)),
          "data",
          check_inputs=False,  # the trimmed mean discards a NaN worker; do not stop training for it
      )
    """
    if not (callable(getattr(inner, "init", None)) and callable(getattr(inner, "update", None))):
        raise TypeError(f"inner must be an optax.GradientTransformation; got {inner!r}.")
    axis_name = validate_axis_name(axis_name)
    if not isinstance(check_inputs, bool):
        raise TypeError(f"check_inputs must be a bool; got {check_inputs!r}.")
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        inner_state = inner.init(params)
        _check_axis(axis_name, inner_state)
        return SkipNonFiniteState(inner_state, jnp.zeros((), jnp.int32), ByteCounter.zeros(axis_name))

    def update_fn(updates, state, params=None, **extra_args):
        _check_axis(axis_name, state.inner_state)
        new_updates, new_inner = inner.update(updates, state.inner_state, params, **extra_args)
        bad = _any_nonfinite(new_updates)
        if check_inputs:
            bad = bad | _any_nonfinite(updates)
        channel = Channel(axis_name, state.bytes_sent)
        bad = channel.pmax(bad.astype(jnp.int32)) > 0

        def keep(old, new):
            if _is_counter(new):
                return new  # bytes were sent whether or not the step is applied
            return jnp.where(bad, old, new)

        inner_state = jax.tree_util.tree_map(keep, state.inner_state, new_inner, is_leaf=_is_counter)
        new_updates = jax.tree_util.tree_map(lambda u: jnp.where(bad, jnp.zeros_like(u), u), new_updates)
        return new_updates, SkipNonFiniteState(
            inner_state, state.skipped + bad.astype(jnp.int32), channel.counter
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
