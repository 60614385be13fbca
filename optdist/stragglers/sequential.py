r"""Sequential gradient coding (Krishnan, Ebrahimi, Khisti): gradients coded across workers *and* rounds.

Job ``t`` (the gradient :math:`g(t)`) starts in round ``t`` and must be decoded by round ``t + T``.
Stragglers follow the :math:`(B, W, \lambda)`-*bursty* model (:func:`is_bursty`): in every window of
``W`` consecutive rounds at most :math:`\lambda` distinct workers straggle, and each of them straggles
only within ``B`` consecutive rounds of the window. A straggling worker returns nothing that round.
Everything here is float64 NumPy and exact: it decides *who computes what, when*, and decodes.

**Selective repeat** (SR-SGC, :func:`selective_repeat_code`, the paper's first scheme): every round
each worker computes its task of the new job with an ``(n, s)`` gradient code,
:math:`s = \lceil B\lambda / (W - 1 + B) \rceil`; if ``v > s`` workers did not return job ``r - B``
in round ``r - B``, the first ``v - s`` of them repeat that task in round ``r`` *instead of* their
job-``r`` task. Job ``t`` decodes from any ``n - s`` of its coded results from rounds ``t`` and
``t + B``. Delay ``T = B``; load :math:`(s + 1)/n` of a job's data per worker per round.

**Multiplexed** (M-SGC, :func:`multiplexed_code`, the paper's main scheme): a job's data is split into
``D1``, ``n(W - 1)`` uncoded chunks (worker ``i`` owns ``W - 1``), and ``D2``, ``B`` groups each coded
over the workers with an ``(n, \lambda)`` gradient code. Job ``t``'s ``W - 1 + B`` minitasks run one
per round in rounds ``t .. t + W - 2 + B``, so a worker carries one minitask of each of ``W - 1 + B``
jobs per round. In the job's first ``W - 1`` slots the worker computes its next unfinished D1 chunk;
in slot ``W - 1 + j`` it computes its coded task of group ``j`` if all its chunks are in, and
otherwise its next unfinished chunk again. Job ``t`` decodes when every chunk is in and every group has
``n - \lambda`` coded results: :math:`g(t) = \sum \text{chunks} + \sum_j a_{S_j}^\top c_j`. Delay
``T = W - 2 + B``. Minitasks are sized equal (``D1`` is the fraction
:math:`(W-1)(\lambda+1) / (B + (W-1)(\lambda+1))` of the data), which gives the paper's load

.. math:: \frac{(\lambda + 1)(W - 1 + B)}{n\,(B + (W - 1)(\lambda + 1))}
   \quad (\lambda < n), \qquad \frac{W - 1 + B}{n (W - 1)} \quad (\lambda = n,\ D2\ \text{empty}),

against plain gradient coding's :math:`(\lambda + 1)/n` for the same :math:`\lambda` stragglers.

:func:`schedule` runs either scheme on a straggler record, :func:`decode` recovers a job's gradient
from the worker results the schedule says arrived, and :func:`straggler_record` turns per-worker
compute times into the record a master would act on (wait ``(1 + mu)`` times the fastest worker,
unless that would break the scheme's straggler model: then wait for every worker), with the round
durations, for simulated run times.

Deviations: the paper's simulations exempt some rounds from the straggler count (rounds with at most
``s`` stragglers, for SR-SGC); :func:`is_bursty` is the plain model, so :func:`straggler_record`
waits for every worker a little more often than theirs. A worker's order of D1 chunks and which
``v - s`` workers repeat (the lowest indices) are our choices; decoding does not depend on them.

References:
  Krishnan, Ebrahimi, Khisti, "Sequential Gradient Coding For Straggler Mitigation", ICLR 2023
  (arXiv:2211.13802).
"""

from __future__ import annotations

import itertools
import math
from typing import Any, NamedTuple

import numpy as np

