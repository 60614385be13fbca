"""Local-update outer loops: Local SGD, (Streaming) DiLoCo, FedOpt, SCAFFOLD, local adaptive scaling,
Delayed Nesterov and an asynchronous Local-SGD simulator, QSR."""

from optdist.outer.async_local_sgd import AsyncLocalSGDState, async_local_sgd
from optdist.outer.delayed_nesterov import DelayedNesterovState, delayed_nesterov, delayed_nesterov_outer
from optdist.outer.diloco import diloco
from optdist.outer.fedopt import ScaleByFedOptState, fedadagrad, fedadam, fedavg, fedyogi, scale_by_fedopt
from optdist.outer.global_model import global_params
from optdist.outer.local_adaptive import RoundScalingState, local_adaptive, scale_by_round_scaling
from optdist.outer.local_sgd import local_sgd
from optdist.outer.low_comm import muloco, sparseloco
from optdist.outer.outer_loop import OuterLoopState, SyncHook, outer_loop
from optdist.outer.scaffold import ScaffoldState, scaffold, scaffold_correction
from optdist.outer.schedule_free import schedule_free_eval_params
from optdist.outer.schedules import qsr_sync_every
from optdist.outer.streaming_diloco import StreamingDiLoCoState, streaming_diloco

__all__ = [
    "AsyncLocalSGDState",
    "DelayedNesterovState",
    "OuterLoopState",
    "RoundScalingState",
    "ScaffoldState",
    "ScaleByFedOptState",
    "StreamingDiLoCoState",
    "SyncHook",
    "async_local_sgd",
    "delayed_nesterov",
    "delayed_nesterov_outer",
    "diloco",
    "fedadagrad",
    "fedadam",
    "fedavg",
    "fedyogi",
    "global_params",
    "local_adaptive",
    "local_sgd",
    "muloco",
    "outer_loop",
    "qsr_sync_every",
    "scaffold",
    "sparseloco",
    "scaffold_correction",
    "scale_by_fedopt",
    "scale_by_round_scaling",
    "schedule_free_eval_params",
    "streaming_diloco",
]
