"""Gradient compressors (re-exported as ``optdist.compressors``).

Each factory returns a :class:`Compressor` that owns its aggregation protocol
(summable payloads via one all-reduce, gathered payloads decoded per worker,
or PowerSGD's two all-reduces). Use one with
:func:`optdist.compressed_mean` (optionally with error feedback).

One factory per concept; the encodings on the fused error-feedback kernels are options of it, with
``impl="auto"|"pallas"|"xla"``: ``qsgd(..., fused=True)``, ``terngrad(None, bucket_size=b)``,
``sign(bucket_size=b)``, ``top_k(ratio, method="fused_threshold")``. The older names ``int8``,
``ternary``, ``scaled_sign`` and ``threshold_top_k`` are deprecated aliases returning those
(see CHANGELOG.md).
"""

from optdist.compression.base import Aggregate, Compressor, gathered, gathered_ef, summable
from optdist.compression.bucketed import int8, scaled_sign, ternary
from optdist.compression.cast import cast
from optdist.compression.demo import demo
from optdist.compression.low_bit import chunked_top_k, cyclic_top_k, quantize
from optdist.compression.powersgd import PowerSGDState, powersgd
from optdist.compression.qsgd import qsgd
from optdist.compression.rand_k import rand_k
from optdist.compression.sign import sign
from optdist.compression.sketch import sketch
from optdist.compression.terngrad import terngrad
from optdist.compression.threshold_top_k import threshold_top_k
from optdist.compression.top_k import top_k

__all__ = [
    "Aggregate",
    "Compressor",
    "PowerSGDState",
    "cast",
    "chunked_top_k",
    "cyclic_top_k",
    "demo",
    "gathered",
    "gathered_ef",
    "int8",
    "powersgd",
    "qsgd",
    "quantize",
    "rand_k",
    "scaled_sign",
    "sign",
    "sketch",
    "summable",
    "terngrad",
    "ternary",
    "threshold_top_k",
    "top_k",
]
