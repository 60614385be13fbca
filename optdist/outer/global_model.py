"""The global model of a local-update method: the shared parameters its last syncs produced."""

from __future__ import annotations

from typing import Any

from optdist._tree import instances
from optdist.outer.async_local_sgd import AsyncLocalSGDState
from optdist.outer.outer_loop import OuterLoopState
from optdist.outer.streaming_diloco import StreamingDiLoCoState

# Each outer-loop state and the field that holds its global parameters.
_GLOBAL_FIELD = {OuterLoopState: "anchor", StreamingDiLoCoState: "anchor", AsyncLocalSGDState: "server"}
_KINDS = tuple(_GLOBAL_FIELD)


def global_params(state: Any) -> Any:
    r"""The global (outer) parameters held in an outer loop's state: the model the run would ship.

    Between syncs a local-update method's workers hold drifting copies :math:`\theta_i`; the global
    model is the shared anchor :math:`\theta` that the last sync produced, identical on every worker:

    * :func:`optdist.outer_loop` (and every alias built on it: DiLoCo, Local SGD, FedOpt, SCAFFOLD,
      MuLoCo, SparseLoCo): :attr:`~optdist.outer.OuterLoopState.anchor`, updated at each sync;
    * :func:`optdist.streaming_diloco`: :attr:`~optdist.outer.StreamingDiLoCoState.anchor`, whose
      fragment ``p`` changes at fragment ``p``'s syncs only, so its fragments come from syncs up to
      ``H`` steps apart (the global model as the method defines it; a worker's own parameters also
      carry up to ``H`` steps of local drift, merged with weight ``1 - alpha``);
    * :func:`optdist.async_local_sgd`: :attr:`~optdist.outer.AsyncLocalSGDState.server`, the server's
      parameters after the arrivals applied so far.

    Right after a sync of :func:`optdist.outer_loop` every worker's parameters are the anchor (up to
    one float rounding; with ``overlap=True``, plus that step's update), so evaluating either gives
    the same loss there; for a schedule-free outer optimizer the point to evaluate is
    :func:`~optdist.outer.schedule_free_eval_params`, not the anchor.

    Works on one worker's state or on a stacked ``[workers, ...]`` state (as returned by
    ``optdist.simulate``); the outer loop's state may sit anywhere in the tree (inside a chain,
    ``skip_nonfinite``, ``inject_hyperparams``). The first outer-loop state in the tree's flattening
    order is used.

    Args:
      state: an optimizer state holding an :class:`~optdist.outer.OuterLoopState`, a
        :class:`~optdist.outer.StreamingDiLoCoState` or an :class:`~optdist.outer.AsyncLocalSGDState`.

    Returns:
      The global parameters, structured like the parameters.

    Raises:
      ValueError: the state holds no outer loop (data parallel, compressors, gossip: their workers'
        parameters are the model).

    Example::

      tx = optdist.diloco(3e-3, sync_every=100, axis_name="data")
      ...
      model = optdist.outer.global_params(state_w)  # [workers, ...], all equal
    """
    found = instances(state, _KINDS)
    if not found:
        raise ValueError(
            "global_params needs the state of an outer_loop, streaming_diloco or async_local_sgd; none "
            f"found in a state of type {type(state).__name__}. Without an outer loop the workers' "
            "parameters are the model: evaluate those."
        )
    return getattr(found[0], _GLOBAL_FIELD[type(found[0])])


__all__ = ["global_params"]
