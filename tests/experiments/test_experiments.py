"""The experiment harness: data, training under simulated/real workers, the main job."""

import json
import os

import jax
import numpy as np
import pytest

import optdist
from experiments import compare, data, train
from experiments.configs import charlm as charlm_config
from experiments.configs import compare as compare_config
from experiments.configs import digits as digits_config


def tiny_digits(method="exact_mean", **overrides):
    c = digits_config.get_config()
    c.hidden = 16
    c.steps = 20
    c.eval_every = 10
    c.num_workers = 4
    c.batch_size = 8
    c.method = method
    c.num_byzantine = 1  # for the robust method: n = 4 workers needs f < 2
    c.update(overrides)
    return c


def test_corpus_is_deterministic_and_ascii():
    a = data.stdlib_corpus(50_000)
    assert a == data.stdlib_corpus(50_000)
    assert len(a) == 50_000 and all(ord(ch) < 128 for ch in a)
    ds = data.load_charlm(max_chars=20_000)
    assert len(ds.x_train) == 18_000 and len(ds.x_test) == 2_000
    assert ds.x_train.max() < data.VOCAB_SIZE


def test_the_whole_stdlib_corpus_skips_tests_and_holds_the_default_files():
    import sysconfig

    files = data._stdlib_tree(sysconfig.get_paths()["stdlib"])
    assert set(data.STDLIB_FILES) <= set(files)
    assert not [f for f in files if set(f.split("/")[:-1]) & data._SKIPPED_DIRS]
    assert len(files) > 20 * len(data.STDLIB_FILES)
    with pytest.raises(ValueError, match="corpus"):
        data.stdlib_corpus(100, corpus="web")


def test_partitions():
    ds = data.load_digits()
    iid = data.partition(len(ds.x_train), 8, seed=0)
    assert iid.shape[0] == 8
    assert len(np.unique(iid)) == len(ds.x_train)  # every example used
    non_iid = data.partition(len(ds.x_train), 8, labels=ds.y_train, classes_per_worker=2, seed=0)
    for w in range(8):
        assert set(np.unique(ds.y_train[non_iid[w]])) == {w % 10, (w + 1) % 10}


@pytest.fixture(scope="module")
def exact_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("exact"))
    return train.train_and_evaluate(tiny_digits(), workdir, verbose=False), workdir


def test_train_writes_metrics_plot_and_counts_bytes(exact_run):
    result, workdir = exact_run
    assert os.path.exists(os.path.join(workdir, "plot.png"))
    with open(os.path.join(workdir, "metrics.json")) as f:
        saved = json.load(f)
    assert [r["step"] for r in saved["history"]] == [10, 20]
    # 64*16+16 + 16*16+16 + 16*10+10 float32 params; ring over 4 workers; plus the
    # 4-byte non-finite agreement flag each step.
    elems = 64 * 16 + 16 + 16 * 16 + 16 + 16 * 10 + 10
    per_step = 2 * 3 * -(-elems // 4) * 4 + 2 * 3 * 1 * 4
    assert saved["summary"]["bytes_per_worker"] == 20 * per_step
    assert saved["summary"]["test_accuracy"] > 0.2  # chance is 0.1: learned something in 20 steps


def test_data_parallel_execution_matches_simulation(exact_run):
    result, _ = exact_run
    dp = train.train_and_evaluate(tiny_digits(execution="data_parallel"), None, verbose=False)
    for a, b in zip(result["history"], dp["history"]):
        np.testing.assert_allclose(a["test_loss"], b["test_loss"], rtol=1e-4)
        assert a["bytes_per_worker"] == b["bytes_per_worker"]


def test_compare_prints_table_and_writes_outputs(tmp_path, capsys):
    cfg = compare_config.get_config()
    cfg.base = tiny_digits()
    cfg.methods = "exact_mean,local_only"
    cfg.target_accuracy = 0.3
    rows = compare.run_comparison(cfg, str(tmp_path))
    out = capsys.readouterr().out
    assert "exact_mean" in out and "local_only" in out and "MiB/worker" in out
    assert rows[1]["bytes_per_worker"] == 0
    assert rows[0]["time_to_target"] is not None
    assert (tmp_path / "results.json").exists() and (tmp_path / "plot.png").exists()


def test_steps_to_reference_loss():
    hist = {
        "ref": [{"step": 10, "test_loss": 2.0}, {"step": 20, "test_loss": 1.5}],
        "fast": [{"step": 10, "test_loss": 1.4}, {"step": 20, "test_loss": 1.2}],
        "slow": [{"step": 10, "test_loss": 1.9}, {"step": 20, "test_loss": 1.6}],
    }
    rows = [{"method": m, "test_loss": h[-1]["test_loss"], "step": 20} for m, h in hist.items()]
    compare.add_steps_to_reference_loss(rows, hist, "ref")
    assert [r["steps_to_reference_loss"] for r in rows] == [20, 10, None]
    assert [r["step_ratio_to_reference"] for r in rows] == [1.0, 0.5, None]
    with pytest.raises(ValueError, match="loss_target_method"):
        compare.add_steps_to_reference_loss(rows, hist, "absent")


def test_charlm_config_builds_and_steps():
    c = charlm_config.get_config()
    c.update(dict(dim=16, heads=2, layers=1, seq_len=16, eval_windows=4, steps=2, eval_every=2))
    c.num_workers = 2
    c.batch_size = 2
    result = train.train_and_evaluate(c, None, verbose=False)
    assert np.isfinite(result["summary"]["test_perplexity"])
    assert result["summary"]["test_perplexity"] < 128 * 1.5  # near-uniform at worst


def test_unknown_method_is_named():
    with pytest.raises(ValueError, match="Unknown method 'nope'"):
        train.train_and_evaluate(tiny_digits(method="nope"), None, verbose=False)


def test_jax_sees_eight_devices():
    assert len(jax.devices()) == 8 and optdist.num_workers(None) == 1


def test_muloco_puts_muon_on_the_hidden_matrices_only():
    """The experiments' MuLoCo split: AdamW for the embeddings, positions, output layer, biases and
    norms; Muon for every block kernel, with attention's 3-D kernels orthogonalized as matrices
    ``d × (heads·head_dim)`` (query / key / value) and ``(heads·head_dim) × d`` (output)."""
    import optax

    from experiments import methods, models

    params, _ = models.build(charlm_config.get_config(), 96, 0)
    dims = methods.muon_hidden_dimension_numbers(params)
    is_leaf = lambda x: x is None or isinstance(x, optax.contrib.MuonDimensionNumbers)
    got = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(dims, is_leaf=is_leaf)}
    muon = {k: v for k, v in got.items() if v is not None}
    assert len(got) == len(jax.tree_util.tree_leaves(params))
    assert all("kernel" in k and "blocks" in k for k in muon)
    assert sum("kernel" in k and "blocks" in k for k in got) == len(muon) == 12  # 2 blocks x 6 kernels
    for k, v in muon.items():
        if "'attn']['out'" in k:
            assert (v.reduction_axis, v.output_axis) == ((0, 1), 2), k
        elif "'attn'" in k:
            assert (v.reduction_axis, v.output_axis) == (0, (1, 2)), k
        else:
            assert (v.reduction_axis, v.output_axis) == ((0,), 1), k


