"""Byzantine-robust aggregation (:func:`robust_mean`, ``aggregators``) and simulated attacks."""

from optdist.robust import aggregators, attacks
from optdist.robust.aggregators import Rule
from optdist.robust.median_sgd import RunningMedianState, median_gradients, running_median
from optdist.robust.monna import MonnaState, monna_sgd
from optdist.robust.robust_mean import robust, robust_mean
from optdist.robust.smea import LocalDPState, local_dp_noise, smea

__all__ = [
    "Rule",
    "MonnaState",
    "aggregators",
    "attacks",
    "monna_sgd",
    "robust",
    "robust_mean",
    "LocalDPState",
    "RunningMedianState",
    "local_dp_noise",
    "median_gradients",
    "running_median",
    "smea",
]
