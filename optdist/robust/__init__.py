"""Byzantine-robust aggregation (:func:`robust_mean`, ``aggregators``) and simulated attacks."""

from optdist.robust import aggregators, attacks
from optdist.robust.aggregators import Aggregator
from optdist.robust.monna import MonnaState, monna_sgd
from optdist.robust.robust_mean import RobustMeanState, robust_mean

__all__ = [
    "Aggregator",
    "MonnaState",
    "RobustMeanState",
    "aggregators",
    "attacks",
    "monna_sgd",
    "robust_mean",
]
