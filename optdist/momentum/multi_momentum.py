r"""Multi-momentum (Tondji, Kashubin, Cisse): one momentum buffer per data cluster, step on their average."""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optdist import _checks

ClusterSchedule = Callable[[jax.Array], Any]


class MultiMomentumState(NamedTuple):
    """State of :func:`scale_by_multi_momentum`.

    Attributes:
      count: steps taken (for ``cluster_schedule``).
      momenta: ``K`` trees shaped like the parameters, one heavy-ball buffer per cluster.
    """

    count: jax.Array
    momenta: tuple[Any, ...]


def _check_cluster(cluster: Any, num_clusters: int) -> jax.Array:
    if isinstance(cluster, (bool, np.bool_)):
        raise TypeError(f"cluster must be an integer cluster id; got {cluster!r}.")
    if isinstance(cluster, (numbers.Integral, np.integer)):
        if not 0 <= int(cluster) < num_clusters:
            raise ValueError(
                f"cluster={int(cluster)} is out of range for num_clusters={num_clusters}: pass an id in "
                f"[0, {num_clusters - 1}]."
            )
        return jnp.asarray(int(cluster), jnp.int32)
    cluster = jnp.asarray(cluster)
    if cluster.shape != () or not jnp.issubdtype(cluster.dtype, jnp.integer):
        raise TypeError(
            f"cluster must be a scalar integer (this step's cluster id); got shape {cluster.shape} and "
            f"dtype {cluster.dtype}."
        )
    return cluster.astype(jnp.int32)


