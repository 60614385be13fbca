"""Communication core: worker axes, collectives with byte accounting, the exact mean."""

from optdist.comm.accounting import (
    ByteCounter,
    all_gather_bytes,
    all_reduce_bytes,
    bytes_sent,
    payload_bytes,
    reduce_scatter_bytes,
)
from optdist.comm.aggregation import AggregationState, Aggregator, as_transform, exact_mean
from optdist.comm.axes import (
    AxisName,
    UnboundAxisError,
    axis_aliases,
    num_workers,
    physical_axes,
    validate_axis_name,
    worker_index,
)
from optdist.comm.channel import Channel
from optdist.comm.mean import mean_gradients

__all__ = [
    "AggregationState",
    "Aggregator",
    "AxisName",
    "ByteCounter",
    "Channel",
    "UnboundAxisError",
    "all_gather_bytes",
    "all_reduce_bytes",
    "as_transform",
    "axis_aliases",
    "bytes_sent",
    "exact_mean",
    "mean_gradients",
    "num_workers",
    "payload_bytes",
    "physical_axes",
    "reduce_scatter_bytes",
    "validate_axis_name",
    "worker_index",
]
