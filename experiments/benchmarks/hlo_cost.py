"""Bytes accessed by a compiled XLA program, counted from its optimized HLO with loop trip counts.

XLA's own ``compiled.cost_analysis()["bytes accessed"]`` counts the body of a ``while`` loop once,
whatever its trip count, so a loop over full-size arrays (``jax.random`` on CPU, a ``lax.fori_loop``,
an iterative root) hides most of its traffic. :func:`bytes_accessed` reads ``compiled.as_text()``
instead and counts

* every instruction of the entry computation (and of computations it ``call``\\ s) as
  **operand bytes + output bytes**, a fusion at its boundary (its fused computation is one pass);
* a ``while`` as ``trip_count x body + (trip_count + 1) x condition``, the trip count taken from
  the ``known_trip_count`` backend config XLA attaches, else from the condition (``i < N`` against
  the constant initial ``i``), else 1 (and the loop is listed in ``unknown_trip_counts``);
* a ``conditional`` as its costliest branch (one of them runs), as XLA's cost analysis does;
* instructions that move nothing as zero: ``parameter``, ``constant``, ``tuple``,
  ``get-tuple-element``, ``bitcast``, ``after-all``, ``partition-id``, ``replica-id``,
  ``opt-barrier``;
* in-place and partial accesses by what they touch, as XLA's cost analysis does:
  ``dynamic-update-slice`` (and a fusion whose root is one, on the aliased operand) reads and
  writes the update only, ``slice`` / ``dynamic-slice`` / ``gather`` (also inside a fusion, on the
  parameter they read from) read what they output.

The text is parsed by :class:`optdist.comm.hlo.HloModule`, the byte audit's parser (one HLO reader
in the project); this module only prices what it reads.

The count is per execution of the program, in bytes, for the shapes as compiled (layouts ignored:
padding of tiled layouts is not counted). Sub-byte types (``s4``, ``u4``, ``f4``...) count as one byte.

Example::

  compiled = jax.jit(f).lower(x).compile()
  cost = hlo_cost.bytes_accessed(compiled.as_text())
  cost.total, cost.loops  # bytes, [(while name, trip count, bytes of one iteration), ...]
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from optdist.comm.hlo import Computation, HloModule, Instruction

_DTYPE_BYTES = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
    "c64": 8,
    "c128": 16,
    "token": 0,
}
_FREE = {
    "parameter",
    "constant",
    "tuple",
    "get-tuple-element",
    "bitcast",
    "after-all",
    "partition-id",
    "replica-id",
    "opt-barrier",
}
_SLICING = {"slice", "dynamic-slice", "gather"}
_ARRAY = re.compile(r"([a-z]+[0-9a-z]*)\[([0-9,]*)\]")


def _dtype_bytes(dtype: str) -> int:
    if dtype in _DTYPE_BYTES:
        return _DTYPE_BYTES[dtype]
    if dtype.startswith(("f8", "f4", "s4", "u4", "s2", "u2", "f6")):
        return 1
    raise ValueError(f"unknown HLO element type {dtype!r}")


def shape_bytes(type_text: str) -> int:
    """Bytes of an HLO type, e.g. ``f32[8,4]{1,0}`` -> 128; a tuple type is the sum of its elements."""
    total = 0
    for dtype, dims in _ARRAY.findall(type_text):
        if dtype in ("index", "dimensions", "metadata"):
            continue
        n = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
        total += n * _dtype_bytes(dtype)
    return total


def parse(hlo_text: str) -> dict[str, Computation]:
    """Computations of an HLO module's text by name, parsed by :class:`optdist.comm.hlo.HloModule`."""
    return HloModule(hlo_text).computations


def _nbytes(instr: Instruction) -> int:
    return shape_bytes(instr.shape)


def _attr(instr: Instruction, key: str) -> str | None:
    """A ``key=%name`` attribute's name (without ``%``), or None."""
    value = instr.attribute(key)
    return value.lstrip("%") if value else None


