"""Training-loop glue: one worker's train step, metrics gathered across workers, bytes in metrics.

The optdist transforms are ordinary optax transforms, so a train step is the usual three lines;
this module holds the few pieces every loop otherwise rewrites:

* :func:`train_step` — one worker's step for ``(params, opt_state)`` pairs: this worker's loss and
  gradient, ``tx.update`` with the parameters (and extra arguments such as seeded SPSA's
  ``loss_fn=``), ``optax.apply_updates``, and a metrics dict.
* :func:`nnx_train_step` — the same for a Flax ``nnx`` model held with an ``nnx.Optimizer``, on the
  split state ``nnx.state((model, optimizer))``, which is what carries the leading worker axis.
* :func:`apply_gradients` — a linen ``flax.training.train_state.TrainState`` update that forwards
  extra arguments to ``tx.update`` (``TrainState.apply_gradients`` does not).
* :func:`worker_metrics` — mean loss and the workers' spread of loss and of parameters, gathered
  with collectives inside the step (identical on every worker, in every execution mode).
* :func:`summarize` — the metrics as Python numbers, with the bytes each worker has sent.

Every step is written for one worker and runs under :func:`optdist.simulate`,
:func:`optdist.data_parallel` or ``jax.pmap`` unchanged.

Bytes: the step puts the optimizer state's :class:`~optdist.comm.ByteCounter` s into
``metrics["bytes_sent"]`` (the counters themselves: 64-bit counts without x64), and
:func:`summarize` reads them with :func:`optdist.bytes_sent`. The metric collectives themselves
(three scalars, plus one all-reduce of the parameters with ``param_spread=True``) are monitoring,
not training traffic: they are not added to the optimizer's counters.

Flax ``nnx.Optimizer`` applies ``tx.update``'s output *additively*
(``optax.apply_updates``), so every optdist transform, outer loops included, returns
``new - old`` parameters as its update and works inside it unchanged. ``nnx.state`` stores the
optimizer state's ``ByteCounter`` s as plain dicts, so read bytes from ``optimizer.opt_state``
(after ``nnx.merge``) or from the step's metrics, not from the split state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optdist._tree import instances
from optdist.comm.accounting import ByteCounter, bytes_sent
from optdist.comm.axes import AxisName, validate_axis_name
from optdist.comm.channel import Channel

Metrics = dict[str, Any]


def worker_metrics(loss: jax.Array, params: Any = None, axis_name: AxisName = None) -> Metrics:
    r"""Loss and parameter statistics across the workers on ``axis_name``, inside one worker's step.

    With :math:`n` workers holding losses :math:`\ell_i` and parameters :math:`\theta_i`:

    .. math::
        \text{loss} = \frac{1}{n} \sum_i \ell_i, \quad
        \text{loss\_spread} = \max_i \ell_i - \min_i \ell_i, \quad
        \text{param\_spread} = \max_i \max_j |\theta_{i,j} - \bar\theta_j|,
        \ \bar\theta = \frac{1}{n} \sum_i \theta_i .

    Every worker gets the same values. ``param_spread`` is 0 while the parameters stay replicated
    (synchronous data parallel) and measures the drift of local-update and decentralized methods.

    Args:
      loss: this worker's scalar loss.
      params: this worker's parameters, or None to skip ``param_spread`` (it costs one all-reduce
        of the parameters).
      axis_name: the worker axis, or None for one worker (``loss`` is returned as is and the
        spreads are 0).

    Returns:
      ``{"loss", "loss_spread"}`` and, if ``params`` is given, ``"param_spread"`` (float32 scalars).
      The collectives are not counted in any optimizer byte counter.

    Example::

      def step(params, opt_state, batch):
          loss, grads = jax.value_and_grad(loss_fn)(params, batch)
          updates, opt_state = tx.update(grads, opt_state, params)
          params = optax.apply_updates(params, updates)
          return params, opt_state, optdist.training.worker_metrics(loss, params, "data")
    """
    axis_name = validate_axis_name(axis_name)
    loss = jnp.asarray(loss, jnp.float32)
    if jnp.shape(loss) != ():
        raise ValueError(f"loss must be a scalar (this worker's loss); got shape {jnp.shape(loss)}.")
    channel = Channel(axis_name)  # monitoring traffic: its counter is discarded
    top, neg_bottom = channel.pmax(jnp.stack([loss, -loss]))
    metrics = {"loss": channel.pmean(loss), "loss_spread": top + neg_bottom}
    if params is not None:
        mean = channel.pmean(jax.tree_util.tree_map(lambda p: jnp.asarray(p, jnp.float32), params))
        gaps = [
            jnp.max(jnp.abs(jnp.asarray(p, jnp.float32) - m))
            for p, m in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(mean))
            if jnp.size(p)
        ]
        metrics["param_spread"] = channel.pmax(jnp.max(jnp.stack(gaps))) if gaps else jnp.float32(0)
    return metrics


def _check_options(has_aux, gradients, pass_loss_fn, param_spread):
    for name, value in (
        ("has_aux", has_aux),
        ("gradients", gradients),
        ("pass_loss_fn", pass_loss_fn),
        ("param_spread", param_spread),
    ):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False; got {value!r}.")
    if has_aux and not gradients:
        raise ValueError("has_aux=True needs gradients=True (the auxiliary output comes with the gradient).")


def train_step(
    loss_fn: Callable[..., Any],
    tx: optax.GradientTransformation,
    *,
    axis_name: AxisName = None,
    has_aux: bool = False,
    gradients: bool = True,
    pass_loss_fn: bool = False,
    param_spread: bool = False,
) -> Callable[..., tuple[Any, Any, Metrics]]:
    r"""One worker's train step for ``(params, opt_state)`` pairs.

    The returned ``step(params, opt_state, *batch)`` computes

    .. math::
        (\ell_i, g_i) = (\ell(\theta_i; b_i), \nabla \ell(\theta_i; b_i)), \quad
        (u_i, s_i') = \texttt{tx.update}(g_i, s_i, \theta_i, \ldots), \quad
        \theta_i' = \theta_i + u_i

    for this worker :math:`i` and returns ``(params', opt_state', metrics)``. Run it with
    ``optdist.simulate(step, "data")``, ``optdist.data_parallel(step, mesh, "data")`` or
    ``jax.pmap(step, axis_name="data")``.

    Args:
      loss_fn: ``loss_fn(params, *batch) -> scalar`` (or ``(scalar, aux)`` with ``has_aux``).
      tx: any optax / optdist transform.
      axis_name: the worker axis to gather metrics over (:func:`worker_metrics`), or None to
        return this worker's own loss only.
      has_aux: ``loss_fn`` returns ``(loss, aux)``; ``aux`` goes to ``metrics["aux"]``.
      gradients: compute ``jax.value_and_grad``; False passes ``None`` as the gradient and only
        evaluates the loss (zeroth-order transforms such as :func:`optdist.seeded_spsa`).
      pass_loss_fn: call ``tx.update(..., loss_fn=lambda p: loss_fn(p, *batch))`` (needed by
        :func:`optdist.seeded_spsa`; ``optax.chain`` forwards it; transforms that do not use it
        ignore it).
      param_spread: add ``metrics["param_spread"]`` (needs ``axis_name``; one extra all-reduce of
        the parameters per step).

    Returns:
      ``step(params, opt_state, *batch) -> (params, opt_state, metrics)`` with ``metrics``:
      ``"loss"`` (the mean over workers with ``axis_name``, else this worker's loss, taken at the
      parameters before the update), ``"loss_spread"`` and ``"param_spread"`` (with
      ``axis_name``), ``"aux"`` (with ``has_aux``) and ``"bytes_sent"`` (the new state's byte
      counters; :func:`summarize` turns them into an int).

    Example::

      tx = optax.chain(optdist.powersgd(2, "data"), optax.adam(1e-3))
      step = optdist.simulate(optdist.training.train_step(loss_fn, tx, axis_name="data"), "data")
      params_w, state_w = optdist.replicate((params, tx.init(params)), 8)
      for batch in batches:
          params_w, state_w, metrics = step(params_w, state_w, optdist.shard_batch(batch, 8))
      print(optdist.training.summarize(metrics))   # {'loss': ..., 'loss_spread': ..., 'bytes_sent': ...}

      spsa = optax.chain(optdist.seeded_spsa("data"), optax.sgd(1e-3))   # zeroth order
      step = optdist.training.train_step(loss_fn, spsa, gradients=False, pass_loss_fn=True)
    """
    axis_name = validate_axis_name(axis_name)
    _check_options(has_aux, gradients, pass_loss_fn, param_spread)
    if param_spread and axis_name is None:
        raise ValueError("param_spread=True needs axis_name (the workers to compare); got None.")

    def step(params, opt_state, *batch):
        aux = None
        if gradients:
            out, grads = jax.value_and_grad(loss_fn, has_aux=has_aux)(params, *batch)
            loss, aux = out if has_aux else (out, None)
        else:
            loss, grads = loss_fn(params, *batch), None
        extra = {"loss_fn": lambda p: loss_fn(p, *batch)} if pass_loss_fn else {}
        updates, opt_state = tx.update(grads, opt_state, params, **extra)
        new_params = optax.apply_updates(params, updates)
        metrics = _metrics(loss, new_params if param_spread else None, axis_name, opt_state)
        if has_aux:
            metrics["aux"] = aux
        return new_params, opt_state, metrics

    return step


def _metrics(loss, params, axis_name, opt_state) -> Metrics:
    if axis_name is None:
        metrics = {"loss": jnp.asarray(loss, jnp.float32)}
    else:
        metrics = worker_metrics(loss, params, axis_name)
    metrics["bytes_sent"] = instances(opt_state, ByteCounter)
    return metrics


def nnx_train_step(
    graphdef: Any,
    loss_fn: Callable[..., Any],
    *,
    axis_name: AxisName = None,
    has_aux: bool = False,
    gradients: bool = True,
    pass_loss_fn: bool = False,
    param_spread: bool = False,
) -> Callable[..., tuple[Any, Metrics]]:
    r"""One worker's train step for a Flax ``nnx`` model and its ``nnx.Optimizer``.

    The model and optimizer are held split, ``graphdef, state = nnx.split((model, optimizer))``:
    ``state`` is a pytree, so :func:`optdist.replicate` stacks it for ``W`` workers and
    :func:`optdist.simulate` / :func:`optdist.data_parallel` map the step over it. Each call
    merges this worker's model and optimizer, takes ``nnx.value_and_grad`` of ``loss_fn`` with
    respect to the optimizer's ``wrt`` variables, calls ``optimizer.update(model, grads, **extra)``
    (which applies ``tx.update``'s output additively) and splits the state again.

    Args:
      graphdef: the static half of ``nnx.split((model, optimizer))``.
      loss_fn: ``loss_fn(model, *batch) -> scalar`` (or ``(scalar, aux)`` with ``has_aux``).
      axis_name, has_aux, gradients, pass_loss_fn, param_spread: as in :func:`train_step`. With
        ``pass_loss_fn`` the transform gets ``loss_fn=f`` where ``f(params)`` evaluates the loss
        of the model with its ``wrt`` variables replaced by ``params`` (what ``nnx.Optimizer``
        passes to ``tx.update``). With ``gradients=False`` the parameters themselves stand in for
        the (ignored) gradient, since ``nnx.Optimizer.update`` needs a tree.

    Returns:
      ``step(state, *batch) -> (state, metrics)``, metrics as in :func:`train_step`.

    Example::

      model = MLP(nnx.Rngs(0))
      optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
      graphdef, state = nnx.split((model, optimizer))
      state_w = optdist.replicate(state, 8)                     # leading worker axis
      step = optdist.simulate(optdist.training.nnx_train_step(graphdef, loss_fn, axis_name="data"))
      state_w, metrics = step(state_w, *optdist.shard_batch((x, y), 8))
      model_w, optimizer_w = nnx.merge(graphdef, state_w)     # stacked model, e.g. for evaluation
    """
    from flax import nnx

    axis_name = validate_axis_name(axis_name)
    _check_options(has_aux, gradients, pass_loss_fn, param_spread)
    if param_spread and axis_name is None:
        raise ValueError("param_spread=True needs axis_name (the workers to compare); got None.")

    def step(state, *batch):
        merged = nnx.merge(graphdef, state)
        if not (isinstance(merged, tuple) and len(merged) == 2 and isinstance(merged[1], nnx.Optimizer)):
            raise TypeError(
                "nnx_train_step expects graphdef, state = nnx.split((model, optimizer)) with an "
                f"nnx.Optimizer second; got a graphdef of {type(merged).__name__}."
            )
        model, optimizer = merged
        aux = None
        if gradients:
            diff = nnx.DiffState(0, optimizer.wrt)
            out, grads = nnx.value_and_grad(loss_fn, argnums=diff, has_aux=has_aux)(model, *batch)
            loss, aux = out if has_aux else (out, None)
        else:
            loss, grads = loss_fn(model, *batch), nnx.state(model, optimizer.wrt)
        extra = {}
        if pass_loss_fn:
            model_def, _, rest = nnx.split(model, optimizer.wrt, ...)
            extra["loss_fn"] = lambda p: loss_fn(nnx.merge(model_def, p, rest), *batch)
        optimizer.update(model, grads, **extra)
        params = nnx.as_pure(nnx.state(model, optimizer.wrt)) if param_spread else None
        metrics = _metrics(loss, params, axis_name, nnx.as_pure(optimizer.opt_state))
        if has_aux:
            metrics["aux"] = aux
        return nnx.state((model, optimizer)), metrics

    return step


def apply_gradients(train_state: Any, grads: Any, **update_kwargs: Any) -> Any:
    r"""``TrainState.apply_gradients`` that forwards extra arguments to ``tx.update``.

    Flax linen's ``flax.training.train_state.TrainState.apply_gradients(grads=..., **kwargs)``
    calls ``tx.update(grads, opt_state, params)`` and treats ``kwargs`` as fields to replace, so
    a transform that needs an extra argument (``loss_fn=`` for :func:`optdist.seeded_spsa`) cannot
    get it. This computes the same update,

    .. math:: (u, s') = \texttt{tx.update}(g, s, \theta, \ldots), \quad \theta' = \theta + u,

    with ``update_kwargs`` forwarded, and returns ``train_state.replace(step=step + 1,
    params=θ', opt_state=s')``.

    Args:
      train_state: a linen ``TrainState`` (or any struct with ``step``, ``params``, ``tx``,
        ``opt_state`` and ``replace``).
      grads: this worker's gradient (a tree like ``params``), or None for zeroth-order transforms.
      **update_kwargs: forwarded to ``tx.update`` (``optax.chain`` passes them to every member).

    Returns:
      The updated ``TrainState``.

    Example::

      spsa = optax.chain(optdist.seeded_spsa("data"), optax.sgd(1e-3))
      state = TrainState.create(apply_fn=model.apply, params=params, tx=spsa)

      def step(state, x, y):                                  # one worker's view
          loss = lambda p: loss_fn(state.apply_fn({"params": p}, x), y)
          return optdist.training.apply_gradients(state, None, loss_fn=loss)
    """
    for field in ("step", "params", "tx", "opt_state", "replace"):
        if not hasattr(train_state, field):
            raise TypeError(
                f"train_state must be a flax TrainState (with step, params, tx, opt_state); "
                f"{type(train_state).__name__} has no {field!r}."
            )
    updates, opt_state = train_state.tx.update(
        grads, train_state.opt_state, train_state.params, **update_kwargs
    )
    params = optax.apply_updates(train_state.params, updates)
    return train_state.replace(step=train_state.step + 1, params=params, opt_state=opt_state)


def summarize(metrics: Metrics) -> dict[str, float | int]:
    """The step's metrics as Python numbers (on the host, after the step).

    Array metrics are averaged over any leading worker axis (the gathered ones are identical on
    every worker; without ``axis_name`` ``"loss"`` becomes the mean of the workers' losses);
    ``"bytes_sent"`` becomes the most bytes any worker has sent so far (an int, exact), from
    :func:`optdist.bytes_sent`. ``"aux"`` is left out.

    Args:
      metrics: the metrics of :func:`train_step` / :func:`nnx_train_step`, stacked over workers
        or not.

    Returns:
      A dict of floats, with ``"bytes_sent"`` an int.

    Example::

      params_w, state_w, metrics = step(params_w, state_w, batch_w)
      print(optdist.training.summarize(metrics))  # {'loss': 0.31, 'loss_spread': 0.02, 'bytes_sent': 7168}
    """
    out: dict[str, float | int] = {}
    for key, value in metrics.items():
        if key == "aux":
            continue
        if key == "bytes_sent":
            out[key] = int(np.max(bytes_sent(value)))
        else:
            out[key] = float(np.mean(np.asarray(value, np.float64)))
    return out
