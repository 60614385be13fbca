"""Decentralized training: gossip over a communication graph (D-SGD, CHOCO-SGD) and gradient tracking."""

from optdist.decentralized.gossip import GossipState, gossip, mix, mix_compressed, mix_on_schedule
from optdist.decentralized.gradient_tracking import GradientTrackingState, gradient_tracking
from optdist.decentralized.topology import (
    Topology,
    TopologySchedule,
    complete,
    custom,
    exponential,
    one_peer_exponential,
    resolve,
    ring,
    torus,
)

__all__ = [
    "GossipState",
    "GradientTrackingState",
    "Topology",
    "TopologySchedule",
    "complete",
    "custom",
    "exponential",
    "gossip",
    "gradient_tracking",
    "mix",
    "mix_compressed",
    "mix_on_schedule",
    "one_peer_exponential",
    "resolve",
    "ring",
    "torus",
]