from optdist import _checks
from optdist.stragglers import gradient_coding as gc


class SequentialCode(NamedTuple):
    """A sequential gradient code for ``n`` workers and :math:`(B, W, \\lambda)`-bursty stragglers.

    Attributes:
      scheme: ``"selective_repeat"`` or ``"multiplexed"``.
      num_workers, burst, window, stragglers: ``n``, ``B``, ``W``, :math:`\\lambda`.
      code: the per-round :class:`~optdist.stragglers.gradient_coding.GradientCode` (SR-SGC: ``(n, s)``;
        M-SGC: ``(n, lambda)`` for each D2 group, None when :math:`\\lambda = n`).
      delay: ``T``, rounds between a job's start and its deadline.
      groups: coded groups per job (SR-SGC 1, M-SGC ``B``; 0 when D2 is empty).
      chunks: uncoded D1 chunks per worker per job (SR-SGC 0, M-SGC ``W - 1``).
      minitask: fraction of one job's data in one minitask (SR-SGC: a whole coded task, ``(s+1)/n``).
    """

    scheme: str
    num_workers: int
    burst: int
    window: int
    stragglers: int
    code: gc.GradientCode | None
    delay: int
    groups: int
    chunks: int
    minitask: float

    @property
    def load(self) -> float:
        """The paper's per-worker, per-round load: fraction of one job's data computed in a round."""
        slots = 1 if self.scheme == "selective_repeat" else self.chunks + self.burst
        return slots * self.minitask

    @property
    def chunk_fraction(self) -> float:
        """Fraction of a job's data in the uncoded part D1 (0 for SR-SGC)."""
        return self.num_workers * self.chunks * self.minitask


def _check_bwl(num_workers: Any, burst: Any, window: Any, stragglers: Any) -> tuple[int, int, int, int]:
    n = _checks.positive_int(num_workers, "num_workers")
    b = _checks.positive_int(burst, "burst")
    w = _checks.positive_int(window, "window")
    lam = _checks.positive_int(stragglers, "stragglers")
    if w <= b:
        raise ValueError(f"window (W) must exceed burst (B); got W={w}, B={b}.")
    if lam > n:
        raise ValueError(f"stragglers (lambda) must be at most num_workers = {n}; got {lam}.")
    return n, b, w, lam


def selective_repeat_code(
    num_workers: int, burst: int, window: int, stragglers: int, seed: int = 0
) -> SequentialCode:
    r"""SR-SGC for :math:`(B, W, \lambda)`-bursty stragglers: an ``(n, s)`` cyclic code per round with
    :math:`s = \lceil B\lambda/(W-1+B) \rceil`, delay ``T = B``, load :math:`(s+1)/n`.

    Args:
      num_workers: ``n``.
      burst: ``B >= 1``, with ``B`` dividing ``W - 1`` (the paper's condition).
      window: ``W > B``.
      stragglers: :math:`\lambda` in ``[1, n]``; ``s`` must come out ``<= n - 1``.
      seed: seed of the cyclic code.

    Returns:
      A :class:`SequentialCode` for :func:`schedule` and :func:`decode`.
    """
    n, b, w, lam = _check_bwl(num_workers, burst, window, stragglers)
    if (w - 1) % b:
        raise ValueError(
            f"selective_repeat_code needs burst (B) to divide window - 1 (W - 1); got B={b}, W={w}."
        )
    s = math.ceil(b * lam / (w - 1 + b))
    if s >= n:
        raise ValueError(
            f"selective_repeat_code: s = ceil(B*lambda/(W-1+B)) = {s} leaves no worker to decode from "
            f"(n = {n}); lower stragglers or burst, or widen the window."
        )
    code = gc.cyclic_code(n, s, seed, tabulate=False)
    return SequentialCode("selective_repeat", n, b, w, lam, code, b, 1, 0, code.load)


