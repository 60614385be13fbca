"""Momentum variants: multi-momentum (one buffer per data cluster)."""

from optdist.momentum.multi_momentum import MultiMomentumState, multi_momentum, scale_by_multi_momentum

__all__ = ["MultiMomentumState", "multi_momentum", "scale_by_multi_momentum"]
