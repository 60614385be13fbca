"""Zeroth-order methods: gradient estimates from loss values, built from shared random seeds."""

from optdist.zeroth_order.spsa import SeededSPSAState, seeded_spsa

__all__ = ["SeededSPSAState", "seeded_spsa"]
