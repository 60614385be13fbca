"""The collectives of a compiled program, read from its optimized HLO text, and the bytes each worker sends.

The byte counter (:mod:`optdist.comm.accounting`) is computed while tracing, from what the Python code
asked for. This module reads what the compiler kept: the optimized HLO text of one compiled step,
``jax.jit(step).lower(*args).compile().as_text()``, lists every collective in it (all-reduce,
all-gather, collective-permute, reduce-scatter, all-to-all, their ``-start`` async forms and the
collectives wrapped in an ``async-start``) with each operand's shape and dtype, the size of its replica
group and, for a collective-permute, its ``source_target_pairs``. :func:`bytes_sent` then prices them with
the same ring formulas the counter uses (:func:`~optdist.comm.accounting.all_reduce_bytes` and the
others), each array operand on its own:

* all-reduce: ``2 (n - 1) ceil(E / n) s``;
* all-gather: ``(n - 1) E s`` with ``E`` the per-worker *input* (operand) element count;
* reduce-scatter: ``(n - 1) ceil(E / n) s`` of the input;
* collective-permute: ``E s`` if this device is a source of a pair whose target is another device;
* all-to-all: ``(n - 1) / n`` of the operands' bytes (rounded up).

``n`` is the size of the replica group holding the device (``replica_groups={{0,1,...}}``, the iota
form ``[G,n]<=[...]`` or ``{}`` for every device). The test ``tests/comm/test_byte_audit.py`` compares
the result with the counter's delta for two consecutive steps of every transform of the common suite.
Each collective also carries the Python stack that issued it (:meth:`HloModule.stack`, from the
module's stack-frame tables), so a caller can tell whose collective it is: the audit leaves out, by
that stack, the all-gather of the omniscient attacks in :mod:`optdist.robust.attacks`, which the
library documents as a simulation device that no counter records.

**Control flow.** A program runs its entry computation once. Collectives inside computations the
entry calls unconditionally (``call``, ``async-start``...) count once per call. A ``while`` body
counts ``known_trip_count`` times (from the loop's ``backend_config``); a loop with collectives and
no known trip count is refused. A ``conditional`` runs one branch, chosen at run time: the caller
says which one with ``branch(conditional, device) -> index`` (a conditional with no collectives in
any branch is never asked about). The audit test learns the index the way the program itself
decides it: it compiles the step a second time with every ``lax.cond`` / ``lax.switch`` branch
tagged by a ``jax.debug.callback`` whose label is a constant operand of the callback's custom call
(:meth:`HloModule.callback_constants` reads the labels back from a branch computation), runs it
at concrete step counts, and receives at run time the labels of the branches that ran on each
device. Before it trusts the tagged program it checks that its collectives are those of the
untagged step, branch by branch (:func:`collective_signature`); the bytes are then compared with the
counter delta of the untagged step for that concrete step (a sync and a non-sync step of an outer
loop, a Shampoo refresh and a non-refresh step).

**What XLA:CPU changes, and what is counted** (jax 0.10.2, checked on the compiled text):

* *bf16 collectives run in f32.* XLA:CPU's all-reduce promotion rewrites a bfloat16 all-reduce into
  ``convert`` to f32, an f32 all-reduce whose reducer is renamed ``*_promoted``, and a ``convert`` back
  to bfloat16 carrying the all-reduce's own ``op_name`` metadata; its float normalization does the
  same to a bfloat16 collective-permute, with converts that carry no metadata. float16 and integer
  collectives are left alone. The counter reports the 2-byte width that a GPU or TPU sends, so the
  audit maps the rewrite back: an f32 operand whose result is converted to a 16-bit float by a
  convert the compiler inserted (no ``op_name``, or the collective's own ``op_name`` and stack frame;
  directly or as an op on that operand inside a fusion) counts at that 16-bit width. A convert the
  program asked for carries its own ``op_name`` (``convert_element_type``), so a genuine f32
  collective stays f32. The producer side cannot tell: XLA:CPU computes all bf16 arithmetic in f32,
  so an f32 all-reduce of values derived from bf16 looks the same there, and the combiner merges
  promoted and genuine f32 operands into one all-reduce (``_promoted`` names the merged reducer).
* *The all-reduce combiner* merges small all-reduces into one tuple all-reduce of several operands.
  Counting per operand makes this irrelevant: the counter counts each buffer a
  :class:`~optdist.comm.Channel` sends (an array, or the per-dtype pack of small leaves), and each
  such buffer is one operand here.
* *CSE* may merge two identical all-reduces into one; then the program sends less than the code
  asked for and the counter over-counts. The audit reports it as a mismatch (it is a defect of the
  transform that issued the duplicate, not something to map away).
* A collective-permute pair whose source is its target sends nothing; a group of one sends nothing.

Example::

  compiled = jax.jit(step).lower(params, state, batch).compile()
  module = hlo.HloModule(compiled.as_text())
  for c in module.collectives():
      print(c.kind, c.operands, c.group_size())
  per_device = [hlo.bytes_sent(module, d) for d in range(8)]  # raises if a branch must be chosen
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from optdist.comm import accounting

__all__ = [
    "Collective",
    "Conditional",
    "HloModule",
    "bytes_sent",
    "collective_signature",
]

KINDS = ("all-reduce", "all-gather", "collective-permute", "reduce-scatter", "all-to-all")

_DTYPES = {
    "pred": np.bool_,
    "s8": np.int8,
    "s16": np.int16,
    "s32": np.int32,
    "s64": np.int64,
    "u8": np.uint8,
    "u16": np.uint16,
    "u32": np.uint32,
    "u64": np.uint64,
    "f16": np.float16,
    "bf16": jnp.bfloat16,
    "f32": np.float32,
    "f64": np.float64,
    "c64": np.complex64,
    "c128": np.complex128,
    "f8e4m3fn": jnp.float8_e4m3fn,
    "f8e5m2": jnp.float8_e5m2,
}
_HALF = ("bf16", "f16")

_ARRAY = re.compile(r"\b([a-z]\w*)\[([^\]]*)\]")
_INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s+\(.*\)\s*->\s*.*\{\s*$")
_CALLED = re.compile(r"\b(calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"\bbranch_computations=\{([^}]*)\}")
_NAME = re.compile(r"%([\w.\-]+)")
_ASYNC_TAILS = ("async-update", "async-done")


@dataclasses.dataclass(frozen=True)
class Instruction:
    """One HLO instruction: ``name = shape opcode(operands), attributes``."""

    name: str
    shape: str  # as printed, e.g. "f32[5,3]{1,0}" or a tuple "(f32[3]{0}, s8[8,16]{1,0})"
    opcode: str
    operands: tuple[str, ...]
    attributes: str
    computation: str
    literal: str = ""  # the text between the opcode's parentheses (``parameter(0)``, ``constant(7)``)
    root: bool = False  # printed ``ROOT``: the computation's result

    @property
    def arrays(self) -> list[tuple[str, tuple[int, ...]]]:
        """(dtype, dims) of each array in the result shape, tuples flattened."""
        return _arrays(self.shape)

    def attribute(self, key: str) -> str | None:
        """The raw text of ``key=...`` up to the next comma or space outside brackets, or None."""
        at = re.search(rf"(?:^|[\s,]){re.escape(key)}=", self.attributes)
        if not at:
            return None
        text, start = self.attributes, at.end()
        end = start
        while end < len(text) and text[end] not in ", ":
            end = _matching(text, end) + 1 if text[end] in '{[("' else end + 1
        return text[start:end]

    @property
    def op_name(self) -> str:
        meta = self.attribute("metadata") or ""
        found = re.search(r'op_name="([^"]*)"', meta)
        return found.group(1) if found else ""

    @property
    def stack_frame(self) -> int | None:
        meta = self.attribute("metadata") or ""
        found = re.search(r"stack_frame_id=(\d+)", meta)
        return int(found.group(1)) if found else None

    @property
    def branches(self) -> tuple[str, ...]:
        """A conditional's branches by index (a predicated one as ``(false, true)``: index = pred)."""
        block = _BRANCHES.search(self.attributes)
        if block:
            return tuple(_NAME.findall(block.group(1)))
        true, false = self.attribute("true_computation"), self.attribute("false_computation")
        return (false.lstrip("%"), true.lstrip("%")) if true and false else ()

    @property
    def called(self) -> list[str]:
        """Computations this instruction calls (branches and loop parts included)."""
        names = [m.group(2) for m in _CALLED.finditer(self.attributes)]
        for block in _BRANCHES.finditer(self.attributes):
            names += _NAME.findall(block.group(1))
        return names


