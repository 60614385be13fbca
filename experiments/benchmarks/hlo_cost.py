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
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTR = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
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


def _matching(text: str, start: int) -> int:
    """Index just past the bracket that closes the one at ``text[start]``."""
    pairs = {"(": ")", "{": "}", "[": "]"}
    stack = []
    for i in range(start, len(text)):
        ch = text[i]
        if ch in pairs:
            stack.append(pairs[ch])
        elif stack and ch == stack[-1]:
            stack.pop()
            if not stack:
                return i + 1
    raise ValueError(f"unbalanced brackets in HLO line: {text[:200]!r}")


def _split_top(text: str) -> list[str]:
    """Splits on commas outside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "({[":
            depth += 1
        elif ch in ")}]":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    if text[start:].strip():
        parts.append(text[start:].strip())
    return parts


@dataclass
class Instruction:
    name: str
    type_text: str
    opcode: str
    operands: list[str]
    attrs: str
    root: bool
    args_text: str  # the text inside the opcode's parentheses (a constant's literal, a parameter's number)

    @property
    def nbytes(self) -> int:
        return shape_bytes(self.type_text)

    def attr(self, key: str) -> str | None:
        m = re.search(rf"\b{key}=%?([\w.\-]+)", self.attrs)
        return m.group(1) if m else None


@dataclass
class Computation:
    name: str
    entry: bool
    instructions: dict[str, Instruction] = field(default_factory=dict)

    @property
    def root(self) -> Instruction:
        return next(i for i in self.instructions.values() if i.root)

    def users(self, name: str) -> list[tuple[Instruction, int]]:
        """``(instruction, operand number)`` of every use of ``name``."""
        if not hasattr(self, "_users"):
            index: dict[str, list[tuple[Instruction, int]]] = {}
            for instr in self.instructions.values():
                for k, op in enumerate(instr.operands):
                    index.setdefault(op, []).append((instr, k))
            self._users = index
        return self._users.get(name, [])


def _parse_instruction(line: str) -> Instruction | None:
    m = _INSTR.match(line)
    if not m:
        return None
    root, name, rhs = bool(m.group(1)), m.group(2), m.group(3).strip()
    if rhs.startswith("("):
        end = _matching(rhs, 0)
    else:
        end = rhs.index(" ")
    type_text, rest = rhs[:end], rhs[end:].strip()
    op = re.match(r"([\w\-]+)\(", rest)
    if not op:
        return None
    close = _matching(rest, op.end() - 1)
    inside, attrs = rest[op.end() : close - 1], rest[close:].lstrip(", ")
    operands = []
    if op.group(1) != "constant":
        for token in _split_top(inside):
            ref = re.search(r"%?([\w.\-]+)\s*$", token)
            if ref:
                operands.append(ref.group(1))
    return Instruction(name, type_text, op.group(1), operands, attrs, root, inside.strip())


def parse(hlo_text: str) -> dict[str, Computation]:
    """Computations of an HLO module's text by name (the entry one has ``entry=True``)."""
    computations: dict[str, Computation] = {}
    current = None
    for line in hlo_text.splitlines():
        if current is None:
            m = _HEADER.match(line)
            if m:
                current = Computation(m.group(2), bool(m.group(1)))
                computations[current.name] = current
            continue
        if line.strip() == "}":
            current = None
            continue
        instr = _parse_instruction(line)
        if instr is not None:
            current.instructions[instr.name] = instr
    if not any(c.entry for c in computations.values()):
        raise ValueError("no ENTRY computation in the HLO text (pass compiled.as_text()).")
    return computations


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
        m = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', loop.attrs)
        if m:
            return int(m.group(1))
        return self._trip_from_condition(comp, loop)

    def _trip_from_condition(self, comp: Computation, loop: Instruction) -> int | None:
        """``i < N`` (or ``<=``) in the condition, ``i`` a tuple element starting at a constant."""
        cond = self.comps.get(loop.attr("condition") or "")
        if cond is None:
            return None
        root = cond.root
        args = [cond.instructions.get(o) for o in root.operands]
        if root.opcode == "fusion":  # the compare wrapped in a fusion: map its parameters back out
            inner = self.comps.get(root.attr("calls") or "")
            if inner is None:
                return None
            numbers = {
                i.name: int(i.args_text) for i in inner.instructions.values() if i.opcode == "parameter"
            }
            outer_names = cond.root.operands
            root = inner.root
            if any(o not in numbers for o in root.operands):
                return None
            args = [cond.instructions.get(outer_names[numbers[o]]) for o in root.operands]
        if root.opcode != "compare" or len(args) != 2 or None in args:
            return None
        direction = re.search(r"direction=(\w+)", root.attrs)
        gte, bound = args
        if gte.opcode != "get-tuple-element":
            return None
        limit = self.literal(cond, bound.name)
        index = int(re.search(r"index=(\d+)", gte.attrs).group(1))
        init_tuple = comp.instructions.get(loop.operands[0])
        if limit is None or init_tuple is None or init_tuple.opcode != "tuple":
            return None
        start = self.literal(comp, init_tuple.operands[index])
        if start is None or direction is None or direction.group(1) not in ("LT", "LE"):
            return None
        return max(0, limit - start + (direction.group(1) == "LE"))

    def literal(self, comp: Computation, name: str) -> int | None:
        instr = comp.instructions.get(name)
        while instr is not None and instr.opcode in ("copy", "convert", "bitcast") and instr.operands:
            instr = comp.instructions.get(instr.operands[0])
        if instr is None or instr.opcode != "constant":
            return None
        m = re.fullmatch(r"\s*(-?\d+)\s*", instr.args_text)
        return int(m.group(1)) if m else None

    def computation(self, name: str, once: bool = False) -> int:
        comp = self.comps[name]
        total = 0
        for instr in comp.instructions.values():
            nbytes = self.instruction(comp, instr, once)
            if nbytes and instr.opcode not in ("while", "conditional", "call", "async-start"):
                self.records.append((instr.name, instr.opcode, instr.type_text, nbytes * self._scale))
            total += nbytes
        return total

    def instruction(self, comp: Computation, instr: Instruction, once: bool) -> int:
        op = instr.opcode
        if op in _FREE:
            return 0
        if op == "while":
            trips = 1 if once else self.trip_count(comp, instr)
            self._scale *= trips or 1
            body = self.computation(instr.attr("body"), once=once)
            cond = self.computation(instr.attr("condition"), once=once)
            self._scale //= trips or 1
            if once:
                return body + cond
            if trips is None:
                self.unknown.append(instr.name)
                trips = 1
            self.loops.append((instr.name, trips, body + cond))
            return trips * body + (trips + 1) * cond
        if op == "conditional":
            names = re.findall(r"%?([\w.\-]+)", _branch_list(instr.attrs))
            return self.operand_bytes(comp, instr.operands[:1]) + max(
                (self.computation(n, once=once) for n in names), default=0
            )
        if op in ("call", "async-start") and instr.attr("to_apply" if op == "call" else "calls"):
            return self.computation(instr.attr("to_apply" if op == "call" else "calls"), once=once)
        if op in _SLICING:
            return 2 * instr.nbytes + self.operand_bytes(comp, instr.operands[1:])
        if op == "dynamic-update-slice":
            update = comp.instructions[instr.operands[1]].nbytes
            return 2 * update + self.operand_bytes(comp, instr.operands[2:])
        if op == "fusion":
            return self.fusion(comp, instr)
        return self.operand_bytes(comp, instr.operands) + instr.nbytes

    def operand_bytes(self, comp: Computation, names: list[str]) -> int:
        return sum(comp.instructions[n].nbytes for n in names if n in comp.instructions)

    def fusion(self, comp: Computation, instr: Instruction) -> int:
        fused = self.comps.get(instr.attr("calls") or "")
        if fused is None:
            return self.operand_bytes(comp, instr.operands) + instr.nbytes
        params = {}
        for p in fused.instructions.values():
            if p.opcode == "parameter":
                params[int(p.args_text)] = p
        root = fused.root
        outputs = [fused.instructions[o] for o in root.operands] if root.opcode == "tuple" else [root]
        in_place = {o.operands[0] for o in outputs if o.opcode == "dynamic-update-slice"}
        total = 0
        for k, name in enumerate(instr.operands):
            outer = comp.instructions.get(name)
            param = params.get(k)
            if outer is None:
                continue
            if param is None:
                total += outer.nbytes
                continue
            users = fused.users(param.name)
            if param.name in in_place and all(
                u.opcode == "dynamic-update-slice" and j == 0 for u, j in users
            ):
                continue  # the aliased buffer of an in-place update: only the update is touched
            if users and all(u.opcode in _SLICING and j == 0 for u, j in users):
                total += sum(u.nbytes for u, _ in users)
            else:
                total += outer.nbytes
        for out in outputs:
            if out.opcode == "dynamic-update-slice":
                total += fused.instructions[out.operands[1]].nbytes
            else:
                total += out.nbytes
        return total


def _branch_list(attrs: str) -> str:
    m = re.search(r"branch_computations=\{([^}]*)\}", attrs)
    if m:
        return m.group(1)
    names = [re.search(rf"{k}=%?([\w.\-]+)", attrs) for k in ("true_computation", "false_computation")]
    return ",".join(n.group(1) for n in names if n)


def bytes_accessed(hlo_text: str) -> Cost:
    """Bytes accessed by one run of the compiled program whose optimized HLO is ``hlo_text``."""
    comps = parse(hlo_text)
    entry = next(c.name for c in comps.values() if c.entry)
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
