"""Memory-light optimizers: MicroAdam (:func:`micro_adam`), fixed sparse Fisher masks (:func:`fish_mask`)."""

from optdist.memory.fish_mask import FishMaskState, fish_mask, fisher_diagonal, fisher_mask
from optdist.memory.micro_adam import (
    MicroAdamState,
    QuantizedError,
    micro_adam,
    scale_by_micro_adam,
    state_bytes,
)

__all__ = [
    "FishMaskState",
    "MicroAdamState",
    "QuantizedError",
    "fish_mask",
    "fisher_diagonal",
    "fisher_mask",
    "micro_adam",
    "scale_by_micro_adam",
    "state_bytes",
]
