r"""Gradient coding (Tandon et al.) with straggler masks.

The data are split into ``n`` partitions with gradients :math:`g_1..g_n`; the full gradient is
:math:`g = \sum_j g_j`. Worker ``i`` computes the partitions in the support of row ``i`` of an
encoding matrix :math:`B \in \mathbb{R}^{n \times n}` and sends one coded vector
:math:`c_i = \sum_j B_{ij} g_j`. For every admissible straggler set :math:`S` (``|S| <= s``) there is a
decoding vector :math:`a_S` supported on the non-stragglers with :math:`a_S^\top B = \mathbf 1^\top`,
so :math:`\sum_{i \notin S} a_{S,i} c_i = g` exactly.

:func:`cyclic_code` is Tandon et al.'s cyclic repetition scheme (their Algorithm 2 construction): row
``i`` is supported on partitions ``i, i+1, ..., i+s (mod n)``, so every worker computes
``s + 1`` partitions, a load of :math:`(s+1)/n` of the data: the minimum for tolerating any ``s``
stragglers (their Theorem 1). :func:`fractional_repetition_code` (``(s+1) | n``) has the same load
with 0/1 coefficients. The decoding vectors of all :math:`\binom{n}{s}` straggler sets of size ``s``
are computed in float64 NumPy at construction (a smaller set uses any size-``s`` superset's).

:func:`coded_mean` is the :class:`~optdist.comm.aggregation.Aggregator`: it waits for the ``n - s``
fastest workers on the simulated clock (the ``s`` slowest are the stragglers), and every worker
all-reduces :math:`a_{S,i} c_i` (a straggler sends zeros: counted, as in any all-reduce), giving
:math:`g / n` (the mean of the partition gradients) on every worker. :func:`coded_partitions` lays
a batch out so that worker ``i`` holds its ``s + 1`` partitions and their coefficients.

Gradient codes across rounds as well as workers (sequential gradient coding) are in
:mod:`optdist.stragglers.sequential`.

References:
  Tandon, Lei, Dimakis, Karampatziakis, "Gradient Coding: Avoiding Stragglers in Distributed
  Learning", ICML 2017.
  Krishnan, Ebrahimi, Khisti, "Sequential Gradient Coding For Straggler Mitigation", ICLR 2023.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from optdist import _checks
from optdist.comm.aggregation import Aggregator
from optdist.stragglers import clock


class GradientCode(NamedTuple):
    """An ``(n, s)`` gradient code.

    Attributes:
      encoding: ``B``, ``[n, n]`` float64: worker ``i`` sends :math:`\\sum_j B_{ij} g_j`.
      support: ``[n, s + 1]`` int: the partitions worker ``i`` computes (its load).
      patterns: ``[P, n]`` bool: every straggler set of size ``s`` (True = straggler), ``P = C(n, s)``;
        None for a code built with ``tabulate=False`` (:func:`decode` then solves for :math:`a_S`).
      decoding: ``[P, n]`` float64: :math:`a_S` for each pattern (zero on the stragglers), or None.
      stragglers: ``s``.
    """

    encoding: np.ndarray
    support: np.ndarray
    patterns: np.ndarray
    decoding: np.ndarray
    stragglers: int

    @property
    def num_workers(self) -> int:
        return self.encoding.shape[0]

    @property
    def load(self) -> float:
        """Fraction of the data each worker computes: :math:`(s + 1)/n`."""
        return self.support.shape[1] / self.num_workers


def _check_ns(n: Any, s: Any, tabulate: bool = True) -> tuple[int, int]:
    n = _checks.positive_int(n, "num_workers")
    if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < n:
        raise ValueError(f"stragglers must be an integer in [0, num_workers - 1] = [0, {n - 1}]; got {s!r}.")
    if tabulate and math.comb(n, s) > 100_000:
        raise ValueError(
            f"C({n}, {s}) = {math.comb(n, s)} straggler patterns is too many to tabulate: lower s, or pass "
            "tabulate=False (decode() then solves per pattern; coded_mean needs the table)."
        )
    return n, s


def _decoding_table(b: np.ndarray, s: int) -> tuple[np.ndarray, np.ndarray]:
    n = b.shape[0]
    patterns, vectors = [], []
    for stragglers in itertools.combinations(range(n), s):
        alive = np.setdiff1d(np.arange(n), stragglers)
        a_alive, *_ = np.linalg.lstsq(b[alive].T, np.ones(n), rcond=None)
        if not np.allclose(a_alive @ b[alive], 1.0, atol=1e-8):
            raise ValueError(f"the code cannot decode when workers {stragglers} straggle (singular system).")
        mask = np.zeros(n, bool)
        mask[list(stragglers)] = True
        a = np.zeros(n)
        a[alive] = a_alive
        patterns.append(mask)
        vectors.append(a)
    return np.array(patterns), np.array(vectors)


def cyclic_code(num_workers: int, stragglers: int, seed: int = 0, tabulate: bool = True) -> GradientCode:
    r"""Tandon et al.'s cyclic repetition code: ``B`` with cyclic support, robust to any ``s`` stragglers.

    Construction (their Algorithm 2): draw :math:`H \in \mathbb{R}^{s \times n}` with Gaussian
    entries and set its last column so that :math:`H \mathbf 1 = 0`; row ``i`` of ``B`` is the
    null vector of :math:`H` restricted to the support :math:`\{i, \dots, i+s\} \bmod n` (an
    ``s x (s+1)`` system), scaled so that :math:`B_{ii} = 1`. Every row lies in the
    ``(n - s)``-dimensional null space of ``H``, which holds :math:`\mathbf 1`, and any ``n - s`` rows
    span it (with probability 1; checked for every pattern here), so every pattern decodes.

    Args:
      num_workers: ``n >= 1``.
      stragglers: ``s`` in ``[0, n - 1]``.
      seed: NumPy seed of ``H``.
      tabulate: precompute :math:`a_S` for all :math:`\binom{n}{s}` patterns (needed by
        :func:`coded_mean`; at most 100,000 patterns); False: :func:`decode` solves for each pattern.

    Returns:
      A :class:`GradientCode` with load :math:`(s+1)/n`.
    """
    n, s = _check_ns(num_workers, stragglers, tabulate)
    support = np.array([[(i + j) % n for j in range(s + 1)] for i in range(n)])
    b = np.zeros((n, n))
    if s == 0:
        b = np.eye(n)
    else:
        rng = np.random.default_rng(seed)
        h = rng.normal(size=(s, n))
        h[:, -1] = -h[:, :-1].sum(axis=1)
        for i in range(n):
            cols = support[i]
            null = np.linalg.svd(h[:, cols])[2][-1]  # the (generic) 1-d null space of an s x (s+1) block
            b[i, cols] = null / null[0]
    patterns, decoding = _decoding_table(b, s) if tabulate else (None, None)
    return GradientCode(b, support, patterns, decoding, s)


def fractional_repetition_code(num_workers: int, stragglers: int) -> GradientCode:
    """Tandon et al.'s fractional repetition code (``(s + 1)`` divides ``n``): ``n / (s+1)`` groups of
    ``s + 1`` workers; every worker of group ``k`` computes the sum of the group's ``s + 1`` partitions
    (0/1 coefficients). Decoding adds one surviving worker per group. Load :math:`(s+1)/n`."""
    n, s = _check_ns(num_workers, stragglers)
    if n % (s + 1):
        raise ValueError(
            f"fractional_repetition_code needs (stragglers + 1) | num_workers; got n={n}, s={s}."
        )
    b = np.zeros((n, n))
    support = np.zeros((n, s + 1), int)
    for i in range(n):
        group = i // (s + 1)
        cols = np.arange(group * (s + 1), (group + 1) * (s + 1))
        b[i, cols] = 1.0
        support[i] = cols
    patterns, decoding = _decoding_table(b, s)
    return GradientCode(b, support, patterns, decoding, s)


def pattern_index(code: GradientCode, straggling: jax.Array) -> jax.Array:
    """Index of the row of ``code.patterns`` equal to the ``[n]`` bool mask ``straggling`` (exactly ``s``
    True); jittable."""
    hits = jnp.all(jnp.asarray(code.patterns) == straggling[None, :], axis=1)
    return jnp.argmax(hits)


def coded_partitions(batch: Any, code: GradientCode) -> tuple[Any, np.ndarray]:
    """Lays out a batch for coded workers.

    Splits each leaf of ``batch`` (leading axis ``B``, divisible by ``n``) into ``n`` partitions and
    returns ``(parts, coefficients)``: ``parts`` with leaves ``[n, s + 1, B / n, ...]`` (worker ``i``'s
    partitions ``code.support[i]``) and ``coefficients`` ``[n, s + 1]`` float32 (``B[i, support[i]]``).
    A worker's coded gradient is ``sum_k coefficients[k] * grad(loss)(params, parts[k])``.
    """
    n = code.num_workers

    def split(x):
        x = jnp.asarray(x)
        if x.shape[0] % n:
            raise ValueError(
                f"coded_partitions: a batch of {x.shape[0]} examples does not split into {n} partitions."
            )
        return x.reshape(n, x.shape[0] // n, *x.shape[1:])[jnp.asarray(code.support)]

    coefficients = np.take_along_axis(code.encoding, code.support, axis=1).astype(np.float32)
    return jax.tree_util.tree_map(split, batch), coefficients


class CodedMeanState(NamedTuple):
    """State of :func:`coded_mean` (identical on every worker): clock step and simulated wall time."""

    step: jax.Array
    wall_time: jax.Array


def coded_mean(code: GradientCode, delays: clock.DelayModel, seed: int = 0) -> Aggregator:
    r"""Decodes the mean partition gradient from the ``n - s`` fastest coded workers.

    Each worker's tree is its coded gradient :math:`c_i = \sum_j B_{ij} g_j` (see
    :func:`coded_partitions`). At every step the simulated clock (``delays``, ``seed``) names the ``s``
    slowest workers as stragglers :math:`S`; every worker all-reduces :math:`a_{S,i} c_i`, so

    .. math:: \hat g = \frac1n \sum_{i \notin S} a_{S,i} c_i = \frac1n \sum_j g_j

    exactly (up to float rounding) on every worker. Wall time per step: the ``(n - s)``-th fastest
    compute time; compute times are those of workers with ``s + 1`` partitions each (scale ``delays``
    by the load yourself if you compare with uncoded workers).

    Bytes: one all-reduce of the tree (stragglers send zeros). Participation weights are refused (the
    code fixes who must answer).

    Args:
      code: a :class:`GradientCode` (:func:`cyclic_code`, :func:`fractional_repetition_code`).
      delays: the :class:`~optdist.stragglers.clock.DelayModel`.
      seed: the clock's seed.

    Returns:
      An :class:`~optdist.comm.aggregation.Aggregator` (state :class:`CodedMeanState`).
    """
    if not isinstance(code, GradientCode):
        raise TypeError(f"code must be a GradientCode (cyclic_code(n, s)); got {code!r}.")
    delays = clock.check_delay_model(delays, "coded_mean")
    seed = int(seed)
    n, s = code.num_workers, code.stragglers
    if code.decoding is None:
        raise ValueError("coded_mean needs a tabulated code: build it with tabulate=True (the default).")
    table = np.asarray(code.decoding, np.float32)

    def init(params):
        return CodedMeanState(jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32))

    def aggregate(tree, state, channel, *, weights=None):
        if weights is not None:
            raise ValueError("coded_mean does not take participation weights: the code fixes who answers.")
        if channel.size != n:
            raise ValueError(f"coded_mean: the code is for {n} workers, the axis has {channel.size}.")
        times = clock.compute_times(delays, seed, state.step, n)
        straggling = ~clock.fastest_mask(times, n - s)
        a = jnp.asarray(table)[pattern_index(code, straggling)]
        mine = a[channel.index] if n > 1 else a[0]
        total = channel.psum(jax.tree_util.tree_map(lambda x: x * mine.astype(x.dtype), tree))
        estimate = jax.tree_util.tree_map(lambda t: t / jnp.asarray(n, t.dtype), total)
        return estimate, CodedMeanState(state.step + 1, state.wall_time + clock.kth_fastest(times, n - s))

    return Aggregator(init, aggregate, f"coded_mean(n={n}, s={s})")


def decode(code: GradientCode, finished: np.ndarray) -> np.ndarray:
    """A decoding vector for a set of finished workers (``[n]`` bool, at least ``n - s`` True): the
    tabulated :math:`a_S` of a size-``s`` straggler set contained in the unfinished ones' complement, or
    (untabulated code) the least-squares solution of :math:`a^\\top B = \\mathbf 1^\\top` on the
    finished rows, checked exact."""
    finished = np.asarray(finished, bool)
    need = code.num_workers - code.stragglers
    if finished.sum() < need:
        raise ValueError(f"{int(finished.sum())} finished workers cannot decode (need {need}).")
    if code.patterns is None:
        a_alive, *_ = np.linalg.lstsq(code.encoding[finished].T, np.ones(code.num_workers), rcond=None)
        if not np.allclose(a_alive @ code.encoding[finished], 1.0, atol=1e-8):
            raise ValueError(f"workers {np.flatnonzero(finished).tolist()} cannot decode (singular system).")
        a = np.zeros(code.num_workers)
        a[finished] = a_alive
        return a
    usable = np.all(code.patterns | finished[None, :], axis=1)  # every unfinished worker is a straggler of S
    return code.decoding[np.argmax(usable)]
