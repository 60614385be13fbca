"""Communication graphs for gossip: a mixing matrix written as weighted permutations.

A :class:`Topology` over ``n`` workers is a convex combination of permutations,

.. math:: W = w_0 I + \\sum_k w_k \\Pi_k, \\qquad w_k \\ge 0, \\quad \\sum_k w_k = 1,

where ``Π_k`` moves worker ``s``'s value to worker ``perms[k][s]``. Every such ``W`` is doubly
stochastic (Birkhoff), so gossip ``x ← W x`` preserves the workers' mean, and each permutation is one
``ppermute`` (a worker sends its payload once per term). Identical permutations are merged, so a
2-worker ring is one exchange, not two.

Factories: :func:`ring`, :func:`torus`, :func:`exponential`, :func:`complete`, and the time-varying
:func:`one_peer_exponential` (a :class:`TopologySchedule`: one graph per step, cycling); :func:`resolve`
turns a name into the graphs once the number of workers is known (at trace time).

References:
  Lian et al., "Can Decentralized Algorithms Outperform Centralized Algorithms?", NeurIPS 2017.
  Ying et al., "Exponential Graph is Provably Efficient for Decentralized Deep Training", NeurIPS 2021.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from optdist import _checks


class Topology(NamedTuple):
    """A mixing matrix ``W = self_weight I + Σ_k weights[k] Π_k`` over ``size`` workers.

    Attributes:
      name: a short name, e.g. ``"ring(8)"``.
      size: number of workers ``n``.
      self_weight: weight a worker keeps on its own value.
      weights: weight of each permutation term.
      perms: ``perms[k][s]`` is the worker that receives worker ``s``'s value in term ``k``.
    """

    name: str
    size: int
    self_weight: float
    weights: tuple[float, ...]
    perms: tuple[tuple[int, ...], ...]

    def matrix(self) -> np.ndarray:
        """``W`` as a float64 ``[n, n]`` array: ``(W x)_i = Σ_j W[i, j] x_j``."""
        w = self.self_weight * np.eye(self.size)
        for weight, perm in zip(self.weights, self.perms):
            for source, dest in enumerate(perm):
                w[dest, source] += weight
        return w

    def sources(self, term: int) -> tuple[int, ...]:
        """``sources(k)[d]``: the worker whose value worker ``d`` receives in term ``k``."""
        out = [0] * self.size
        for source, dest in enumerate(self.perms[term]):
            out[dest] = source
        return tuple(out)

    def spectral_gap(self) -> float:
        """``1 - |λ₂(W)|`` (second-largest singular value for non-symmetric ``W``): how fast gossip mixes."""
        if self.size == 1:
            return 1.0
        singular = np.linalg.svd(
            self.matrix() - np.full((self.size, self.size), 1.0 / self.size), compute_uv=False
        )
        return float(1.0 - singular[0])


def custom(
    size: int, self_weight: float, terms: Sequence[tuple[float, Sequence[int]]], name: str = "custom"
) -> Topology:
    """A topology from ``(weight, perm)`` terms; checks that they form a doubly stochastic ``W``.

    Identity permutations fold into ``self_weight`` and repeated permutations are merged (their
    weights add), so each remaining term is one distinct exchange.
    """
    size = _checks.positive_int(size, "size")
    merged: dict[tuple[int, ...], float] = {}
    self_weight = float(self_weight)
    for weight, perm in terms:
        perm = tuple(int(d) for d in perm)
        if sorted(perm) != list(range(size)):
            raise ValueError(f"{name}: {perm} is not a permutation of the {size} workers.")
        if perm == tuple(range(size)):
            self_weight += float(weight)
        else:
            merged[perm] = merged.get(perm, 0.0) + float(weight)
    weights = (self_weight, *merged.values())
    if min(weights) < 0 or not math.isclose(sum(weights), 1.0, rel_tol=0, abs_tol=1e-9):
        raise ValueError(
            f"{name}: the weights must be >= 0 and sum to 1 (a doubly stochastic mixing matrix); got "
            f"self weight {self_weight} and {list(merged.values())}."
        )
    return Topology(name, size, self_weight, tuple(merged.values()), tuple(merged))


def _shift(size: int, offset: int) -> tuple[int, ...]:
    return tuple((s + offset) % size for s in range(size))


def ring(size: int) -> Topology:
    """Each worker averages itself and its two ring neighbours, weight 1/3 each (1/2 each for 2)."""
    size = _checks.positive_int(size, "size")
    if size <= 2:
        return custom(size, 1.0 / size, [(1.0 - 1.0 / size, _shift(size, 1))], f"ring({size})")
    return custom(size, 1 / 3, [(1 / 3, _shift(size, 1)), (1 / 3, _shift(size, -1))], f"ring({size})")


def torus(rows: int, cols: int) -> Topology:
    """A 2-D torus (worker ``r * cols + c``): itself and four neighbours, weight 1/5 each."""
    rows = _checks.positive_int(rows, "rows")
    cols = _checks.positive_int(cols, "cols")
    size = rows * cols

    def move(dr, dc):
        return tuple(((s // cols + dr) % rows) * cols + (s % cols + dc) % cols for s in range(size))

    terms = [(0.2, move(1, 0)), (0.2, move(-1, 0)), (0.2, move(0, 1)), (0.2, move(0, -1))]
    return custom(size, 0.2, terms, f"torus({rows}x{cols})")


def exponential(size: int) -> Topology:
    """Static exponential graph: worker ``i`` receives from ``i - 2^k`` for each ``2^k < n``, equal weights.

    Directed (not symmetric) but doubly stochastic; ``⌈log₂ n⌉`` exchanges per gossip round and a
    spectral gap that shrinks only like ``1/log n`` (Ying et al. 2021).
    """
    size = _checks.positive_int(size, "size")
    offsets = [2**k for k in range(max(0, math.ceil(math.log2(size))))] if size > 1 else []
    weight = 1.0 / (len(offsets) + 1)
    return custom(size, weight, [(weight, _shift(size, o)) for o in offsets], f"exponential({size})")


def complete(size: int) -> Topology:
    """Every worker averages everyone (``W = 11ᵀ/n``): exact averaging in one round, ``n - 1`` exchanges."""
    size = _checks.positive_int(size, "size")
    return custom(
        size, 1.0 / size, [(1.0 / size, _shift(size, o)) for o in range(1, size)], f"complete({size})"
    )


class TopologySchedule(NamedTuple):
    """A time-varying graph: step ``t`` gossips on ``rounds[t % len(rounds)]``.

    Attributes:
      name: a short name, e.g. ``"one_peer_exponential(8)"``.
      size: number of workers ``n``.
      rounds: the graphs, in order.
    """

    name: str
    size: int
    rounds: tuple[Topology, ...]

    def matrix(self, step: int) -> np.ndarray:
        """``W_t`` of step ``step``."""
        return self.rounds[step % len(self.rounds)].matrix()


def one_peer_exponential(size: int) -> TopologySchedule:
    """One peer per step: at step ``t`` worker ``i`` averages with ``i - 2^(t mod τ)``, ``τ = ⌈log₂ n⌉``.

    Each round is ``½ (I + Π)``: one exchange per step (the ring's half), and for ``n`` a power of two
    the product of ``τ`` consecutive rounds is exactly ``11ᵀ/n``: exact averaging in ``log₂ n`` steps
    (Ying et al. 2021).
    """
    size = _checks.positive_int(size, "size")
    offsets = [2**k for k in range(math.ceil(math.log2(size)))] if size > 1 else [0]
    rounds = tuple(custom(size, 0.5, [(0.5, _shift(size, o))], f"one_peer({o})") for o in offsets)
    return TopologySchedule(f"one_peer_exponential({size})", size, rounds)


def _square_torus(size: int) -> Topology:
    rows = max(r for r in range(1, math.isqrt(size) + 1) if size % r == 0)
    return torus(rows, size // rows)


_NAMED = {
    "ring": ring,
    "torus": _square_torus,
    "exponential": exponential,
    "complete": complete,
    "one_peer_exponential": one_peer_exponential,
}


Graph = str | Topology | TopologySchedule


def validate(topology: Graph) -> Graph:
    """Checks a topology argument at construction time."""
    if isinstance(topology, (Topology, TopologySchedule)):
        return topology
    if isinstance(topology, str) and topology in _NAMED:
        return topology
    raise ValueError(
        f"topology must be one of {sorted(_NAMED)} or an optdist.decentralized.Topology "
        f"(e.g. optdist.decentralized.torus(4, 2)); got {topology!r}."
    )


def resolve(topology: Graph, size: int) -> tuple[Topology, ...]:
    """The graphs for ``size`` workers, one per round (one for a static graph).

    A name becomes that graph; a Topology or TopologySchedule must be for ``size`` workers.
    """
    if isinstance(topology, str):
        topology = _NAMED[topology](size)
    if topology.size != size:
        raise ValueError(
            f"topology {topology.name} is for {topology.size} workers but the axis has {size}; build it "
            f"for {size} workers or pass its name (e.g. 'ring') to size it automatically."
        )
    return topology.rounds if isinstance(topology, TopologySchedule) else (topology,)