def test_muloco_with_another_codec_sends_what_diloco_with_that_codec_sends():
    """``muloco(codec="fp4_requantized")``: Muon inside, the diloco_compressed FP4 sync outside, so one
    sync step sends exactly the bytes of ``diloco_compressed`` with that codec (and moves differently)."""
    import jax.numpy as jnp
    import ml_collections
    import optax

    from experiments import methods

    cfg = charlm_config.get_config()
    # A hidden kernel (Muon) and an output layer (AdamW), named as the experiments' models name them.
    params = {"blocks": {"up": {"kernel": jnp.ones((16, 32))}}, "head": {"kernel": jnp.ones((16, 8))}}
    grads = jax.tree_util.tree_map(lambda p: jax.random.normal(jax.random.key(p.size), (2, *p.shape)), params)
    codec = {"sync_every": 1, "codec": "fp4_requantized", "chunk_size": 128, "rounding": "nearest"}

    def one_sync(name):
        method = methods.METHODS[name]
        tx = method.build(cfg, ml_collections.ConfigDict({**method.options, **codec}), "data")

        def step(p, s, g):
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s

        p, s = optdist.replicate((params, tx.init(params)), 2)
        p, s = jax.jit(optdist.simulate(step, "data"))(p, s, grads)
        return jax.tree_util.tree_leaves(p), optdist.bytes_sent(s)

    muon_p, muon_bytes = one_sync("muloco")
    adam_p, adam_bytes = one_sync("diloco_compressed")
    np.testing.assert_array_equal(muon_bytes, adam_bytes)
    assert int(np.max(muon_bytes)) > 0
    assert any(not np.allclose(a, b) for a, b in zip(muon_p, adam_p))
    with pytest.raises(ValueError, match="codec"):
        methods.METHODS["muloco"].build(
            cfg, ml_collections.ConfigDict({**methods.METHODS["muloco"].options, "codec": "fp5"}), "data"
        )


def test_eval_params_global_evaluates_the_anchor():
    """``eval_params='global'``: the outer loop's anchor. Evaluations right after a sync equal the
    workers'; mid-round (before the first sync) the anchor is still the initial model."""
    aligned = {}
    for where in ("workers", "global"):
        c = tiny_digits("diloco", eval_params=where)
        c.hparams.diloco.sync_every = 10
        aligned[where] = train.train_and_evaluate(c, None, verbose=False)["history"]
    for a, b in zip(aligned["workers"], aligned["global"]):
        np.testing.assert_allclose(a["test_loss"], b["test_loss"], rtol=1e-5)
        assert a["train_loss"] == b["train_loss"] and a["bytes_per_worker"] == b["bytes_per_worker"]
    c = tiny_digits("diloco", eval_params="global")
    c.hparams.diloco.sync_every = 15
    history = train.train_and_evaluate(c, None, verbose=False)["history"]
    task = train.Task(c)
    initial_loss, _ = task.evaluate(task.params)
    np.testing.assert_allclose(history[0]["test_loss"], float(initial_loss), rtol=1e-5)
    assert history[1]["test_loss"] < history[0]["test_loss"]  # the sync at step 15 moved the anchor


def test_eval_params_global_without_an_outer_loop_is_named():
    with pytest.raises(ValueError, match="eval_params='global'.*no outer loop"):
        train.train_and_evaluate(tiny_digits(eval_params="global"), None, verbose=False)
    with pytest.raises(ValueError, match="config.eval_params"):
        train.train_and_evaluate(tiny_digits(eval_params="anchor"), None, verbose=False)