@dataclasses.dataclass(frozen=True)
class Computation:
    name: str
    instructions: tuple[Instruction, ...]
    is_entry: bool

    def __post_init__(self):
        object.__setattr__(self, "_by_name", {i.name: i for i in self.instructions})

    def __getitem__(self, name: str) -> Instruction:
        return self._by_name[name]

    def get(self, name: str) -> Instruction | None:
        return self._by_name.get(name)

    @property
    def root(self) -> Instruction:
        return next(i for i in self.instructions if i.root)

    def users(self, name: str) -> list[Instruction]:
        return [i for i in self.instructions if name in i.operands]


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective of the compiled program, as one device runs it.

    Attributes:
      kind: one of ``KINDS`` (``-start`` forms reported under their base kind).
      name: the HLO instruction name.
      computation: the computation holding it.
      operands: one ``jax.ShapeDtypeStruct`` per array operand, in the dtype counted (a bf16 all-reduce
        that XLA:CPU promoted to f32 is reported as bf16; see the module docstring).
      hlo_dtypes: the operands' dtypes as the HLO has them.
      groups: the replica groups (device ids), one tuple per group.
      source_target_pairs: for a collective-permute, the ``(source, target)`` pairs.
      op_name: the jax op name from the metadata (e.g. ``".../cond/branch_1_fun/psum"``).
      stack: the Python stack that issued it, ``(file, line, function)`` innermost first
        (:meth:`HloModule.stack`).
    """

    kind: str
    name: str
    computation: str
    operands: tuple[jax.ShapeDtypeStruct, ...]
    hlo_dtypes: tuple[str, ...]
    groups: tuple[tuple[int, ...], ...]
    source_target_pairs: tuple[tuple[int, int], ...] = ()
    op_name: str = ""
    stack: tuple[tuple[str, int, str], ...] = dataclasses.field(default=(), compare=False)

    def group_size(self, device: int = 0) -> int:
        """Participants in the group holding ``device`` (0 if it is in none)."""
        for group in self.groups:
            if device in group:
                return len(group)
        return 0

    def bytes_sent(self, device: int = 0) -> int:
        """Bytes ``device`` sends in this collective (ring formulas, each operand on its own: an
        operand is one buffer on the wire, so the accounting functions get one array at a time)."""
        if self.kind == "collective-permute":
            sends = sum(1 for s, t in self.source_target_pairs if s == device and t != device)
            return sends * accounting.payload_bytes(list(self.operands))
        n = self.group_size(device)
        if n <= 1:
            return 0
        if self.kind == "all-to-all":
            return -(-(n - 1) * accounting.payload_bytes(list(self.operands)) // n)
        formula = {
            "all-reduce": accounting.all_reduce_bytes,
            "all-gather": accounting.all_gather_bytes,
            "reduce-scatter": accounting.reduce_scatter_bytes,
        }[self.kind]
        return sum(formula([operand], n) for operand in self.operands)

    def signature(self) -> tuple:
        """What the collective sends, without names: (kind, operands, groups, pairs)."""
        ops = tuple((tuple(o.shape), str(o.dtype)) for o in self.operands)
        return (self.kind, ops, self.groups, self.source_target_pairs)


@dataclasses.dataclass(frozen=True)
class Conditional:
    """A ``conditional`` instruction: ``branches[i]`` runs when its index operand is ``i``."""

    name: str
    computation: str
    branches: tuple[str, ...]
    op_name: str = ""


class HloModule:
    """A parsed optimized HLO module (the text of ``Compiled.as_text()``).

    Args:
      text: the HLO text of one module.
    """

    def __init__(self, text: str):
        if not isinstance(text, str) or "ENTRY" not in text:
            raise ValueError(
                "HloModule needs the optimized HLO text of a compiled program, e.g. "
                "jax.jit(f).lower(*args).compile().as_text(); got text without an ENTRY computation."
            )
        self.text = text
        header = text.split("\n", 1)[0]
        self.num_devices = max(_header_int(header, "num_partitions"), _header_int(header, "replica_count"))
        self.computations: dict[str, Computation] = {}
        self.entry = ""
        name, entry, body = None, False, []
        for raw in text.splitlines():
            line = re.sub(r"/\*.*?\*/", "", raw)
            if name is None:
                head = _HEADER.match(line)
                if head:
                    name, entry, body = head.group(2), bool(head.group(1)), []
                continue
            if line.strip() == "}":
                self.computations[name] = Computation(name, tuple(body), entry)
                if entry:
                    self.entry = name
                name = None
                continue
            parsed = _parse_instruction(line, name)
            if parsed is not None:
                body.append(parsed)
        if not self.entry:
            raise ValueError("HloModule: no ENTRY computation could be parsed from the text.")
        self._frames = _frame_tables(text)
        self._holds: dict[str, bool] = {}

    def stack(self, frame_id: int | None) -> tuple[tuple[str, int, str], ...]:
        """The Python stack ``(file, line, function)`` of a ``stack_frame_id``, innermost first.

        Read from the module's ``FileNames`` / ``FunctionNames`` / ``FileLocations`` / ``StackFrames``
        tables. The text prints each frame's ``parent_frame_id`` one above the number the parent is
        printed under (0 = no parent): frame 92 printed with ``parent_frame_id=92`` is called from
        frame 91 (checked on jax 0.10.2 against the known call chain of a ``Channel`` collective).
        """
        files, functions, locations, frames = self._frames
        out, seen = [], set()
        while frame_id and frame_id in frames and frame_id not in seen:
            seen.add(frame_id)
            location, parent = frames[frame_id]
            file_id, function_id, line = locations[location]
            out.append((files.get(file_id, ""), line, functions.get(function_id, "")))
            frame_id = parent - 1
        return tuple(out)

    # -- reading ---------------------------------------------------------------------------------

    def collectives(self, computation: str | None = None) -> list[Collective]:
        """Every collective in ``computation`` (only its own instructions), or in the whole module."""
        names = [computation] if computation is not None else list(self.computations)
        return [
            self._collective(inst)
            for name in names
            for inst in self.computations[name].instructions
            if _kind(inst) is not None
        ]

    def conditionals(self, computation: str | None = None) -> list[Conditional]:
        """The ``conditional`` instructions of ``computation`` (or of the whole module)."""
        names = [computation] if computation is not None else list(self.computations)
        return [
            Conditional(inst.name, name, inst.branches, inst.op_name)
            for name in names
            for inst in self.computations[name].instructions
            if inst.opcode == "conditional"
        ]

    def callback_constants(self, computation: str, target: str = "callback") -> list[tuple[int, ...]]:
        """Integer constants passed to each host-callback custom call run by ``computation``.

        Looks in ``computation`` and the computations it calls unconditionally (not in nested
        branches or loop bodies). A ``jax.debug.callback(fn, jnp.int32(a), jnp.int32(b))`` inside a
        branch shows up as ``(a, b)``: a label a caller can put in a branch to recognise it here.
        """
        found = []
        comp = self.computations[computation]
        for inst in comp.instructions:
            if inst.opcode == "custom-call" and target in (inst.attribute("custom_call_target") or ""):
                values = [_constant(comp, o) for o in inst.operands]
                found.append(tuple(v for v in values if v is not None))
            elif inst.opcode not in ("conditional", "while"):
                for callee in inst.called:
                    found += self.callback_constants(callee, target)
        return found

    def _collective(self, inst: Instruction) -> Collective:
        comp = self.computations[inst.computation]
        kind = _kind(inst)
        arrays = []
        for name in inst.operands:
            arrays += comp[name].arrays
        if kind == "collective-permute" and inst.attribute("slice_sizes") is not None:
            raise NotImplementedError(
                f"{inst.name}: in-place collective-permute (slice_sizes) is not supported."
            )
        dtypes = [d for d, _ in arrays]
        if inst.opcode == kind:  # XLA:CPU's bf16 -> f32 rewrites (not the async forms, other backends)
            dtypes = [self._promoted_from(inst, i, d) if d == "f32" else d for i, d in enumerate(dtypes)]
        operands = tuple(jax.ShapeDtypeStruct(dims, _DTYPES[d]) for d, (_, dims) in zip(dtypes, arrays))
        pairs = inst.attribute("source_target_pairs")
        return Collective(
            kind=kind,
            name=inst.name,
            computation=inst.computation,
            operands=operands,
            hlo_dtypes=tuple(d for d, _ in arrays),
            groups=_groups(inst.attribute("replica_groups"), self.num_devices)
            if kind != "collective-permute"
            else (),
            source_target_pairs=tuple(tuple(p) for p in _int_lists(pairs)) if pairs else (),
            op_name=inst.op_name,
            stack=self.stack(inst.stack_frame),
        )

    def _promoted_from(self, inst: Instruction, index: int, dtype: str) -> str:
        """The 16-bit float type operand ``index`` had before XLA:CPU ran it in f32, else ``dtype``."""
        comp = self.computations[inst.computation]
        if inst.shape.startswith("("):
            results = [
                u
                for u in comp.users(inst.name)
                if u.opcode == "get-tuple-element" and _tuple_index(u) == index
            ]
        else:
            results = [inst]
        found = set()
        for result in results:
            for user in comp.users(result.name):
                found |= self._converts_to_half(user, result)
        if len(found) > 1:
            raise ValueError(
                f"{inst.name} operand {index}: converted back to several widths {sorted(found)}."
            )
        return found.pop() if found else dtype

    def _converts_to_half(self, user: Instruction, result: Instruction) -> set[str]:
        """16-bit types ``user`` converts ``result`` to, by a convert the compiler inserted: one with
        the collective's own metadata (all-reduce promotion) or none (float normalization); a convert
        the program asked for carries its own ``op_name`` (``convert_element_type``)."""

        def inserted(convert: Instruction) -> bool:
            own = convert.op_name == result.op_name and convert.stack_frame == result.stack_frame
            return own or not convert.op_name

        if user.opcode == "convert" and user.arrays[0][0] in _HALF and inserted(user):
            return {user.arrays[0][0]}
        if user.opcode != "fusion":
            return set()
        fused = self.computations[user.called[0]]
        found = set()
        for position, operand in enumerate(user.operands):
            if operand != result.name:
                continue
            params = [
                i for i in fused.instructions if i.opcode == "parameter" and _param_number(i) == position
            ]
            for param in params:
                for inner in fused.users(param.name):
                    if inner.opcode == "convert" and inner.arrays[0][0] in _HALF and inserted(inner):
                        found.add(inner.arrays[0][0])
        return found

    # -- control flow ----------------------------------------------------------------------------

    def runs(
        self,
        device: int = 0,
        branch: Callable[[Conditional, int], int] | None = None,
        computation: str | None = None,
    ) -> Iterator[tuple[Collective, int]]:
        """``(collective, times)`` for every collective ``device`` runs in one execution.

        Args:
          device: the device (partition) id.
          branch: ``branch(conditional, device) -> index`` for each conditional one of whose branches
            holds a collective; required only where there is one.
          computation: where to start (the entry computation by default).
        """
        name = computation or self.entry
        for inst in self.computations[name].instructions:
            if _kind(inst) is not None:
                yield self._collective(inst), 1
            elif inst.opcode == "conditional":
                cond = Conditional(inst.name, name, inst.branches, inst.op_name)
                if not any(self.holds_collectives(b) for b in cond.branches):
                    continue
                if branch is None:
                    raise ValueError(
                        f"conditional {cond.name} ({cond.op_name}) has collectives in a branch: pass "
                        "branch(conditional, device) -> index to say which branch runs."
                    )
                index = int(branch(cond, device))
                if not 0 <= index < len(cond.branches):
                    raise ValueError(f"branch index {index} out of range for {cond.name}.")
                yield from self.runs(device, branch, cond.branches[index])
            elif inst.opcode == "while":
                body, test = inst.attribute("body").lstrip("%"), inst.attribute("condition").lstrip("%")
                if not (self.holds_collectives(body) or self.holds_collectives(test)):
                    continue
                trips = _trip_count(inst)
                if trips is None:
                    raise ValueError(f"while loop {inst.name} has collectives but no known_trip_count.")
                for part, times in ((body, trips), (test, trips + 1)):
                    for coll, k in self.runs(device, branch, part):
                        yield coll, k * times
            elif inst.opcode not in _ASYNC_TAILS:  # an async op's computation runs once, at its start
                for callee in inst.called:
                    yield from self.runs(device, branch, callee)

    def holds_collectives(self, name: str) -> bool:
        """Whether computation ``name`` or anything it calls holds a collective."""
        if name not in self._holds:
            comp = self.computations[name]
            self._holds[name] = any(
                _kind(i) is not None or any(self.holds_collectives(c) for c in i.called)
                for i in comp.instructions
            )
        return self._holds[name]


def bytes_sent(
    module: HloModule | str,
    device: int = 0,
    branch: Callable[[Conditional, int], int] | None = None,
    where: Callable[[Collective], bool] | None = None,
) -> int:
    """Bytes ``device`` sends in one execution of the compiled program (see the module docstring).

    Args:
      module: an :class:`HloModule` or the optimized HLO text.
      device: the device (partition) id.
      branch: ``branch(conditional, device) -> index``: the branch each conditional with collectives
        takes on ``device`` in this execution.
      where: counts only the collectives for which ``where(collective)`` holds (all by default).

    Returns:
      The byte count (int).
    """
    module = module if isinstance(module, HloModule) else HloModule(module)
    runs = module.runs(device, branch)
    return sum(c.bytes_sent(device) * times for c, times in runs if where is None or where(c))


def collective_signature(module: HloModule, computation: str | None = None) -> tuple:
    """A name-free description of where each collective sits: to compare two compilations of a step.

    The collectives of ``computation`` (the entry by default) and of what it calls unconditionally,
    sorted; then, per conditional holding collectives, the signatures of its branches in order; per
    while loop holding collectives, its trip count and the signature of its body.
    """
    name = computation or module.entry
    flat, nested = [], []
    for inst in module.computations[name].instructions:
        if _kind(inst) is not None:
            flat.append(module._collective(inst).signature())
        elif inst.opcode == "conditional":
            if any(module.holds_collectives(b) for b in inst.branches):
                nested.append(("conditional", tuple(collective_signature(module, b) for b in inst.branches)))
        elif inst.opcode == "while":
            body = inst.attribute("body").lstrip("%")
            if module.holds_collectives(body):
                nested.append(("while", _trip_count(inst), collective_signature(module, body)))
        elif inst.opcode not in _ASYNC_TAILS:
            for callee in inst.called:
                sub_flat, sub_nested = collective_signature(module, callee)
                flat += sub_flat
                nested += sub_nested
    return tuple(sorted(flat, key=repr)), tuple(sorted(nested, key=repr))


# -- text helpers ------------------------------------------------------------------------------------


def _matching(text: str, start: int) -> int:
    """Index of the bracket closing the one at ``text[start]`` (quotes respected)."""
    pairs = {"(": ")", "{": "}", "[": "]", '"': '"'}
    stack, i = [pairs[text[start]]], start + 1
    while i < len(text):
        ch = text[i]
        if stack[-1] == '"':
            if ch == "\\":
                i += 1
            elif ch == '"':
                stack.pop()
        elif ch == stack[-1]:
            stack.pop()
        elif ch in pairs:
            stack.append(pairs[ch])
        if not stack:
            return i
        i += 1
    raise ValueError(f"unbalanced brackets in HLO text: {text[start : start + 80]!r}")


def _parse_instruction(line: str, computation: str) -> Instruction | None:
    found = _INSTRUCTION.match(line)
    if not found:
        return None
    root, name, rest = bool(found.group(1)), found.group(2), found.group(3).strip()
    if rest.startswith("("):
        end = _matching(rest, 0)
        shape, rest = rest[: end + 1], rest[end + 1 :].strip()
    else:
        shape, _, rest = rest.partition(" ")
    opcode = re.match(r"[\w\-]+", rest)
    if not opcode:
        return None
    open_at = opcode.end()
    if open_at >= len(rest) or rest[open_at] != "(":
        return None
    close = _matching(rest, open_at)
    operands = tuple(_NAME.findall(rest[open_at + 1 : close]))
    attributes = rest[close + 1 :].lstrip(", ")
    literal = rest[open_at + 1 : close].strip()
    return Instruction(name, shape, opcode.group(0), operands, attributes, computation, literal, root)


def _arrays(shape: str) -> list[tuple[str, tuple[int, ...]]]:
    out = []
    for dtype, dims in _ARRAY.findall(shape):
        if dtype not in _DTYPES:
            continue  # token[] and the like carry no data
        out.append((dtype, tuple(int(d.replace("<=", "")) for d in dims.split(",") if d.strip())))
    return out


def _kind(inst: Instruction) -> str | None:
    for kind in KINDS:
        if inst.opcode in (kind, kind + "-start"):
            return kind
    return None


def _int_lists(text: str) -> list[list[int]]:
    """``{{0,1},{2,3}}`` -> ``[[0, 1], [2, 3]]``."""
    return [[int(x) for x in group.split(",") if x.strip()] for group in re.findall(r"\{([\d,\s]*)\}", text)]


def _groups(text: str | None, num_devices: int) -> tuple[tuple[int, ...], ...]:
    """Replica groups from ``{{...},...}``, the iota form ``[G,n]<=[d...]T(perm)`` or ``{}`` (all)."""
    if text is None or text.strip() in ("{}", "{{}}"):
        return (tuple(range(num_devices)),)
    iota = re.match(r"\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", text)
    if iota:
        shape = [int(x) for x in iota.group(1).split(",")]
        dims = [int(x) for x in iota.group(2).split(",")]
        ids = np.arange(math.prod(dims)).reshape(dims)
        if iota.group(3):
            ids = ids.transpose([int(x) for x in iota.group(3).split(",")])
        ids = ids.reshape(shape[0], -1)
        return tuple(tuple(int(x) for x in row) for row in ids)
    groups = _int_lists(text)
    if not groups:
        raise ValueError(f"cannot read replica_groups={text!r}.")
    return tuple(tuple(g) for g in groups)


def _header_int(header: str, key: str) -> int:
    found = re.search(rf"\b{key}=(\d+)", header)
    return int(found.group(1)) if found else 1


def _trip_count(inst: Instruction) -> int | None:
    config = inst.attribute("backend_config")
    if not config:
        return None
    try:
        n = json.loads(config).get("known_trip_count", {}).get("n")
    except (ValueError, AttributeError):
        return None
    return int(n) if n is not None else None


def _tuple_index(inst: Instruction) -> int:
    return int(inst.attribute("index"))


def _param_number(inst: Instruction) -> int:
    return int(inst.literal)


def _constant(comp: Computation, name: str) -> int | None:
    """The value of an integer scalar ``constant(...)`` (through copies and bitcasts), else None."""
    inst = comp[name]
    while inst.opcode in ("copy", "bitcast") and len(inst.operands) == 1:
        inst = comp[inst.operands[0]]
    if inst.opcode != "constant" or not inst.arrays or inst.arrays[0][1]:
        return None
    if not re.fullmatch(r"-?\d+", inst.literal):
        return None
    return int(inst.literal)


def _frame_tables(text: str):
    """The stack-frame tables at the top of the module text: files, functions, locations, frames."""
    tables = {"FileNames": {}, "FunctionNames": {}, "FileLocations": {}, "StackFrames": {}}
    current = None
    for line in text.splitlines():
        if line in tables:
            current = tables[line]
            continue
        if current is None:
            continue
        found = re.match(r"^(\d+) (.*)$", line)
        if not found:
            if line.startswith(("%", "ENTRY")):
                break
            current = None
            continue
        current[int(found.group(1))] = found.group(2)
    files = {k: v.strip('"') for k, v in tables["FileNames"].items()}
    functions = {k: v.strip('"') for k, v in tables["FunctionNames"].items()}
    field = lambda v, key: int(re.search(rf"\b{key}=(\d+)", v).group(1))  # noqa: E731
    locations = {
        k: (field(v, "file_name_id"), field(v, "function_name_id"), field(v, "line"))
        for k, v in tables["FileLocations"].items()
    }
    frames = {
        k: (field(v, "file_location_id"), field(v, "parent_frame_id"))
        for k, v in tables["StackFrames"].items()
    }
    return files, functions, locations, frames
