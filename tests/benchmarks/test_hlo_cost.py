"""The HLO bytes-accessed count applies while-loop trip counts, and agrees with XLA where XLA is right."""

import re

import jax
import jax.numpy as jnp
import pytest
from jax import lax

from experiments.benchmarks import hlo_cost

N = 4096  # f32 elements: 16 KiB per full-size array


def _loop(trips):
    return lambda x: lax.fori_loop(0, trips, lambda i, x: jnp.sin(x) * 1.01 + x[::-1], x)


def _compiled(fn, *args):
    return jax.jit(fn).lower(*args).compile()


def test_shape_bytes():
    assert hlo_cost.shape_bytes("f32[8,4]{1,0}") == 128
    assert hlo_cost.shape_bytes("(s32[], f32[8,4]{1,0}, bf16[3]{0})") == 4 + 128 + 6
    assert hlo_cost.shape_bytes("pred[]") == 1
    assert hlo_cost.shape_bytes("f8e4m3fn[10]{0}") == 10
    with pytest.raises(ValueError, match="unknown HLO element type"):
        hlo_cost.shape_bytes("q7[3]")


def test_loop_free_program_matches_xla():
    compiled = _compiled(lambda x, y: jnp.sin(x) * y + x[::-1], jnp.ones(N), jnp.ones(N))
    cost = hlo_cost.bytes_accessed(compiled.as_text())
    assert cost.loops == [] and cost.total == cost.once
    assert cost.total == 3 * 4 * N  # one fusion: read x and y, write the result
    assert cost.total == pytest.approx(hlo_cost.xla_bytes_accessed(compiled), rel=0.01)


def test_fori_loop_of_10_counts_10_bodies():
    compiled = _compiled(_loop(10), jnp.ones(N))
    cost = hlo_cost.bytes_accessed(compiled.as_text())
    xla = hlo_cost.xla_bytes_accessed(compiled)
    [(_, trips, per_iteration)] = cost.loops
    assert trips == 10
    assert per_iteration >= 2 * 4 * N  # each iteration reads and writes the full array at least once
    # XLA counts the body once; so does our `once`, and both agree.
    assert cost.once == pytest.approx(xla, rel=0.01)
    # Trip count applied: the body (and condition) 10 times, the condition once more to exit.
    assert cost.total - cost.once == 9 * per_iteration + _condition_bytes(compiled)
    assert 10 <= cost.total / per_iteration < 11  # ~10x the body; the rest is the entry's copy of x
    assert cost.total / xla > 6


def _condition_bytes(compiled):
    comps = hlo_cost.parse(compiled.as_text())
    loop = next(i for c in comps.values() for i in c.instructions if i.opcode == "while")
    counter = hlo_cost._Counter(comps)
    return counter.computation(hlo_cost._attr(loop, "condition"))


def test_trip_count_scales_and_xla_does_not():
    c10, c20 = _compiled(_loop(10), jnp.ones(N)), _compiled(_loop(20), jnp.ones(N))
    a, b = hlo_cost.bytes_accessed(c10.as_text()), hlo_cost.bytes_accessed(c20.as_text())
    assert hlo_cost.xla_bytes_accessed(c10) == hlo_cost.xla_bytes_accessed(c20)  # the defect we correct
    per_iteration = a.loops[0][2]
    assert b.total - a.total == 10 * per_iteration
    assert b.total / a.total == pytest.approx(2.0, rel=0.1)


def test_trip_count_read_from_the_condition_without_backend_config():
    text = _compiled(_loop(10), jnp.ones(N)).as_text()
    stripped = re.sub(r',"known_trip_count":\{"n":"\d+"\}', "", text)
    assert stripped != text
    assert hlo_cost.bytes_accessed(stripped).total == hlo_cost.bytes_accessed(text).total
    assert hlo_cost.bytes_accessed(stripped).unknown_trip_counts == []


def test_unreadable_trip_count_is_reported_and_counted_as_one():
    def while_loop(x):
        return lax.while_loop(lambda c: jnp.sum(c[0]) < 100.0, lambda c: (c[0] * 2.0 + 1.0,), (x,))[0]

    compiled = _compiled(while_loop, jnp.ones(N))
    cost = hlo_cost.bytes_accessed(compiled.as_text())
    assert len(cost.unknown_trip_counts) == 1 and cost.loops[0][1] == 1
    assert cost.total == cost.once + _condition_bytes(compiled)  # one body, the condition twice


def test_scan_output_is_written_in_place():
    """A scan's stacked output is a dynamic-update-slice into one buffer: each step touches one row."""
    compiled = _compiled(
        lambda x: lax.scan(lambda c, _: (jnp.sin(c) * 1.01, c), x, None, length=10), jnp.ones(N)
    )
    cost = hlo_cost.bytes_accessed(compiled.as_text())
    [(_, trips, per_iteration)] = cost.loops
    assert trips == 10
    assert per_iteration < 10 * 4 * N  # far below one pass over the [10, N] output per step
    assert cost.once == pytest.approx(hlo_cost.xla_bytes_accessed(compiled), rel=0.01)


def test_no_entry_computation_is_an_error():
    with pytest.raises(ValueError, match="ENTRY"):
        hlo_cost.bytes_accessed("HloModule m\n")
