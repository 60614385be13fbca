"""Min-max games and variational inequalities: extragradient, the single-call family (past
extragradient, optimistic and reflected gradient), MASHA1/2 with compressed communication, local GDA,
and :func:`minmax_operator` (the game operator :math:`(\\nabla_x f, -\\nabla_y f)` of a loss)."""

from optdist.minmax.extragradient import (
    ExtragradientState,
    SingleCallState,
    extragradient,
    minmax_operator,
    optimistic_gradient,
    past_extragradient,
    reflected_gradient,
)
from optdist.minmax.local_gda import local_gda
from optdist.minmax.masha import MashaState, masha1, masha2

__all__ = [
    "ExtragradientState",
    "MashaState",
    "SingleCallState",
    "extragradient",
    "local_gda",
    "masha1",
    "masha2",
    "minmax_operator",
    "optimistic_gradient",
    "past_extragradient",
    "reflected_gradient",
]
