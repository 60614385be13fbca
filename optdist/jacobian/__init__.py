"""Jacobian descent: aggregators of a stack of gradients (one row per objective or per worker)."""

from optdist.jacobian.upgrad import (
    aggregate_jacobian,
    box_qp,
    mean,
    mgda,
    mgda_weights,
    upgrad,
    upgrad_weights,
)

__all__ = ["aggregate_jacobian", "box_qp", "mean", "mgda", "mgda_weights", "upgrad", "upgrad_weights"]
