"""Byzantine-robust aggregation (:func:`robust_mean`, ``aggregators``) and simulated attacks."""

from optdist.robust import aggregators, attacks
from optdist.robust.aggregators import Rule
from optdist.robust.monna import MonnaState, monna_sgd
from optdist.robust.robust_mean import robust, robust_mean

__all__ = [
    "Rule",
    "MonnaState",
    "aggregators",
    "attacks",
    "monna_sgd",
    "robust",
    "robust_mean",
]
