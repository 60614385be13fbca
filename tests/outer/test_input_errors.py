"""Careless inputs to the outer loops and compressed_mean raise errors naming what is wrong (issue 18)."""

import jax.numpy as jnp
import optax
import pytest

import optdist
from optdist import compressors

SGD = optax.sgd(0.1)
ALIASES = {
    "outer_loop": lambda: optdist.outer_loop(SGD, optax.sgd(1.0), 2, "data"),
    "local_sgd": lambda: optdist.local_sgd(SGD, 2, "data"),
    "diloco": lambda: optdist.diloco(0.01, sync_every=2),
    "streaming_diloco": lambda: optdist.streaming_diloco(0.01, 2, num_fragments=2),
    "fedavg": lambda: optdist.fedavg(0.1, 1.0, 2),
    "fedadam": lambda: optdist.fedadam(0.1, 0.01, 2),
    "fedyogi": lambda: optdist.fedyogi(0.1, 0.01, 2),
    "fedadagrad": lambda: optdist.fedadagrad(0.1, 0.01, 2),
    "scaffold": lambda: optdist.scaffold(0.1, 2),
    "local_adaptive": lambda: optdist.local_adaptive(0.01, 2),
    "delayed_nesterov": lambda: optdist.delayed_nesterov(SGD, 2, buffer_size=2),
    "async_local_sgd": lambda: optdist.async_local_sgd(SGD, 2, [1, 2]),
    "sparseloco": lambda: optdist.sparseloco(0.01, 2),
    "muloco": lambda: optdist.muloco(0.01, 2),
}


# Public lower-case names of optdist.outer that are not outer loops (building blocks, a schedule).
NOT_LOOPS = {"delayed_nesterov_outer", "qsr_sync_every", "scaffold_correction", "scale_by_fedopt"}
NOT_LOOPS |= {"scale_by_round_scaling", "schedule_free_eval_params", "global_params"}


def test_every_outer_alias_is_covered():
    loops = {n for n in optdist.outer.__all__ if n[0].islower()} - NOT_LOOPS
    assert loops == set(ALIASES)


@pytest.mark.parametrize("name", sorted(ALIASES))
def test_integer_parameter_leaf_is_refused_by_name(name):
    params = {"w": jnp.ones((4, 4)), "step": jnp.zeros((), jnp.int32)}
    with pytest.raises(TypeError, match=r"floating-point parameters.*\['step'\].*int32"):
        ALIASES[name]().init(params)


BAD_TRANSFORMS = {
    "outer_loop(inner='adam')": (lambda: optdist.outer_loop("adam", SGD, 2, "data"), "inner"),
    "outer_loop(outer=None)": (lambda: optdist.outer_loop(SGD, None, 2, "data"), "outer"),
    "local_sgd('adam')": (lambda: optdist.local_sgd("adam", 2, "data"), "inner"),
    "delayed_nesterov(None)": (lambda: optdist.delayed_nesterov(None, 2), "inner"),
    "async_local_sgd('adam')": (lambda: optdist.async_local_sgd("adam", 2, [1, 2]), "inner"),
}


@pytest.mark.parametrize("case", sorted(BAD_TRANSFORMS))
def test_a_non_transformation_is_named(case):
    make, name = BAD_TRANSFORMS[case]
    with pytest.raises(TypeError, match=rf"^{name} must be an optax.GradientTransformation"):
        make()


@pytest.mark.parametrize("feedback", [None, "ef", "ef21", "econtrol"])
def test_compressed_mean_state_of_another_tree_without_params(feedback):
    # DeMo keeps a per-leaf momentum: with feedback=None it is the only state that mirrors the tree.
    tx = optdist.compressed_mean(compressors.demo(4, 2), None, feedback=feedback)
    state = tx.init({"a": jnp.ones((4, 4)), "b": jnp.ones(3)})
    with pytest.raises(ValueError, match="does not match the state"):
        tx.update({"c": jnp.ones((4, 4))}, state)
    tx.update({"a": jnp.ones((4, 4)), "b": jnp.ones(3)}, state)  # the right tree still works


def test_qsgd_levels_too_large_names_levels():
    with pytest.raises(ValueError, match="levels"):
        compressors.qsgd(2**40)