def multiplexed_code(
    num_workers: int, burst: int, window: int, stragglers: int, seed: int = 0
) -> SequentialCode:
    r"""M-SGC for :math:`(B, W, \lambda)`-bursty stragglers: ``W - 1`` uncoded chunks per worker and ``B``
    groups coded with an ``(n, lambda)`` cyclic code, multiplexed over ``W - 1 + B`` rounds (delay
    ``T = W - 2 + B``); load in the module docstring.

    Args:
      num_workers: ``n``.
      burst: ``B >= 1``.
      window: ``W > B``.
      stragglers: :math:`\lambda` in ``[1, n]`` (``lambda = n``: no coded part, every worker may straggle).
      seed: seed of the cyclic code.

    Returns:
      A :class:`SequentialCode` for :func:`schedule` and :func:`decode`.

    Example::

      code = sequential.multiplexed_code(8, burst=1, window=2, stragglers=2)  # load 0.1875 (GC: 0.375)
      sched = sequential.schedule(code, straggling)  # [rounds, 8] bool, True = straggles that round
      g = sequential.decode(code, sched, t, chunk_grads[t], coded_results[t])  # job t's exact gradient
    """
    n, b, w, lam = _check_bwl(num_workers, burst, window, stragglers)
    if lam == n:
        return SequentialCode("multiplexed", n, b, w, lam, None, w - 2 + b, 0, w - 1, 1.0 / (n * (w - 1)))
    minitask = (lam + 1) / (n * (b + (w - 1) * (lam + 1)))
    return SequentialCode(
        "multiplexed",
        n,
        b,
        w,
        lam,
        gc.cyclic_code(n, lam, seed, tabulate=False),
        w - 2 + b,
        b,
        w - 1,
        minitask,
    )


# --------------------------------------------------------------------------- #
# The straggler model


def _bursty_window(window_record: np.ndarray, burst: int, stragglers: int) -> bool:
    """One window ``[W', n]``: at most ``lambda`` distinct stragglers, each within ``B`` successive rounds."""
    hit = window_record.any(axis=0)
    if hit.sum() > stragglers:
        return False
    for i in np.flatnonzero(hit):
        rounds = np.flatnonzero(window_record[:, i])
        if rounds[-1] - rounds[0] + 1 > burst:
            return False
    return True


def is_bursty(straggling: np.ndarray, burst: int, window: int, stragglers: int) -> bool:
    r"""Whether a straggler record ``[R, n]`` (True = straggles) fits the :math:`(B, W, \lambda)`-bursty
    model: in every ``W`` consecutive rounds at most :math:`\lambda` distinct workers straggle, each only
    within ``B`` consecutive rounds (a shorter record is one window)."""
    straggling = np.asarray(straggling, bool)
    rounds = straggling.shape[0]
    starts = range(max(rounds - window, 0) + 1)
    return all(_bursty_window(straggling[a : a + window], burst, stragglers) for a in starts)


def bursty_records(
    num_workers: int, rounds: int, burst: int, window: int, stragglers: int
) -> list[np.ndarray]:
    """Every :math:`(B, W, \\lambda)`-bursty straggler record of ``rounds x num_workers`` (for exhaustive
    checks on small codes: the count grows exponentially). Built round by round: a prefix outside the
    model has no completion inside it, so only the window ending at the new round is checked."""
    n = _checks.positive_int(num_workers, "num_workers")
    masks = np.array(list(itertools.product([False, True], repeat=n)), bool)
    records = [np.zeros((0, n), bool)]
    for _ in range(rounds):
        records = [
            grown
            for rec in records
            for m in masks
            if _bursty_window((grown := np.vstack([rec, m[None]]))[-window:], burst, stragglers)
        ]
    return records


# --------------------------------------------------------------------------- #
# Schedules


