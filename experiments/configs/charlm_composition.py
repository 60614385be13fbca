"""Char-LM, 8 workers: which composition of outer loop x pseudo-gradient codec pays (issue 14).

python -m experiments.compare --config=experiments/configs/charlm_composition.py
python -m experiments.pareto runs/charlm_composition    # the bytes table (two networks) + Pareto plot

The 6000-step table of BENCHMARKS.md (SparseLoCo >= 1000x within 2%, at data parallel's overfitting floor):
python -m experiments.compare --config=experiments/configs/charlm_composition.py \
    --config.methods=exact_mean,diloco_h30,sparseloco_h30_d15,sparseloco_h30_c32 \
    --config.base.steps=6000 --workdir=runs/charlm_composition_6k
and its control off the overfitting floor (the whole standard library as corpus, 3000 steps):
python -m experiments.compare --config=experiments/configs/charlm_composition.py \
    --config.methods=exact_mean,sparseloco_h30,sparseloco_h30_d15,sparseloco_h30_c32 \
    --config.base.corpus=stdlib --workdir=runs/charlm_composition_stdlib

Every method trains the same model on the same tokens for the same number of steps; only the
communication differs. ``exact_mean`` is synchronous data-parallel AdamW (lr 3e-3, the best of
{1e-3, 3e-3, 1e-2} on this model in BENCHMARKS.md); every DiLoCo-family method uses that lr as its
inner AdamW lr. The per-step non-finite agreement of ``skip_nonfinite`` is off here, so each
method's bytes and communicating steps are those of its own protocol.
"""

import ml_collections

from experiments.configs import charlm, default