def scale_by_multi_momentum(
    num_clusters: int,
    beta: float = 0.9,
    *,
    cluster_schedule: ClusterSchedule | None = None,
    accumulator_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Multi-momentum: a heavy-ball buffer per data cluster; the output is their average.

    With :math:`K` clusters and this step's gradient :math:`g_t` from cluster :math:`c_t`:

    .. math::
       m_k \leftarrow \begin{cases} \beta\, m_k + g_t & k = c_t \\ m_k & k \ne c_t \end{cases},
       \qquad d_t = \frac1K \sum_{k=1}^{K} m_k,

    (zero buffers at init), output :math:`d_t`. ``optax.trace``'s convention (no dampening), so
    with :math:`K = 1` it *is* ``optax.trace(beta)`` and
    ``optax.chain(scale_by_multi_momentum(1, beta), optax.scale_by_learning_rate(lr))`` is
    ``optax.sgd(lr, momentum=beta)``. Each buffer averages the recent gradients of its own
    cluster, so the average :math:`d_t` keeps the information of every cluster instead of the
    last few batches (the paper's variance reduction; it builds on Yuan et al.'s multi-momentum).

    The cluster id comes per call: ``tx.update(grads, state, params, cluster=k)`` (a Python int,
    checked, or a traced integer scalar). Without it, ``cluster_schedule(count)`` gives it (e.g.
    ``lambda t: t % K`` for a loader that cycles through the clusters). A traced id outside
    ``[0, K)`` cannot raise: the output is then NaN on purpose (``optdist.skip_nonfinite`` skips
    such a step).

    The paper also combines the buffers with Quasi-Hyperbolic Momentum and Implicit Gradient
    Transport; here the base is heavy-ball momentum only (chain another optimizer after the output
    for other variants).

    Distributed use: after :func:`optdist.mean_gradients` when all workers see the same cluster;
    before it (per-worker buffers) when each worker's batch comes from its own cluster, e.g.
    ``cluster=worker_index``. No collective here.

    State: ``K`` parameter-shaped buffers (``K`` times the parameters' memory) and a step count,
    per worker.

    Non-finite policy: a NaN/Inf gradient makes its cluster's buffer non-finite (wrap in
    :func:`optdist.skip_nonfinite`).

    Args:
      num_clusters: :math:`K \ge 1`.
      beta: momentum :math:`\beta \in [0, 1)`.
      cluster_schedule: ``count -> cluster id`` used when ``update`` gets no ``cluster``.
      accumulator_dtype: dtype of the buffers (default: the parameters').

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (``update`` takes ``cluster=``).

    Example::

      tx = optax.chain(optdist.mean_gradients("data"),
                       optdist.momentum.scale_by_multi_momentum(10, 0.9),
                       optax.scale_by_learning_rate(0.1))
      updates, state = tx.update(grads, state, params, cluster=batch_cluster_id)

    References:
      Tondji, Kashubin, Cisse, "Variance Reduction in Deep Learning: More Momentum is All You
      Need", 2021; Yuan, Li, Zhang, "Stochastic gradient methods with multiple momentum", 2019.
    """
    num_clusters = _checks.positive_int(num_clusters, "num_clusters")
    beta = _checks.in_range(beta, "beta", 0.0, 1.0, high_open=True)
    if cluster_schedule is not None and not callable(cluster_schedule):
        raise TypeError(f"cluster_schedule must be a function step -> cluster id; got {cluster_schedule!r}.")
    if accumulator_dtype is not None:
        accumulator_dtype = jnp.dtype(accumulator_dtype)

    def init_fn(params):
        _checks.check_floating(params, "scale_by_multi_momentum", "parameters")
        zeros = lambda p: jnp.zeros_like(p, dtype=accumulator_dtype or p.dtype)  # noqa: E731
        momenta = tuple(jax.tree_util.tree_map(zeros, params) for _ in range(num_clusters))
        return MultiMomentumState(jnp.zeros((), jnp.int32), momenta)

    def update_fn(updates, state, params=None, *, cluster=None, **extra_args):
        del params, extra_args
        _checks.check_floating(updates, "scale_by_multi_momentum")
        _checks.check_same_structure(updates, state.momenta[0], "the momentum buffers")
        if cluster is None:
            if cluster_schedule is None:
                raise ValueError(
                    "scale_by_multi_momentum needs this step's cluster id: pass update(grads, state, "
                    "params, cluster=k), or build it with cluster_schedule=lambda step: ..."
                )
            cluster = jnp.asarray(cluster_schedule(state.count))
        c = _check_cluster(cluster, num_clusters)

        def push(k, buffers):
            def leaf(m, g):
                return jnp.where(c == k, beta * m + g.astype(m.dtype), m).astype(m.dtype)

            return jax.tree_util.tree_map(leaf, buffers, updates)

        momenta = tuple(push(k, mk) for k, mk in enumerate(state.momenta))
        valid = (c >= 0) & (c < num_clusters)

        def average(g, *ms):
            if num_clusters == 1:
                avg = ms[0]  # exactly optax.trace's output
            else:
                avg = sum(m.astype(jnp.promote_types(m.dtype, jnp.float32)) for m in ms) / num_clusters
            return jnp.where(valid, avg, jnp.nan).astype(g.dtype)

        out = jax.tree_util.tree_map(average, updates, *momenta)
        return out, MultiMomentumState(optax.safe_increment(state.count), momenta)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def multi_momentum(
    learning_rate: optax.ScalarOrSchedule,
    num_clusters: int,
    beta: float = 0.9,
    *,
    cluster_schedule: ClusterSchedule | None = None,
    accumulator_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""SGD with multi-momentum: :func:`scale_by_multi_momentum` then the learning rate.

    .. math:: \theta \leftarrow \theta - \gamma\, \frac1K \sum_k m_k

    (see :func:`scale_by_multi_momentum` for the buffers). ``num_clusters=1`` is
    ``optax.sgd(learning_rate, momentum=beta)``.

    Args:
      learning_rate: :math:`\gamma` (a float or an optax schedule).
      num_clusters: :math:`K \ge 1`.
      beta: momentum :math:`\beta \in [0, 1)`.
      cluster_schedule: ``count -> cluster id`` used when ``update`` gets no ``cluster``.
      accumulator_dtype: dtype of the buffers (default: the parameters').

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (``update`` takes ``cluster=``).

    Example::

      tx = optdist.momentum.multi_momentum(0.1, num_clusters=10, beta=0.9)
      updates, state = tx.update(grads, state, params, cluster=3)

    References:
      Tondji, Kashubin, Cisse, "Variance Reduction in Deep Learning: More Momentum is All You
      Need", 2021.
    """
    if not callable(learning_rate):
        learning_rate = _checks.in_range(learning_rate, "learning_rate", 0.0, float("inf"))
    return optax.chain(
        scale_by_multi_momentum(
            num_clusters, beta, cluster_schedule=cluster_schedule, accumulator_dtype=accumulator_dtype
        ),
        optax.scale_by_learning_rate(learning_rate),
    )


__all__ = ["MultiMomentumState", "multi_momentum", "scale_by_multi_momentum"]