class Schedule(NamedTuple):
    """What arrived, per job, when a :class:`SequentialCode` runs on a straggler record of ``R`` rounds.

    ``J = R - T`` jobs (the last ``T`` rounds only finish earlier jobs).

    Attributes:
      decoded_round: ``[J]`` the first round by which job ``t`` is decodable (``-1``: not by ``t + T``).
      coded: ``[J, G, n]`` bool: worker ``i``'s coded result of group ``g`` of job ``t`` arrived by ``t + T``.
      chunks: ``[J, n]`` int: worker ``i``'s uncoded chunks of job ``t`` that arrived by ``t + T``.
      load: ``[R, n]`` fraction of one job's data worker ``i`` was assigned in round ``r``.
    """

    decoded_round: np.ndarray
    coded: np.ndarray
    chunks: np.ndarray
    load: np.ndarray


def _record(code: SequentialCode, straggling: Any) -> np.ndarray:
    if not isinstance(code, SequentialCode):
        raise TypeError(
            f"code must be a SequentialCode (selective_repeat_code / multiplexed_code); got {code!r}."
        )
    straggling = np.asarray(straggling, bool)
    if straggling.ndim != 2 or straggling.shape[1] != code.num_workers:
        raise ValueError(
            f"straggling must be [rounds, {code.num_workers}] bool; got shape {straggling.shape}."
        )
    return straggling


def _decodable(code: SequentialCode, coded: np.ndarray, chunks: np.ndarray) -> bool:
    need = code.num_workers - (code.code.stragglers if code.code is not None else code.num_workers)
    return bool(np.all(chunks >= code.chunks) and np.all(coded.sum(axis=-1) >= need))


def _selective_repeat(code: SequentialCode, straggling: np.ndarray) -> Schedule:
    rounds, n = straggling.shape
    jobs, b, s = max(rounds - code.delay, 0), code.burst, code.code.stragglers
    coded = np.zeros((jobs, 1, n), bool)
    decoded = np.full(jobs, -1)
    load = np.zeros((rounds, n))
    for r in range(rounds):
        job = np.full(n, r if r < jobs else -1)
        old = r - b
        if 0 <= old < jobs:  # the workers job r - B missed in its own round; v - s of them repeat
            missing = np.flatnonzero(~coded[old, 0])
            if missing.size > s:
                job[missing[: missing.size - s]] = old
        for i in np.flatnonzero((job >= 0) & ~straggling[r]):
            coded[job[i], 0, i] = True
        load[r] = code.minitask * (job >= 0)
        for t in range(max(old, 0), min(r, jobs - 1) + 1):
            if decoded[t] < 0 and _decodable(code, coded[t], np.zeros(n)):
                decoded[t] = r
    return Schedule(decoded, coded, np.zeros((jobs, n), int), load)


def _multiplexed(code: SequentialCode, straggling: np.ndarray) -> Schedule:
    rounds, n = straggling.shape
    jobs, chunks_per_job = max(rounds - code.delay, 0), code.chunks
    coded = np.zeros((jobs, code.groups, n), bool)
    chunks = np.zeros((jobs, n), int)
    decoded = np.full(jobs, -1)
    load = np.zeros((rounds, n))
    for r in range(rounds):
        done = ~straggling[r]
        for slot in range(chunks_per_job + code.burst):
            t = r - slot
            if not 0 <= t < jobs:
                continue
            # a chunk while any is missing (always in the first W - 1 slots), else the slot's coded task
            needs_chunk = chunks[t] < chunks_per_job
            group = slot - chunks_per_job
            load[r] += code.minitask * (needs_chunk | (group >= 0 and code.groups > 0))
            if group >= 0 and code.groups > 0:
                coded[t, group] |= ~needs_chunk & done
            chunks[t] += needs_chunk & done
        for t in range(max(r - code.delay, 0), min(r, jobs - 1) + 1):
            if decoded[t] < 0 and _decodable(code, coded[t], chunks[t]):
                decoded[t] = r
    return Schedule(decoded, coded, chunks, load)