def get_config() -> ml_collections.ConfigDict:
    c = default.comparison(charlm.get_config())
    c.base.steps = 3000
    c.base.eval_every = 250
    # No per-step non-finite agreement flag (4 bytes and one latency per step): the bytes and rounds
    # counted are each method's own protocol only.
    c.base.skip_nonfinite = False
    v = c.variants
    v.diloco_h30 = {"method": "diloco", "sync_every": 30, "inner_weight_decay": 0.0}
    v.diloco_h100 = {"method": "diloco", "sync_every": 100, "inner_weight_decay": 0.0}
    v.diloco_h100_int8 = {"method": "diloco_compressed", "sync_every": 100, "codec": "int8"}
    # Session 8: int8 codes on shared chunk scales, *all-reduced* (quantize(exchange="summed"),
    # 32 levels a worker at n = 8): 2(n-1)/n bytes per entry instead of int8 gathered's n - 1, 4x
    # fewer than the float32 all-reduce, so ~400x at H = 100 and ~1000x at H = 250.
    summed = {"method": "diloco_compressed", "codec": "int8_summed", "feedback": "none"}
    v.diloco_h100_int8_summed = {**summed, "sync_every": 100}
    v.diloco_h250_int8_summed = {**summed, "sync_every": 250}
    v.diloco_h250 = {"method": "diloco", "sync_every": 250, "inner_weight_decay": 0.0}
    v.diloco_h300_int8_summed = {**summed, "sync_every": 300, "chunk_size": 512}
    # A quantized reduce-scatter + all-gather (quantize(exchange="requantized")): FP4 E2M1 with a scale
    # per 128 entries (4.25 bits an entry), nearest rounding, the mean re-encoded once by its shard's
    # owner: ~7.5x fewer bytes than the float32 all-reduce per sync, ~1090x at H = 150.
    requant = {"method": "diloco_compressed", "codec": "fp4_requantized", "feedback": "none"}
    v.diloco_h150_fp4_requantized = {**requant, "sync_every": 150, "chunk_size": 128, "rounding": "nearest"}
    v.diloco_h150 = {"method": "diloco", "sync_every": 150, "inner_weight_decay": 0.0}
    # Streaming DiLoCo's fragments (3, as 4 does not divide H = 150; tau = 5, alpha = 0.5, the
    # paper's) with the same FP4 sync.
    v.streaming_h150_fp4_requantized = {
        "method": "streaming_diloco_compressed",
        "num_fragments": 3,
        "delay": 5,
        "alpha": 0.5,
        "sync_every": 150,
        "codec": "fp4_requantized",
        "chunk_size": 128,
        "rounding": "nearest",
    }
    v.streaming_h100_fp4 = {
        "method": "streaming_diloco_compressed",
        "sync_every": 100,
        "num_fragments": 4,
        "delay": 5,
        "alpha": 0.5,
        "codec": "fp4",
    }
    v.sparseloco_h30 = {"method": "sparseloco", "sync_every": 30, "density": 0.03}
    v.sparseloco_h100 = {"method": "sparseloco", "sync_every": 100, "density": 0.03}
    v.sparseloco_h50_d2 = {"method": "sparseloco", "sync_every": 50, "density": 0.02}
    # H = 30 at half the density: ~1085x fewer bytes predicted (the payload is density x 14 bits).
    v.sparseloco_h30_d15 = {"method": "sparseloco", "sync_every": 30, "density": 0.015}
    # Session 7: small chunks make indices cheap (6 bits at 64 entries, 5 at 32) with one float32
    # scale per 4096 entries shared by the chunks: 8.25 / 7.25 bits per kept value instead of 14.26,
    # ~930x / ~1060x predicted at H = 30 and 3.125% density (k = 2 of 64, 1 of 32).
    small = {"method": "sparseloco", "sync_every": 30, "density": 0.03, "scale_size": 4096}
    v.sparseloco_h30_c64 = {**small, "chunk_size": 64}
    v.sparseloco_h30_c32 = {**small, "chunk_size": 32}
    # Cyclic indices (ScaleCom's CLT-k on SparseLoCo's codec): one worker's positions per round, sent
    # once by a uint8 all-reduce; only values and scales are all-gathered. 35 instead of 98 bits per
    # kept position at n = 8: ~1500x predicted at H = 30 / 3%, ~2200x at 2% (chunk 4096).
    cyclic = {"method": "sparseloco", "sync_every": 30, "indices": "cyclic"}
    v.sparseloco_h30_cyclic = {**cyclic, "density": 0.03}
    v.sparseloco_h30_cyclic_d2 = {**cyclic, "density": 0.02}
    # The same positions with the values summed: int8 codes -15..15 on a shared scale, all-reduced
    # (14 bits per kept position at n = 8, as 2-bit values gathered, for 31 levels instead of 4).
    v.sparseloco_h30_cyclic_summed = {**cyclic, "density": 0.03, "value_exchange": "summed"}
    # EF-under-Nesterov ablation (issue 14): SparseLoCo's codec (3% chunk top-k, 2-bit values, H = 30)
    # under DiLoCo's outer Nesterov (0.7, 0.9) with plain EF, with SparseLoCo's decayed EF (beta 0.95),
    # and without EF; sparseloco_h30 is the same codec with decayed EF and plain outer SGD (alpha 1).
    # Hypothesis written before the runs: EF under Nesterov is worse than sparseloco_h30 (+1.95%).
    sparse = {"method": "diloco_compressed", "sync_every": 30, "codec": "sparse", "density": 0.03}
    v.diloco_h30_sparse_ef = {**sparse, "feedback": "ef"}
    v.diloco_h30_sparse_decayed_ef = {**sparse, "feedback": "ef", "error_decay": 0.95}
    v.diloco_h30_sparse_no_ef = {**sparse, "feedback": "none"}
    v.muloco_h100 = {"method": "muloco", "sync_every": 100}
    # Data parallel with MuLoCo's Muon (every step's exact mean): the reference for the Muon rows.
    v.muon_mean = {"method": "muon_mean"}
    # MuLoCo's inner Muon with diloco_h150_fp4_requantized's sync (no EF) instead of 2-bit EF codes.
    v.muloco_h150_fp4_requantized = {
        "method": "muloco",
        "sync_every": 150,
        "codec": "fp4_requantized",
        "chunk_size": 128,
        "rounding": "nearest",
    }
    # The same at H = 300: half the syncs, the next point past 2000x.
    v.muloco_h300_fp4_requantized = {**v.muloco_h150_fp4_requantized.to_dict(), "sync_every": 300}
    # Session 11: H = 600 (10 syncs in 6000 steps), the next point past 4000x.
    v.muloco_h600_fp4_requantized = {**v.muloco_h150_fp4_requantized.to_dict(), "sync_every": 600}
    v.demo = {"method": "demo"}
    v.diloco_h100_int2_ef = {
        "method": "diloco_compressed",
        "sync_every": 100,
        "codec": "int2",
        "feedback": "ef",
    }
    c.methods = ",".join(
        [
            "exact_mean",
            "diloco_h30",
            "diloco_h100",
            "diloco_h100_int8",
            "diloco_h100_int8_summed",
            "diloco_h250_int8_summed",
            "diloco_h250",
            "diloco_h300_int8_summed",
            "diloco_h150_fp4_requantized",
            "diloco_h150",
            "streaming_h150_fp4_requantized",
            "streaming_h100_fp4",
            "sparseloco_h30",
            "sparseloco_h100",
            "sparseloco_h50_d2",
            "sparseloco_h30_d15",
            "sparseloco_h30_c64",
            "sparseloco_h30_c32",
            "sparseloco_h30_cyclic",
            "sparseloco_h30_cyclic_d2",
            "sparseloco_h30_cyclic_summed",
            "diloco_h30_sparse_ef",
            "diloco_h30_sparse_decayed_ef",
            "diloco_h30_sparse_no_ef",
            "muloco_h100",
            "demo",
            "diloco_h100_int2_ef",
        ]
    )
    c.target_accuracy = 0.5  # next-character accuracy on the validation text
    c.bandwidth_gbit = 1.0
    c.latency_ms = 10.0
    c.loss_target_method = "exact_mean"
    return c
