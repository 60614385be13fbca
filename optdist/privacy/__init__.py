"""Private aggregation: DIFF2 (:func:`dp_diff`, :func:`dp_diff_mean`) and its zCDP accountant."""

from optdist.privacy import accountant
from optdist.privacy.accountant import epsilon, noise_multiplier_for, zcdp_rho
from optdist.privacy.diff2 import DiffState, dp_diff, dp_diff_mean

__all__ = [
    "DiffState",
    "accountant",
    "dp_diff",
    "dp_diff_mean",
    "epsilon",
    "noise_multiplier_for",
    "zcdp_rho",
]
