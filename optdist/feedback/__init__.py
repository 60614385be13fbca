"""Error feedback and the compressed-mean transforms built on compressors."""

from optdist.feedback.compressed_mean import CompressedMeanState, compressed_mean
from optdist.feedback.powersgd import powersgd

__all__ = ["CompressedMeanState", "compressed_mean", "powersgd"]
