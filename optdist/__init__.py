"""optdist: composable optax transforms for distributed, communication-efficient training."""

from optdist import aggregation, comm, decentralized, outer, preconditioning, robust, training, zeroth_order
from optdist import compression as compressors
from optdist.comm import (
    ByteCounter,
    Channel,
    UnboundAxisError,
    bytes_sent,
    mean_gradients,
    num_workers,
    worker_index,
)
from optdist.decentralized import gossip, gradient_tracking
from optdist.execution import (
    data_parallel,
    is_replicated,
    replicate,
    shard_batch,
    simulate,
    unreplicate,
    worker_specs,
)
from optdist.feedback import CompressedMeanState, compressed_mean, powersgd
from optdist.nonfinite import SkipNonFiniteState, skip_nonfinite
from optdist.outer import (
    async_local_sgd,
    delayed_nesterov,
    diloco,
    fedadagrad,
    fedadam,
    fedavg,
    fedyogi,
    local_adaptive,
    local_sgd,
    muloco,
    outer_loop,
    qsr_sync_every,
    scaffold,
    sparseloco,
    streaming_diloco,
)
from optdist.preconditioning import (
    SHAMPOO_STATIC_ARGS,
    ShampooState,
    matrix_inverse_pth_root,
    scale_by_shampoo,
    shampoo,
)
from optdist.robust import aggregators, attacks, monna_sgd, robust_mean
from optdist.zeroth_order import SeededSPSAState, seeded_spsa

__version__ = "0.1.0"

__all__ = [
    "aggregation",
    "ByteCounter",
    "Channel",
    "UnboundAxisError",
    "bytes_sent",
    "comm",
    "decentralized",
    "gossip",
    "gradient_tracking",
    "zeroth_order",
    "training",
    "seeded_spsa",
    "SeededSPSAState",
    "compressors",
    "CompressedMeanState",
    "compressed_mean",
    "powersgd",
    "outer",
    "robust",
    "preconditioning",
    "SHAMPOO_STATIC_ARGS",
    "ShampooState",
    "matrix_inverse_pth_root",
    "scale_by_shampoo",
    "shampoo",
    "aggregators",
    "attacks",
    "monna_sgd",
    "robust_mean",
    "async_local_sgd",
    "delayed_nesterov",
    "diloco",
    "fedadagrad",
    "fedadam",
    "fedavg",
    "fedyogi",
    "local_adaptive",
    "local_sgd",
    "muloco",
    "sparseloco",
    "outer_loop",
    "qsr_sync_every",
    "scaffold",
    "streaming_diloco",
    "data_parallel",
    "is_replicated",
    "mean_gradients",
    "num_workers",
    "replicate",
    "shard_batch",
    "simulate",
    "skip_nonfinite",
    "SkipNonFiniteState",
    "unreplicate",
    "worker_index",
    "worker_specs",
]