def _users(comp: Computation, name: str) -> list[tuple[Instruction, int]]:
    """``(instruction, operand number)`` of every use of ``name`` in ``comp``."""
    return [(u, j) for u in comp.users(name) for j, op in enumerate(u.operands) if op == name]


@dataclass
class Cost:
    """Bytes accessed by one execution of a program.

    Attributes:
      total: bytes, loop trip counts applied.
      once: bytes with every loop body counted once (XLA's convention), for comparison.
      loops: ``(while instruction, trip count, bytes of one iteration incl. its condition)``.
      unknown_trip_counts: while loops whose trip count could not be read (counted once).
      records: ``(instruction, opcode, result type, bytes)`` per instruction that moves bytes, the
        enclosing loops' trip counts applied (a loop condition's once per trip): where the bytes go.
    """

    total: int
    once: int
    loops: list[tuple[str, int, int]]
    unknown_trip_counts: list[str]
    records: list[tuple[str, str, str, int]] = field(default_factory=list)

    def top(self, n: int = 15) -> list[tuple[str, str, str, int]]:
        """The ``n`` instructions that move the most bytes (see ``records``), largest first."""
        return sorted(self.records, key=lambda r: -r[3])[:n]


class _Counter:
    def __init__(self, computations: dict[str, Computation]):
        self.comps = computations
        self.loops: list[tuple[str, int, int]] = []
        self.unknown: list[str] = []
        # (instruction name, opcode, result type, bytes with the enclosing loops' trip counts applied)
        self.records: list[tuple[str, str, str, int]] = []
        self._scale = 1  # product of the trip counts of the loops being counted

    def trip_count(self, comp: Computation, loop: Instruction) -> int | None:
        m = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', loop.attributes)
        if m:
            return int(m.group(1))
        return self._trip_from_condition(comp, loop)

    def _trip_from_condition(self, comp: Computation, loop: Instruction) -> int | None:
        """``i < N`` (or ``<=``) in the condition, ``i`` a tuple element starting at a constant."""
        cond = self.comps.get(_attr(loop, "condition") or "")
        if cond is None:
            return None
        root = cond.root
        args = [cond.get(o) for o in root.operands]
        if root.opcode == "fusion":  # the compare wrapped in a fusion: map its parameters back out
            inner = self.comps.get(_attr(root, "calls") or "")
            if inner is None:
                return None
            numbers = {i.name: int(i.literal) for i in inner.instructions if i.opcode == "parameter"}
            outer_names = cond.root.operands
            root = inner.root
            if any(o not in numbers for o in root.operands):
                return None
            args = [cond.get(outer_names[numbers[o]]) for o in root.operands]
        if root.opcode != "compare" or len(args) != 2 or None in args:
            return None
        direction = re.search(r"direction=(\w+)", root.attributes)
        gte, bound = args
        if gte.opcode != "get-tuple-element":
            return None
        limit = self.literal(cond, bound.name)
        index = int(re.search(r"index=(\d+)", gte.attributes).group(1))
        init_tuple = comp.get(loop.operands[0])
        if limit is None or init_tuple is None or init_tuple.opcode != "tuple":
            return None
        start = self.literal(comp, init_tuple.operands[index])
        if start is None or direction is None or direction.group(1) not in ("LT", "LE"):
            return None
        return max(0, limit - start + (direction.group(1) == "LE"))

    def literal(self, comp: Computation, name: str) -> int | None:
        instr = comp.get(name)
        while instr is not None and instr.opcode in ("copy", "convert", "bitcast") and instr.operands:
            instr = comp.get(instr.operands[0])
        if instr is None or instr.opcode != "constant":
            return None
        m = re.fullmatch(r"\s*(-?\d+)\s*", instr.literal)
        return int(m.group(1)) if m else None

    def computation(self, name: str, once: bool = False) -> int:
        comp = self.comps[name]
        total = 0
        for instr in comp.instructions:
            nbytes = self.instruction(comp, instr, once)
            if nbytes and instr.opcode not in ("while", "conditional", "call", "async-start"):
                self.records.append((instr.name, instr.opcode, instr.shape, nbytes * self._scale))
            total += nbytes
        return total

    def instruction(self, comp: Computation, instr: Instruction, once: bool) -> int:
        op = instr.opcode
        if op in _FREE:
            return 0
        if op == "while":
            trips = 1 if once else self.trip_count(comp, instr)
            self._scale *= trips or 1
            body = self.computation(_attr(instr, "body"), once=once)
            cond = self.computation(_attr(instr, "condition"), once=once)
            self._scale //= trips or 1
            if once:
                return body + cond
            if trips is None:
                self.unknown.append(instr.name)
                trips = 1
            self.loops.append((instr.name, trips, body + cond))
            return trips * body + (trips + 1) * cond
        if op == "conditional":
            names = re.findall(r"%?([\w.\-]+)", _branch_list(instr.attributes))
            return self.operand_bytes(comp, instr.operands[:1]) + max(
                (self.computation(n, once=once) for n in names), default=0
            )
        called = (
            _attr(instr, "to_apply" if op == "call" else "calls") if op in ("call", "async-start") else None
        )
        if called:
            return self.computation(called, once=once)
        if op in _SLICING:
            return 2 * _nbytes(instr) + self.operand_bytes(comp, instr.operands[1:])
        if op == "dynamic-update-slice":
            update = _nbytes(comp[instr.operands[1]])
            return 2 * update + self.operand_bytes(comp, instr.operands[2:])
        if op == "fusion":
            return self.fusion(comp, instr)
        return self.operand_bytes(comp, instr.operands) + _nbytes(instr)

    def operand_bytes(self, comp: Computation, names) -> int:
        return sum(_nbytes(comp[n]) for n in names if comp.get(n) is not None)

    def fusion(self, comp: Computation, instr: Instruction) -> int:
        fused = self.comps.get(_attr(instr, "calls") or "")
        if fused is None:
            return self.operand_bytes(comp, instr.operands) + _nbytes(instr)
        params = {int(p.literal): p for p in fused.instructions if p.opcode == "parameter"}
        root = fused.root
        outputs = [fused[o] for o in root.operands] if root.opcode == "tuple" else [root]
        in_place = {o.operands[0] for o in outputs if o.opcode == "dynamic-update-slice"}
        total = 0
        for k, name in enumerate(instr.operands):
            outer = comp.get(name)
            param = params.get(k)
            if outer is None:
                continue
            if param is None:
                total += _nbytes(outer)
                continue
            users = _users(fused, param.name)
            if param.name in in_place and all(
                u.opcode == "dynamic-update-slice" and j == 0 for u, j in users
            ):
                continue  # the aliased buffer of an in-place update: only the update is touched
            if users and all(u.opcode in _SLICING and j == 0 for u, j in users):
                total += sum(_nbytes(u) for u, _ in users)
            else:
                total += _nbytes(outer)
        for out in outputs:
            if out.opcode == "dynamic-update-slice":
                total += _nbytes(fused[out.operands[1]])
            else:
                total += _nbytes(out)
        return total


def _branch_list(attrs: str) -> str:
    m = re.search(r"branch_computations=\{([^}]*)\}", attrs)
    if m:
        return m.group(1)
    names = [re.search(rf"{k}=%?([\w.\-]+)", attrs) for k in ("true_computation", "false_computation")]
    return ",".join(n.group(1) for n in names if n)


def bytes_accessed(hlo_text: str) -> Cost:
    """Bytes accessed by one run of the compiled program whose optimized HLO is ``hlo_text``."""
    module = HloModule(hlo_text)
    comps, entry = module.computations, module.entry
    counter = _Counter(comps)
    total = counter.computation(entry)
    once = _Counter(comps).computation(entry, once=True)
    return Cost(total, once, counter.loops, counter.unknown, counter.records)


def xla_bytes_accessed(compiled) -> float:
    """XLA's own figure, ``compiled.cost_analysis()["bytes accessed"]`` (a dict or a list of one)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list | tuple):
        analysis = analysis[0]
    return float(analysis["bytes accessed"])
