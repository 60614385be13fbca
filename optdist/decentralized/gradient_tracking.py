r"""Gradient tracking: each worker tracks the network-average gradient by gossip.

Plain decentralized SGD with a constant step size converges to a point biased by the workers'
gradient heterogeneity: at consensus every worker steps along its *own* gradient, which is not zero at
the global optimum. Gradient tracking (DIGing, Nedić, Olshevsky, Shi 2017; Qu & Li 2018) replaces
the gradient by a tracker ``y_i`` that follows ``(1/n) Σ_j ∇f_j``:

.. math::
    y_i^{t} = \sum_j W_{ij} y_j^{t-1} + g_i^{t} - g_i^{t-1}, \qquad y_i^{-1} = g_i^{-1} = 0,

so ``y^0 = g^0`` and ``mean_i y_i^t = mean_i g_i^t`` at every step (``W`` is doubly stochastic). This
transform outputs ``y_i``; chained with an optimizer and :func:`optdist.gossip` it gives DIGing
exactly:

.. code-block:: python

    tx = optax.chain(optdist.gradient_tracking("ring", "data"), optax.sgd(lr),
                     optdist.gossip("ring", "data", order="combine_then_adapt"))
    # x_i ← Σ_j W_ij x_j − lr · y_i

and, with the default adapt-then-combine gossip, its ATC variant ``x ← W (x − lr · y)``. With a
constant step size both converge linearly to the exact optimum on strongly convex problems where
plain D-SGD stalls at a bias.

State (per worker): the tracker ``y_i`` and the previous gradient ``g_i^{t-1}``, two parameter-sized
buffers (float32 for half-precision gradients), plus the byte counter. Bytes per worker per step: the
tracker once per neighbour term of the topology (on top of the parameters' gossip), sent in the
gradients' dtype (a bfloat16 model sends bfloat16); as in :func:`optdist.gossip` the rounding of
what is sent stays local (``y_i ← (y_i - ỹ_i) + Σ_j W_ij ỹ_j + g_i^t - g_i^{t-1}``), so
``mean_i y_i = mean_i g_i`` is kept as in full precision, and with float32 gradients this is the
rule above bit for bit. Leaves with no elements pass through untouched (nothing is sent).

References:
  Nedić, Olshevsky, Shi, "Achieving Geometric Convergence for Distributed Optimization over
  Time-Varying Graphs", SIAM J. Optim. 2017.
  Qu, Li, "Harnessing Smoothness to Accelerate Distributed Optimization", IEEE TCNS 2018.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optdist import _checks
from optdist.comm.accounting import ByteCounter
from optdist.comm.axes import AxisName, num_workers, validate_axis_name
from optdist.comm.channel import Channel
from optdist.comm.packing import compute_dtype
from optdist.decentralized import topology as topo
from optdist.decentralized.gossip import mix_keeping_residual


class GradientTrackingState(NamedTuple):
    """State of :func:`gradient_tracking` (per worker): step count, tracker ``y_i``, previous gradient,
    bytes."""

    count: jax.Array
    tracker: Any
    previous_gradient: Any
    bytes_sent: ByteCounter


def gradient_tracking(
    topology: str | topo.Topology, axis_name: AxisName
) -> optax.GradientTransformationExtraArgs:
    """Replaces each worker's gradient by its tracker of the average gradient (see the module docstring).

    Args:
      topology: a name (``"ring"``, ``"torus"``, ``"exponential"``, ``"complete"``,
        ``"one_peer_exponential"``), a :class:`~optdist.decentralized.Topology` or a
        :class:`~optdist.decentralized.TopologySchedule` (use the same graph as the parameters'
        gossip).
      axis_name: worker axis, or None for one worker (the tracker is then the gradient).

    Returns:
      An ``optax.GradientTransformationExtraArgs``.
    """
    topology = topo.validate(topology)
    axis_name = validate_axis_name(axis_name)

    def init_fn(params):
        zeros = jax.tree_util.tree_map(lambda p: jnp.zeros_like(p, dtype=compute_dtype(p.dtype)), params)
        return GradientTrackingState(jnp.zeros((), jnp.int32), zeros, zeros, ByteCounter.zeros(axis_name))

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        _checks.check_same_structure(updates, params, "params")
        _checks.check_same_structure(updates, state.tracker, "the tracker in the state")
        _checks.check_floating(updates, "gradient_tracking")
        graphs = topo.resolve(topology, num_workers(axis_name))
        channel = Channel(axis_name, state.bytes_sent)
        live = _checks.nonempty_leaves(updates)  # leaves without elements: nothing to track or send
        grads = live.pick(updates)
        g = [x.astype(compute_dtype(x.dtype)) for x in grads]
        previous = live.pick(state.previous_gradient)
        mixed = mix_keeping_residual(live.pick(state.tracker), grads, graphs, state.count, channel)
        tracker = jax.tree_util.tree_map(lambda m, new, old: m + (new - old), mixed, g, previous)
        out = live.put(updates, [y.astype(u.dtype) for y, u in zip(tracker, grads)])
        tracker, g = live.put(state.tracker, tracker), live.put(state.previous_gradient, g)
        return out, GradientTrackingState(state.count + 1, tracker, g, channel.counter)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
