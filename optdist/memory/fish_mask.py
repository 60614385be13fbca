"""FISH masks: a fixed top-k empirical-Fisher mask; updates and communication restricted to it."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optdist import _checks
from optdist.comm.accounting import ByteCounter
from optdist.comm.axes import AxisName, validate_axis_name
from optdist.comm.channel import Channel
from optdist.compression.top_k import num_kept


def fisher_diagonal(grad_fn: Callable[[Any, Any], Any], params: Any, batches: Iterable[Any]) -> Any:
    r"""The empirical Fisher diagonal :math:`\hat F = \frac1N \sum_{i=1}^N (\nabla_\theta \ell(x_i, y_i))^2`.

    ``grad_fn(params, batch)`` returns the gradient of the loss on ``batch`` (with the *true* labels:
    the empirical Fisher, as in the paper). Pass batches of one example (or ``grad_fn`` returning the
    sum of per-example squared gradients via ``jax.vmap``) for the per-example Fisher of the paper; a
    batch-mean gradient squares the mean instead (a cheaper, coarser estimate).

    Args:
      grad_fn: ``grad_fn(params, batch) -> gradient tree``.
      params: the parameters the mask is computed at (the pre-trained model).
      batches: an iterable of ``N >= 1`` batches.

    Returns:
      A float32 tree shaped like ``params``: the mean squared gradient.
    """
    total, count = None, 0
    for batch in batches:
        g = grad_fn(params, batch)
        sq = jax.tree_util.tree_map(lambda x: jnp.square(x.astype(jnp.float32)), g)
        total = sq if total is None else jax.tree_util.tree_map(jnp.add, total, sq)
        count += 1
    if count == 0:
        raise ValueError("fisher_diagonal needs at least one batch in batches; got none.")
    return jax.tree_util.tree_map(lambda x: x / count, total)


def fisher_mask(fisher: Any, density: float) -> Any:
    r"""The FISH mask: the :math:`k = \lceil \text{density} \cdot d \rceil` largest entries of the Fisher
    diagonal over the *whole* tree (``d`` parameters in all), as in the paper.

    Ties are broken by position in the flattened tree (stable), so every worker computing the mask
    from the same Fisher gets the same one.

    Args:
      fisher: a tree of non-negative scores (e.g. :func:`fisher_diagonal`), concrete values.
      density: fraction of all parameters kept, in (0, 1].

    Returns:
      A tree of NumPy bool arrays shaped like ``fisher`` with exactly ``k`` True entries.
    """
    density = _checks.in_range(density, "density", 0.0, 1.0, low_open=True)
    leaves, treedef = jax.tree_util.tree_flatten(fisher)
    try:
        flat = [np.asarray(x, np.float64).reshape(-1) for x in leaves]
    except jax.errors.ConcretizationTypeError:
        raise TypeError("fisher_mask needs concrete Fisher values: compute the mask outside jit.") from None
    scores = np.concatenate(flat) if flat else np.zeros((0,))
    chosen = np.zeros(scores.shape[0], bool)
    if scores.size:
        chosen[np.argsort(-scores, kind="stable")[: num_kept(density, scores.size)]] = True
    out, start = [], 0
    for x, f in zip(leaves, flat):
        out.append(chosen[start : start + f.size].reshape(np.shape(x)))
        start += f.size
    return jax.tree_util.tree_unflatten(treedef, out)


class FishMaskState(NamedTuple):
    """State of :func:`fish_mask`.

    Attributes:
      indices: per leaf (leaf order), the flat int32 positions of the mask's entries (fixed at init,
        identical on every worker; checkpointed with the state, never sent).
      bytes_sent: bytes this worker has sent (identical on every worker).
    """

    indices: tuple
    bytes_sent: ByteCounter


def _concrete_mask(mask: Any, params: Any) -> list[np.ndarray]:
    m = mask(params) if callable(mask) else mask
    _checks.check_same_structure(m, params, "params")  # names the structures and shapes
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(m)[0]:
        try:
            arr = np.asarray(leaf)
        except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
            raise TypeError(
                "fish_mask needs a concrete mask (NumPy or concrete jax bools, e.g. from "
                "optdist.memory.fisher_mask); the mask at "
                f"{jax.tree_util.keystr(path) or 'the root'} is traced. Compute it outside jit."
            ) from None
        if arr.dtype != np.bool_:
            raise TypeError(
                f"fish_mask: the mask at {jax.tree_util.keystr(path) or 'the root'} has dtype {arr.dtype}; "
                "pass booleans (use optdist.memory.fisher_mask(fisher, density))."
            )
        out.append(arr.reshape(-1))
    return out


def fish_mask(mask: Any, axis_name: AxisName) -> optax.GradientTransformationExtraArgs:
    r"""Mean gradient restricted to a fixed sparse mask; only the ``k`` masked values are sent.

    With a fixed mask :math:`M \subset [d]` of :math:`k = |M|` entries (computed once, e.g. by
    :func:`fisher_mask` from :func:`fisher_diagonal` on a few batches: the top-k empirical Fisher
    entries), worker :math:`i` sends :math:`g_i[M]` and every worker gets

    .. math:: \hat g[j] = \frac1n \sum_i g_i[j] \ (j \in M), \qquad \hat g[j] = 0 \ (j \notin M).

    Chained with an optimizer whose update for a zero gradient and zero state is exactly zero (SGD,
    momentum, Adam), the off-mask parameters stay bit-identical to their initial values. (With
    decoupled weight decay they would decay: mask it with ``optax.masked(..., mask)``.)

    Bytes: the masked values of every leaf travel as one concatenated vector of :math:`k` values in
    one all-reduce, ``2 (n - 1) ceil(k / n) s`` per step; the mask is shared, so no index is ever
    sent. ``mask`` may be a tree of booleans shaped like the parameters or a function
    ``params -> mask``; it is read at ``init`` (it must be concrete there) and kept in the state as
    positions.

    Deviation: the paper trains the masked parameters of a single model; here the same mask also
    restricts what data-parallel workers exchange (its communication saving).

    Args:
      mask: boolean tree (or ``params -> boolean tree``) of the parameters' structure and shapes.
      axis_name: the worker axis (str or tuple), or None for one worker.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with a :class:`FishMaskState`.

    Example::

      fisher = optdist.memory.fisher_diagonal(jax.grad(loss), params, few_batches)
      mask = optdist.memory.fisher_mask(fisher, density=0.005)
      tx = optax.chain(optdist.memory.fish_mask(mask, "data"), optax.adam(1e-4))

    References:
      Sung, Nair, Raffel, "Training Neural Networks with Fixed Sparse Masks", NeurIPS 2021.
    """
    axis_name = validate_axis_name(axis_name)
    if not callable(mask):
        _concrete_mask(mask, mask)  # a bad mask fails here, not at init

    def init_fn(params):
        _checks.check_floating(params, "fish_mask", "parameters")
        flat = _concrete_mask(mask, params)
        # zeros + constant: a jax-created array (placed like init's other state, also under eval_shape)
        indices = tuple(
            jnp.zeros((int(m.sum()),), jnp.int32) + np.flatnonzero(m).astype(np.int32) for m in flat
        )
        return FishMaskState(indices, ByteCounter.zeros(axis_name))

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        _checks.check_same_structure(updates, params, "params")
        _checks.check_floating(updates, "fish_mask")
        leaves, treedef = jax.tree_util.tree_flatten(updates)
        if len(leaves) != len(state.indices):
            raise ValueError(
                f"fish_mask: the gradient tree has {len(leaves)} leaves, the mask {len(state.indices)}; "
                "pass gradients of the parameters the state was initialised with."
            )
        dtype = jnp.result_type(*leaves) if leaves else jnp.float32
        picked = [leaf.reshape(-1)[idx].astype(dtype) for leaf, idx in zip(leaves, state.indices)]
        sizes = [p.shape[0] for p in picked]
        channel = Channel(axis_name, state.bytes_sent)
        out = list(leaves)
        if sum(sizes):
            mean = channel.pmean(jnp.concatenate(picked))
            start = 0
            for i, (leaf, idx, k) in enumerate(zip(leaves, state.indices, sizes)):
                values = mean[start : start + k].astype(leaf.dtype)
                out[i] = (
                    jnp.zeros((math.prod(leaf.shape),), leaf.dtype).at[idx].set(values).reshape(leaf.shape)
                )
                start += k
        else:
            out = [jnp.zeros_like(leaf) for leaf in leaves]
        return jax.tree_util.tree_unflatten(treedef, out), FishMaskState(state.indices, channel.counter)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
