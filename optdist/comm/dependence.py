"""Which collectives of a step depend on which of its inputs (can a collective overlap compute?).

A collective whose operands do not depend on this step's gradient can run while the gradient is
being computed (XLA's async collectives on GPU/TPU); one that does must wait for the backward pass.
:func:`collective_dependence` traces a function to its jaxpr and follows the data flow of every
value from the chosen arguments, through ``cond`` / ``switch`` branches (operand by operand),
``pjit`` / custom-derivative calls and, conservatively, loops (a loop carry is tainted if any input
is), to every collective primitive (``psum``, ``all_gather``, ``ppermute``, ``pmax``...).

The jaxpr is the program XLA compiles; compilation preserves data flow (it may drop or merge
collectives, never add an operand dependency), so a collective independent here is independent in
the compiled HLO too.
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