def schedule(code: SequentialCode, straggling: Any) -> Schedule:
    """Runs ``code`` on a straggler record ``[R, n]`` (True = the worker returns nothing that round).

    Every job's gradient is decodable by its deadline whenever the record is :func:`is_bursty` for the
    code's ``(B, W, lambda)`` (the paper's guarantee; ``tests/stragglers`` checks it exhaustively on
    small codes). On other records some jobs may not decode (``decoded_round == -1``).
    """
    straggling = _record(code, straggling)
    return (_selective_repeat if code.scheme == "selective_repeat" else _multiplexed)(code, straggling)


def decode(
    code: SequentialCode, sched: Schedule, job: int, chunk_gradients: Any, coded_results: Any
) -> np.ndarray:
    r"""Job ``job``'s gradient from what arrived, float64.

    Args:
      code, sched: the code and its :func:`schedule`.
      job: the job index.
      chunk_gradients: ``[n, W - 1, ...]`` worker ``i``'s D1 chunk gradients (M-SGC; ignored for SR-SGC,
        pass None). Only chunks the schedule says arrived may be used: all of them, when decodable.
      coded_results: ``[G, n, ...]``: worker ``i``'s coded result of group ``g``,
        :math:`\sum_p B_{ip} g_{g,p}` with ``B = code.code.encoding``; only arrived ones are read.

    Returns:
      :math:`g(t)`: the chunks' sum plus each group's decoded sum.

    Raises:
      ValueError: if the job did not decode by its deadline.
    """
    if sched.decoded_round[job] < 0:
        raise ValueError(f"job {job} did not decode by its deadline (round {job + code.delay}).")
    total = 0.0
    if code.chunks:
        total = np.asarray(chunk_gradients, np.float64).sum(axis=(0, 1))
    for g in range(code.groups):
        arrived = sched.coded[job, g]
        a = gc.decode(code.code, arrived)
        results = np.asarray(coded_results[g], np.float64)
        total = total + np.tensordot(a[arrived], results[arrived], axes=1)
    return np.asarray(total, np.float64)


# --------------------------------------------------------------------------- #
# Simulated run time


def straggler_record(
    code: SequentialCode | gc.GradientCode | None, times: Any, mu: float
) -> tuple[np.ndarray, np.ndarray]:
    r"""The straggler record and round durations a master produces from compute times ``[R, n]``.

    Each round the master waits :math:`(1 + \mu)\,\min_i t_{r,i}`; workers slower than that straggle,
    unless treating them as stragglers would break what the scheme tolerates, in which case it waits for
    every worker (no stragglers, duration :math:`\max_i t_{r,i}`). What is tolerated: a
    :class:`SequentialCode`'s bursty model given the rounds so far; a
    :class:`~optdist.stragglers.gradient_coding.GradientCode`'s ``s`` per round; None (uncoded): nothing.

    ``times`` must already include each scheme's load (scale a per-unit-work time by ``code.load``).

    Returns:
      ``(straggling [R, n] bool, durations [R] float64)``.
    """
    times = np.asarray(times, np.float64)
    mu = _checks.in_range(mu, "mu", 0.0, float("inf"))
    rounds, n = times.shape
    straggling = np.zeros((rounds, n), bool)
    durations = times.max(axis=1)
    for r in range(rounds):
        cut = times[r].min() * (1.0 + mu)
        slow = times[r] > cut
        if not slow.any():
            durations[r] = times[r].max()
            continue
        if isinstance(code, SequentialCode):
            straggling[r] = slow
            lo = max(r - code.window + 1, 0)
            if not _bursty_window(straggling[lo : r + 1], code.burst, code.stragglers):
                straggling[r] = False
                continue
        elif isinstance(code, gc.GradientCode) and slow.sum() <= code.stragglers:
            straggling[r] = slow
        else:
            continue
        durations[r] = cut
    return straggling, durations
