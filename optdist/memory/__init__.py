"""Memory-light optimizers: MicroAdam (:func:`micro_adam`), fixed sparse Fisher masks (:func:`fish_mask`)."""

from optdist.memory.micro_adam import (
    MicroAdamState,
    QuantizedError,
    micro_adam,
    scale_by_micro_adam,
    state_bytes,
)

__all__ = [
    "MicroAdamState",
    "QuantizedError",
    "micro_adam",
    "scale_by_micro_adam",
    "state_bytes",
]
