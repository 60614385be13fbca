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
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optdist
from optdist.comm import hlo
from optdist.preconditioning.shampoo import ShampooState
from tests.helpers import linear_problem
from tests.test_common import NAMES, full_tx, step_fn

WORKERS = 8
STEPS = 2
# Gated transforms: the two audited steps must include a step whose gate opens and one whose gate stays
# shut (the branch each device took is read from the tagged program).
GATED = {
    "masha1",  # the full refresh all-reduce runs only on refresh calls
    "masha2",
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
    "outer_loop[schedule_free]",
}
SHAMPOO = {"shampoo", "shampoo[distributed roots]"}


def _simulation_only(collective):
    """The omniscient attacks' all-gather (``optdist/robust/attacks.py``): a simulation device that the
    library documents as not part of the measured protocol, so no counter records it."""
    return any(file.endswith("optdist/robust/attacks.py") for file, _, _ in collective.stack)


def _protocol(collective):
    return not _simulation_only(collective)


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


# Entries whose factory takes the worker count (the registry's is 4; the audit runs 8, one per device).
SIZED_FOR_WORKERS = {
    "dynamic_backup_mean": lambda ax: optdist.stragglers.dynamic_backup_mean_gradients(
        ax, WORKERS, optdist.stragglers.clock.shifted_exponential(1.0, 0.5), 0.1, initial_backup=1
    ),
}


def _tx(name):
    if name in SIZED_FOR_WORKERS:
        return optax.chain(SIZED_FOR_WORKERS[name]("data"), optax.sgd(0.1))
    return full_tx(name)


def _compile(name, params_w, state_w, batches, bad, mesh):
    step = step_fn(_tx(name))
    return jax.jit(optdist.data_parallel(step, mesh, "data")).lower(params_w, state_w, batches, bad).compile()


@functools.cache
def _audit(name, dtype=jnp.float32):
    """Compiles and runs ``name``'s step: (module, per-step counter deltas, branch choosers, states)."""
    mesh = jax.make_mesh((WORKERS,), ("data",))
    place = lambda t: jax.device_put(t, NamedSharding(mesh, P("data")))  # noqa: E731
    params, data = linear_problem(num_examples=4 * WORKERS)
    params, data = jax.tree_util.tree_map(lambda x: x.astype(dtype), (params, data))
    tx = _tx(name)
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
    if any(module.holds_collectives(b) for c in module.conditionals() for b in c.branches):
        recorder = _BranchRecorder()
        with recorder.patched():
            tagged = _compile(name, params_w, state_w, batches, bad, mesh)
        tagged_module = hlo.HloModule(tagged.as_text())
        if not _all_gates_tagged(tagged_module):  # a cond traced before, inside a cached jit: retrace
            jax.clear_caches()
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
    return module, deltas, choosers, states


def _all_gates_tagged(module):
    return all(
        module.callback_constants(b)
        for c in module.conditionals()
        if any(module.holds_collectives(b) for b in c.branches)
        for b in c.branches
    )


def _frozen(recorder, module):
    """The chooser for one run: a snapshot of the tags that ran."""
    snapshot = _BranchRecorder()
    snapshot.ran = set(recorder.ran)
    return snapshot.chooser(module)


# -- the audit -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_counter_equals_bytes_of_compiled_collectives(name):
    module, deltas, choosers, _ = _audit(name)
    for t in range(STEPS):
        compiled = [hlo.bytes_sent(module, d, choosers[t], where=_protocol) for d in range(WORKERS)]
        np.testing.assert_array_equal(
            deltas[t],
            compiled,
            err_msg=f"{name}, step {t}: counter delta vs bytes of the compiled collectives",
        )


@pytest.mark.parametrize("name", sorted(GATED - SHAMPOO))
def test_gated_steps_take_both_branches(name):
    """The audited steps include a step whose gate opens and one whose gate stays shut."""
    module, deltas, choosers, _ = _audit(name)
    assert choosers[0] is not None, f"{name}: no conditional with a collective in the compiled step"
    gates = [c for c in module.conditionals() if any(module.holds_collectives(b) for b in c.branches)]
    patterns = {tuple(choosers[t](c, d) for c in gates for d in range(WORKERS)) for t in range(STEPS)}
    assert len(patterns) == STEPS, f"{name}: the {STEPS} steps took the same branches"
    assert len(set(map(tuple, deltas))) == STEPS, f"{name}: both steps sent the same"


