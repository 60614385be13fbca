"""Which collectives of a step depend on which of its inputs (can a collective overlap compute?).

A collective whose operands do not depend on this step's gradient can run while the gradient is
being computed (XLA's async collectives on GPU/TPU); one that does must wait for the backward pass.
:func:`collective_dependence` traces a function to its jaxpr and follows the data flow of every
value from the chosen arguments, through ``cond`` / ``switch`` branches (operand by operand),
``pjit`` / custom-derivative calls and, conservatively, loops (a loop carry is tainted if any input
is), to every collective primitive (``psum``, ``all_gather``, ``ppermute``, ``pmax``...).

The jaxpr is what the program asks for, not what XLA compiles: XLA's passes may merge collectives,
and a merged one depends on the union of its parts' operands (on XLA:CPU the all-reduce combiner
merges ``psum(2 g)`` and an independent ``psum(s + 1)`` into one all-reduce that waits for ``g``).
:func:`compiled_collective_dependence` answers the same question on the optimized HLO; use it
to verify that a collective can overlap, and the jaxpr form to see what the code asked for.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.extend import core

_COLLECTIVES = (
    "psum",
    "pmax",
    "pmin",
    "all_gather",
    "ppermute",
    "all_to_all",
    "reduce_scatter",
    "psum_scatter",
)


def _is_collective(eqn) -> bool:
    name = eqn.primitive.name
    return any(name == c or name.startswith(c + "_") or name == c + "2" for c in _COLLECTIVES)


def _subjaxprs(eqn) -> list[tuple[Any, bool]]:
    """(jaxpr, operand-precise) pairs nested in ``eqn``: branches and calls map operands to invars."""
    out = []
    for key, value in eqn.params.items():
        values = value if isinstance(value, (tuple, list)) else [value]
        for v in values:
            jaxpr = getattr(v, "jaxpr", v)
            if isinstance(jaxpr, core.Jaxpr):
                out.append((jaxpr, key in ("branches", "jaxpr", "call_jaxpr", "fun_jaxpr")))
    return out


def _walk(jaxpr, tainted_in: Sequence[bool], found: list[tuple[str, bool]]) -> list[bool]:
    taint = {}
    for v, t in zip(jaxpr.invars, tainted_in):
        taint[v] = t

    def is_tainted(atom):
        return not isinstance(atom, core.Literal) and taint.get(atom, False)

    for eqn in jaxpr.eqns:
        ins = [is_tainted(a) for a in eqn.invars]
        if _is_collective(eqn):
            found.append((eqn.primitive.name, any(ins)))
        subs = _subjaxprs(eqn)
        if eqn.primitive.name == "cond":  # operand 0 is the branch index: a control dependence
            outs = [ins[0]] * len(eqn.outvars)
            for sub, _ in subs:
                outs = [o or b for o, b in zip(outs, _walk(sub, ins[1:], found))]
        else:
            outs = [any(ins)] * len(eqn.outvars)
            for sub, precise in subs:
                if precise and len(sub.invars) == len(ins) and len(sub.outvars) == len(outs):
                    outs = _walk(sub, ins, found)
                else:  # loops and anything else: every input reaches every output
                    _walk(sub, [any(ins)] * len(sub.invars), found)
        for v, t in zip(eqn.outvars, outs):
            taint[v] = t
    return [is_tainted(v) for v in jaxpr.outvars]


def collective_dependence(
    fn: Callable[..., Any], args: Sequence[Any], argnums: Sequence[int]
) -> list[tuple[str, bool]]:
    """Every collective of ``fn(*args)`` as ``(primitive name, depends on args[argnums])``.

    Args:
      fn: the step (traced with ``jax.make_jaxpr``; collectives need their axes bound, e.g. wrap it in
        :func:`optdist.simulate` or ``shard_map``).
      args: example arguments (arrays or ``jax.ShapeDtypeStruct``).
      argnums: which arguments to follow (e.g. the gradient).

    Returns:
      One ``(name, depends)`` pair per collective equation, in program order (branches included).
    """
    closed = jax.make_jaxpr(fn)(*args)
    flags = []
    for i, a in enumerate(args):
        flags += [i in argnums] * len(jax.tree_util.tree_leaves(a))
    found: list[tuple[str, bool]] = []
    _walk(closed.jaxpr, flags, found)
    return found


# --------------------------------------------------------------------------- #
# The same question on the compiled program


def compiled_collective_dependence(hlo_text: str, inputs: Sequence[int]) -> list[tuple[str, str, bool]]:
    """Every collective of an optimized HLO module as ``(computation, op_name, depends)``.

    ``depends``: whether any operand of the collective data-depends on the entry parameters
    ``inputs`` (their HLO numbers: compile with ``jax.jit(..., keep_unused=True)`` so that they are
    the flattened argument positions). This checks what the compiler produced, after its passes:
    an all-reduce combiner that merges an independent all-reduce with a dependent one makes the
    merged collective dependent, which the jaxpr-level :func:`collective_dependence` cannot see.

    Data flow is followed through fusions and calls (into the called computation, operand by
    operand), tuples element by element (``tuple`` / ``get-tuple-element``), ``conditional``
    branches (each branch's parameter from its own operand; the branch index is a control
    dependence, not followed) and ``while`` loops (the carry to a fixed point). Any other
    instruction's result depends on all of its operands.

    Args:
      hlo_text: ``jax.jit(f, keep_unused=True).lower(*args).compile().as_text()``.
      inputs: entry parameter numbers to follow (e.g. the gradient leaves).

    Returns:
      One entry per collective instruction (``-start`` forms included), in module order.
    """
    from optdist.comm import hlo

    module = hlo.HloModule(hlo_text)
    found: dict[tuple[str, str], bool] = {}
    done: dict[tuple[str, tuple], Any] = {}

    def merge(a, b):
        if isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b):
            return tuple(merge(x, y) for x, y in zip(a, b))
        return anything(a) or anything(b)

    def anything(t):
        return any(anything(x) for x in t) if isinstance(t, tuple) else bool(t)

    def run(name: str, params: tuple):
        key = (name, params)
        if key not in done:
            done[key] = False  # a recursive call (none in HLO) would see "independent"
            done[key] = evaluate(module.computations[name], params)
        return done[key]

    def evaluate(comp, params: tuple):
        taint: dict[str, Any] = {}
        root = None
        for inst in comp.instructions:
            ops = [taint.get(o, False) for o in inst.operands]
            taint[inst.name] = root = step(inst, ops, params)
            if hlo._kind(inst) is not None:
                where = (comp.name, inst.name)
                found[where] = found.get(where, False) or any(anything(t) for t in ops)
        return root

    def step(inst, ops, params):
        code = inst.opcode
        if code == "parameter":
            index = int(inst.literal)
            return params[index] if index < len(params) else False
        if code == "tuple":
            return tuple(ops)
        if code == "get-tuple-element":
            index = int(inst.attribute("index"))
            return ops[0][index] if isinstance(ops[0], tuple) and index < len(ops[0]) else anything(ops[0])
        if code == "conditional":
            out = None
            for b, branch in enumerate(inst.branches):
                # indexed: operand b + 1 feeds branch b; predicated (false, true): operands 2, 1
                arg = ops[b + 1] if inst.attribute("branch_computations") else ops[2 - b]
                result = run(branch, (arg,))
                out = result if out is None else merge(out, result)
            return out
        if code == "while":
            body, cond = inst.attribute("body").lstrip("%"), inst.attribute("condition").lstrip("%")
            carry = ops[0]
            for _ in range(64):
                new = merge(carry, run(body, (carry,)))
                if new == carry:
                    break
                carry = new
            run(cond, (carry,))
            return carry
        called = inst.attribute("calls") or inst.attribute("to_apply")
        if code in ("fusion", "call", "async-start") and called:
            return run(called.lstrip("%"), tuple(ops))
        return any(anything(t) for t in ops)

    run(module.entry, tuple(i in set(inputs) for i in range(_num_parameters(module))))
    return [
        (comp, module.computations[comp][name].op_name, depends) for (comp, name), depends in found.items()
    ]


def _num_parameters(module) -> int:
    entry = module.computations[module.entry]
    return sum(1 for inst in entry.instructions if inst.opcode == "parameter")
