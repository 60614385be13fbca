"""Preconditioning: matrix inverse roots and (distributed) Shampoo."""

from optdist.preconditioning.blocking import assign_blocks, make_layout
from optdist.preconditioning.grafting import graft, grafting_transform
from optdist.preconditioning.matrix_roots import matrix_inverse_pth_root
from optdist.preconditioning.shampoo import SHAMPOO_STATIC_ARGS, ShampooState, scale_by_shampoo, shampoo

__all__ = [
    "SHAMPOO_STATIC_ARGS",
    "ShampooState",
    "assign_blocks",
    "graft",
    "grafting_transform",
    "make_layout",
    "matrix_inverse_pth_root",
    "scale_by_shampoo",
    "shampoo",
]