def test_every_gate_with_collectives_is_audited_on_both_sides():
    """A transform added to the common suite whose step has a branch with collectives must join GATED
    (so a step with the gate open and one with it shut are both audited)."""
    with_gates = {
        name
        for name in NAMES
        if any(
            _audit(name)[0].holds_collectives(b) for c in _audit(name)[0].conditionals() for b in c.branches
        )
    }
    assert with_gates == GATED - SHAMPOO


@pytest.mark.parametrize("name", sorted(SHAMPOO))
def test_shampoo_refresh_and_plain_steps(name):
    """Of the two steps one refreshes the roots (precondition_every=2; the default
    start_preconditioning_step=1 makes it step 1) and one does not; Shampoo's gates hold no collective
    (documented), so both steps send the same, every step's all-gather included."""
    module, deltas, _, states = _audit(name)
    gates = module.conditionals()
    assert gates and not any(module.holds_collectives(b) for c in gates for b in c.branches)
    np.testing.assert_array_equal(deltas[0], deltas[1])
    roots = [_shampoo_state(s[1]).preconditioners for s in states]
    changed = [
        any(
            not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(roots[t]), jax.tree.leaves(roots[t + 1]))
        )
        for t in range(STEPS)
    ]
    assert changed == [False, True], changed


def _shampoo_state(state):
    found = [
        s
        for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, ShampooState))
        if isinstance(s, ShampooState)
    ]
    assert len(found) == 1
    return found[0]


def test_only_the_omniscient_attack_gather_goes_uncounted():
    """The one collective the audit leaves out is the attack's all-gather of the flat gradient."""
    module, *_ = _audit("byzantine[alie]+median")
    left_out = [c for c in module.collectives() if _simulation_only(c)]
    assert [(c.kind, [o.shape for o in c.operands]) for c in left_out] == [("all-gather", [(1, 18)])]
    assert left_out[0].bytes_sent(0) == 7 * 18 * 4
    for name in NAMES:
        if name != "byzantine[alie]+median":
            assert not any(_simulation_only(c) for c in _audit(name)[0].collectives()), name


# bfloat16 parameters: XLA:CPU runs bf16 all-reduces (promotion) and collective-permutes (float
# normalization) in f32; the counter reports the 2-byte width a GPU/TPU sends, and the audit maps the
# rewrite back. One transform per path: a plain all-reduce, one inside a branch, a collective-permute.
BF16 = ["mean_gradients", "diloco", "gossip[ring]"]


@pytest.mark.parametrize("name", BF16)
def test_counter_equals_compiled_collectives_with_bfloat16_parameters(name):
    module, deltas, choosers, _ = _audit(name, jnp.bfloat16)
    for t in range(STEPS):
        compiled = [hlo.bytes_sent(module, d, choosers[t], where=_protocol) for d in range(WORKERS)]
        np.testing.assert_array_equal(deltas[t], compiled, err_msg=f"{name} (bf16), step {t}")


