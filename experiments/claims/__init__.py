"""Paper claims reproduced at small scale: a registry of :class:`Claim` (one per headline claim).

Each claim names the paper, the claim, the paper's own figure, a pass criterion written before our
number was seen, a config description and ``run(quick) -> measured dict``. ``experiments.reproduce``
runs them and writes REPRODUCTION.md / REPRODUCTION.json. Modules: ``compression`` (PowerSGD, EF,
EF21 / EControl, DeMo, QSGD / TernGrad), ``outer`` (DiLoCo, Streaming DiLoCo, QSR, SCAFFOLD),
``others`` (Shampoo, Byzantine robustness, gradient tracking, CHOCO-SGD, seeded SPSA), ``methods``
(the issue 16 / 17 methods: MicroAdam ... gradient coding).
"""

from experiments.claims import compression, others, outer  # noqa: F401, E402  (they register)

# isort: split
from experiments.claims import methods  # noqa: F401, E402  (registered last: its rows come last)
from experiments.claims.base import REGISTRY, Claim, register  # noqa: F401

__all__ = ["REGISTRY", "Claim", "register"]
