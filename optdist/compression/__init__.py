"""Gradient compressors (re-exported as ``optdist.compressors``).

Each factory returns a :class:`Compressor` that owns its aggregation protocol
(summable payloads via one all-reduce, gathered payloads decoded per worker,
or PowerSGD's two all-reduces). Use one with
:func:`optdist.compressed_mean` (optionally with error feedback).
"""

from optdist.compression.base import Aggregate, Compressor, gathered, gathered_ef, summable
from optdist.compression.bucketed import int8, scaled_sign, ternary
from optdist.compression.cast import cast
from optdist.compression.demo import demo
from optdist.compression.powersgd import PowerSGDState, powersgd
from optdist.compression.qsgd import qsgd
from optdist.compression.rand_k import rand_k
from optdist.compression.sign import sign
from optdist.compression.terngrad import terngrad
from optdist.compression.threshold_top_k import threshold_top_k
from optdist.compression.top_k import top_k

__all__ = [
    "Aggregate",
    "Compressor",
    "PowerSGDState",
    "cast",
    "demo",
    "gathered",
    "gathered_ef",
    "int8",
    "powersgd",
    "qsgd",
    "rand_k",
    "scaled_sign",
    "sign",
    "summable",
    "terngrad",
    "ternary",
    "threshold_top_k",
    "top_k",
]
