"""Gradient compressors (re-exported as ``optdist.compressors``).

Each factory returns a :class:`Compressor` that owns its aggregation protocol
(summable payloads via one all-reduce, gathered payloads decoded per worker,
or PowerSGD's two all-reduces). Use one with
:func:`optdist.compressed_mean` (optionally with error feedback).
"""

from optdist.compression.base import Aggregate, Compressor, gathered, summable
from optdist.compression.cast import cast
from optdist.compression.demo import demo
from optdist.compression.powersgd import PowerSGDState, powersgd
from optdist.compression.qsgd import qsgd
from optdist.compression.rand_k import rand_k
from optdist.compression.sign import sign
from optdist.compression.terngrad import terngrad
from optdist.compression.top_k import top_k

__all__ = [
    "Aggregate",
    "Compressor",
    "PowerSGDState",
    "cast",
    "demo",
    "gathered",
    "powersgd",
    "qsgd",
    "rand_k",
    "sign",
    "summable",
    "terngrad",
    "top_k",
]