def test_bfloat16_all_reduce_promotion_is_mapped_back():
    module, *_ = _audit("mean_gradients", jnp.bfloat16)
    (psum,) = module.collectives()
    assert set(psum.hlo_dtypes) == {"f32"}  # promoted by XLA:CPU
    assert {str(o.dtype) for o in psum.operands} == {"bfloat16"}  # counted as a GPU/TPU sends it
    sizes = [math.prod(o.shape) for o in psum.operands]
    assert sum(sizes) == 18  # the gradient: w [5, 3] and b [3]
    assert psum.bytes_sent(0) == sum(2 * 7 * -(-e // 8) * 2 for e in sizes)


def test_bfloat16_collective_permute_normalization_is_mapped_back():
    module, *_ = _audit("gossip[ring]", jnp.bfloat16)
    permutes = module.collectives()
    assert [c.kind for c in permutes] == ["collective-permute"] * 2  # one per ring neighbour
    for c in permutes:
        assert c.hlo_dtypes == ("f32",)  # XLA:CPU float normalization
        assert [(o.shape, str(o.dtype)) for o in c.operands] == [((18,), "bfloat16")]
        assert c.bytes_sent(0) == 18 * 2


# -- the parser on hand-built programs (numbers from the formulas, by hand) ----------------------------


def _hand_compiled(fn, *shapes, mesh_shape=(WORKERS,), names=("d",), spec=None):
    spec = P("d") if spec is None else spec
    mesh = jax.make_mesh(mesh_shape, names)
    args = [jax.device_put(jnp.ones(s, t), NamedSharding(mesh, spec)) for s, t in shapes]
    mapped = jax.shard_map(fn, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False)
    return hlo.HloModule(jax.jit(mapped).lower(*args).compile().as_text())


def test_combined_all_reduce_maps_only_promoted_operands():
    """The combiner merges a promoted bf16 psum with genuine f32 ones (even f32 computed from bf16)."""

    def f(x, y):
        return jax.lax.psum(x * 2, "d"), jax.lax.psum(y, "d"), jax.lax.psum(x.astype(jnp.float32) * 3, "d")

    module = _hand_compiled(f, ((8, 5), jnp.bfloat16), ((8, 3), jnp.float32))
    (psum,) = module.collectives()
    assert psum.hlo_dtypes == ("f32", "f32", "f32")
    assert [str(o.dtype) for o in psum.operands] == ["bfloat16", "float32", "float32"]
    assert hlo.bytes_sent(module, 3) == 2 * 7 * (1 * 2 + 1 * 4 + 1 * 4)


def test_float16_and_int8_all_reduces_are_not_promoted():
    def f(x, y):
        return jax.lax.psum(x, "d"), jax.lax.psum(y, "d")

    module = _hand_compiled(f, ((8, 16), jnp.float16), ((8, 16), jnp.int8))
    assert sorted(d for c in module.collectives() for d in c.hlo_dtypes) == ["f16", "s8"]
    assert hlo.bytes_sent(module, 0) == 2 * 7 * 2 * (2 + 1)


def test_reduce_scatter_all_to_all_and_subgroups():
    def f(x):
        scattered = jax.lax.psum_scatter(x, "d", scatter_dimension=1, tiled=True)  # input [1, 16] f32
        swapped = jax.lax.all_to_all(x, "d", split_axis=1, concat_axis=1, tiled=True)
        return scattered, swapped

    module = _hand_compiled(f, ((8, 16), jnp.float32))
    kinds = sorted(c.kind for c in module.collectives())
    assert kinds == ["all-to-all", "reduce-scatter"], kinds
    by_kind = {c.kind: c for c in module.collectives()}
    assert by_kind["reduce-scatter"].group_size(5) == 8
    assert by_kind["reduce-scatter"].bytes_sent(5) == 7 * 2 * 4
    assert by_kind["all-to-all"].bytes_sent(5) == 7 * 16 * 4 // 8

    def g(x):  # a psum over one axis of a 4 x 2 mesh: 2 groups of 4 devices
        return jax.lax.psum(x, "a")

    sub = _hand_compiled(g, ((8, 16), jnp.float32), mesh_shape=(4, 2), names=("a", "b"), spec=P(("a", "b")))
    (psum,) = sub.collectives()
    assert sorted(map(sorted, psum.groups)) == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert hlo.bytes_sent(sub, 1) == 2 * 3 * 4 * 4  # n = 4, E = 16 -> ceil(16/4) = 4


def test_replica_groups_explicit_iota_and_all():
    assert hlo._groups("{{0,2,4,6},{1,3,5,7}}", 8) == ((0, 2, 4, 6), (1, 3, 5, 7))
    assert hlo._groups("[2,4]<=[8]", 8) == ((0, 1, 2, 3), (4, 5, 6, 7))
    assert hlo._groups("[2,4]<=[4,2]T(1,0)", 8) == ((0, 2, 4, 6), (1, 3, 5, 7))
    assert hlo._groups("{}", 8) == (tuple(range(8)),)


def test_identical_all_reduces_are_merged_by_cse():
    """Two psums of the same value compile to one all-reduce: a channel that issues both counts twice
    what is sent, and the audit (which counts the compiled program) sees the difference."""
    counted = []

    def f(x):
        channel = optdist.comm.Channel("d")
        total = channel.psum(x) + channel.psum(x)
        counted.append(channel.nbytes)
        return total

    module = _hand_compiled(f, ((8, 16), jnp.float32))
    assert len(module.collectives()) == 1
    assert hlo.bytes_sent(module, 0) == 2 * 7 * 2 * 4  # what is sent: once
    assert counted == [2 * hlo.bytes_sent(module, 0)]


def test_stack_names_the_calling_code():
    def issue_psum(x):
        return jax.lax.psum(x, "d")

    module = _hand_compiled(issue_psum, ((8, 4), jnp.float32))
    (psum,) = module.collectives()
    assert psum.stack[0][0] == __file__ and psum.stack[0][2].endswith("issue_psum")


def test_while_loops_count_per_trip_and_unknown_branches_are_refused():
    def f(x):
        return jax.lax.fori_loop(0, 3, lambda i, y: jax.lax.psum(y, "d") / 8, x)

    module = _hand_compiled(f, ((8, 4), jnp.float32))
    assert hlo.bytes_sent(module, 0) == 3 * 2 * 7 * 1 * 4

    def g(x):
        return jax.lax.cond(x.sum() > 0, lambda y: jax.lax.psum(y, "d"), lambda y: y, x)

    gated = _hand_compiled(g, ((8, 4), jnp.float32))
    with pytest.raises(ValueError, match="branch"):
        hlo.bytes_sent(gated, 0)
    assert hlo.bytes_sent(gated, 0, branch=lambda c, d: 0) in (0, 2 * 7 * 4)
    assert {hlo.bytes_sent(gated, 0, branch=lambda c, d, i=i: i) for i in (0, 1)} == {0, 2 * 7 * 4}


# Async forms as GPU programs print them (operands with shapes, -start/-done pairs, an async-start
# wrapping a reduce-scatter): each collective counted once, at its start.
_ASYNC_TEXT = """HloModule async_example, num_partitions=4

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(f32[] %a, f32[] %b)
}

%wrapped_reduce_scatter (x: f32[1024]) -> f32[256] {
  %x = f32[1024]{0} parameter(0)
  ROOT %rs = f32[256]{0} reduce-scatter(f32[1024]{0} %x), channel_id=4, replica_groups=[1,4]<=[4], \
dimensions={0}, use_global_device_ids=true, to_apply=%add
}

ENTRY %main (p: f32[1024], q: f32[256], r: f32[64]) -> (f32[1024], f32[1024], f32[64], f32[256]) {
  %p = f32[1024]{0} parameter(0)
  %q = f32[256]{0} parameter(1)
  %r = f32[64]{0} parameter(2)
  %ar-start = f32[1024]{0} all-reduce-start(f32[1024]{0} %p), channel_id=1, replica_groups={{0,1,2,3}}, \
use_global_device_ids=true, to_apply=%add
  %ar-done = f32[1024]{0} all-reduce-done(f32[1024]{0} %ar-start)
  %ag-start = (f32[256]{0}, f32[1024]{0}) all-gather-start(f32[256]{0} %q), channel_id=2, \
replica_groups=[1,4]<=[4], dimensions={0}, use_global_device_ids=true
  %ag-done = f32[1024]{0} all-gather-done((f32[256]{0}, f32[1024]{0}) %ag-start)
  %cp-start = (f32[64]{0}, f32[64]{0}, u32[], u32[]) collective-permute-start(f32[64]{0} %r), channel_id=3, \
source_target_pairs={{0,1},{1,2},{2,3}}
  %cp-done = f32[64]{0} collective-permute-done((f32[64]{0}, f32[64]{0}, u32[], u32[]) %cp-start)
  %rs-start = ((f32[1024]{0}), f32[256]{0}) async-start(f32[1024]{0} %p), calls=%wrapped_reduce_scatter
  %rs-done = f32[256]{0} async-done(((f32[1024]{0}), f32[256]{0}) %rs-start), calls=%wrapped_reduce_scatter
  ROOT %out = (f32[1024]{0}, f32[1024]{0}, f32[64]{0}, f32[256]{0}) \
tuple(%ar-done, %ag-done, %cp-done, %rs-done)
}
""".replace("\\\n", "")


def test_async_forms_count_once():
    module = hlo.HloModule(_ASYNC_TEXT)
    kinds = sorted(c.kind for c in module.collectives())
    assert kinds == ["all-gather", "all-reduce", "collective-permute", "reduce-scatter"]
    ring = 2 * 3 * 256 * 4 + 3 * 256 * 4 + 3 * 256 * 4  # all-reduce, all-gather of the input, reduce-scatter
    assert hlo.bytes_sent(module, 0) == ring + 64 * 4
    assert hlo.bytes_sent(module, 3) == ring  # device 3 is no source of the permute
