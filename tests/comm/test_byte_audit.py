"""Byte audit: the counter against the collectives of the compiled program (issue 13, acceptance).

For every transform of the common suite (``tests/test_common.py``), one train step is compiled under
``shard_map`` with one worker per device (8 CPU devices); :mod:`optdist.comm.hlo` reads every
collective from the optimized HLO and prices it with the ring formulas; the result must equal the
counter's delta for that step on every worker, for two consecutive steps (a sync and a non-sync step of
an outer loop with ``sync_every=2``, a Shampoo refresh and a non-refresh step with
``precondition_every=2``).

Which branch of a ``conditional`` runs is learnt from the program: the step is compiled a second time
with every ``lax.cond`` / ``lax.switch`` branch tagged by a ``jax.debug.callback`` whose label is a
constant operand in the branch computation; that program's collectives must be the untagged step's,
branch by branch, and running it at the same states reports the branch each device took.
"""

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optdist
from optdist.comm import hlo
from tests.helpers import linear_problem
from tests.test_common import NAMES, full_tx, step_fn

WORKERS = 8
STEPS = 2
# Gated transforms: the two audited steps must include a step whose gate opens and one whose gate stays
# shut (the branch each device took is read from the tagged program).
GATED = {
    "local_sgd",
    "diloco",
    "streaming_diloco",
    "fedavg",
    "fedadam",
    "fedyogi",
    "scaffold",
    "local_adaptive",
    "delayed_nesterov",
    "shampoo",
    "shampoo[distributed roots]",
}


# -- tagging branches ------------------------------------------------------------------------------


class _BranchRecorder:
    """Patches ``jax.lax.cond`` / ``jax.lax.switch`` so each branch reports (label, index, device)."""

    def __init__(self):
        self.ran = set()
        self._labels = 0

    def _tag(self, fn, label, index):
        def tagged(*operands):
            try:
                device = jax.lax.axis_index("data")
            except NameError:  # traced outside the worker axis: report for every device
                device = jnp.int32(-1)
            jax.debug.callback(self._record, jnp.int32(label), jnp.int32(index), device)
            return fn(*operands)

        return tagged

    def _record(self, label, index, device):
        self.ran.add((int(label), int(index), int(device)))

    @contextlib.contextmanager
    def patched(self):
        cond, switch = jax.lax.cond, jax.lax.switch

        def tagged_cond(pred, true_fun, false_fun, *operands, **kwargs):
            self._labels += 1
            label = self._labels
            return cond(
                pred, self._tag(true_fun, label, 1), self._tag(false_fun, label, 0), *operands, **kwargs
            )

        def tagged_switch(index, branches, *operands, **kwargs):
            self._labels += 1
            label = self._labels
            branches = [self._tag(b, label, i) for i, b in enumerate(branches)]
            return switch(index, branches, *operands, **kwargs)

        jax.lax.cond, jax.lax.switch = tagged_cond, tagged_switch
        try:
            yield self
        finally:
            jax.lax.cond, jax.lax.switch = cond, switch

    def chooser(self, module):
        """``branch(conditional, device) -> index`` from the tags that ran (after a run)."""

        def branch(conditional, device):
            taken = []
            for index, name in enumerate(conditional.branches):
                tags = {t[:2] for t in module.callback_constants(name) if len(t) >= 2}
                if not tags:
                    raise AssertionError(f"branch {name} of {conditional.name} carries no tag")
                if any((label, k, d) in self.ran for label, k in tags for d in (device, -1)):
                    taken.append(index)
            assert len(taken) == 1, f"{conditional.name} on device {device}: branches {taken} ran"
            return taken[0]

        return branch


# -- compiling and running one entry -------------------------------------------------------------------


def _compile(name, params_w, state_w, batches, bad, mesh):
    step = step_fn(full_tx(name))
    return jax.jit(optdist.data_parallel(step, mesh, "data")).lower(params_w, state_w, batches, bad).compile()


@functools.cache
def _audit(name):
    """Compiles and runs ``name``'s step: (module, counter delta per step, branch chooser per step)."""
    mesh = jax.make_mesh((WORKERS,), ("data",))
    place = lambda t: jax.device_put(t, NamedSharding(mesh, P("data")))  # noqa: E731
    params, data = linear_problem(num_examples=4 * WORKERS)
    tx = full_tx(name)
    params_w, state_w = place(optdist.replicate((params, tx.init(params)), WORKERS))
    batches, bad = place(optdist.shard_batch(data, WORKERS)), place(jnp.zeros(WORKERS, bool))
    compiled = _compile(name, params_w, state_w, batches, bad, mesh)
    module = hlo.HloModule(compiled.as_text())
    states, deltas = [(params_w, state_w)], []
    for _ in range(STEPS):
        before = states[-1]
        states.append(compiled(*before, batches, bad))
        deltas.append(optdist.bytes_sent(states[-1][1]) - optdist.bytes_sent(before[1]))
    choosers = [None] * STEPS
    if module.conditionals():
        recorder = _BranchRecorder()
        jax.clear_caches()  # retrace library code so every cond is tagged
        with recorder.patched():
            tagged = _compile(name, params_w, state_w, batches, bad, mesh)
        tagged_module = hlo.HloModule(tagged.as_text())
        assert hlo.collective_signature(tagged_module) == hlo.collective_signature(module), (
            "tagging the branches changed the program's collectives"
        )
        choosers = []
        for t in range(STEPS):
            recorder.ran = set()
            out = tagged(*states[t], batches, bad)
            jax.effects_barrier()
            np.testing.assert_array_equal(optdist.bytes_sent(out[1]), optdist.bytes_sent(states[t + 1][1]))
            choosers.append(_frozen(recorder, tagged_module))
        module = tagged_module
    return module, deltas, choosers


def _frozen(recorder, module):
    """The chooser for one run: a snapshot of the tags that ran."""
    snapshot = _BranchRecorder()
    snapshot.ran = set(recorder.ran)
    return snapshot.chooser(module)


# -- the audit -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_counter_equals_bytes_of_compiled_collectives(name):
    module, deltas, choosers = _audit(name)
    for t in range(STEPS):
        compiled = [hlo.bytes_sent(module, d, choosers[t]) for d in range(WORKERS)]
        np.testing.assert_array_equal(
            deltas[t],
            compiled,
            err_msg=f"{name}, step {t}: counter delta vs bytes of the compiled collectives",
        )


@pytest.mark.parametrize("name", sorted(GATED))
def test_gated_steps_take_both_branches(name):
    """The audited steps include a step whose gate opens and one whose gate stays shut."""
    module, deltas, choosers = _audit(name)
    assert choosers[0] is not None, f"{name}: no conditional in the compiled step"
    patterns = {
        tuple(choosers[t](c, d) for c in module.conditionals() for d in range(WORKERS) if _tagged(module, c))
        for t in range(STEPS)
    }
    assert len(patterns) == STEPS, f"{name}: the {STEPS} steps took the same branches"


def _tagged(module, conditional):
    return all(module.callback_constants(b) for b in conditional.branches)
