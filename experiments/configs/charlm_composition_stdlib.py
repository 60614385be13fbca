"""Issue 14's headline: the composition table off the small corpus's overfitting floor.

python -m experiments.compare --config=experiments/configs/charlm_composition_stdlib.py \
    --workdir=runs/charlm_composition_stdlib_6k_eval1k
python -m experiments.pareto runs/charlm_composition_stdlib_6k_eval1k

``charlm_composition`` with the whole standard library as corpus (9.57M training characters, 25x the
default; 6000 steps see it about 2.6 times), 6000 steps and 1024 evaluation windows (65k characters,
16x the default, so that gaps of a fraction of a percent are not the evaluation set's noise). Every
method trains the same model on the same tokens; the evaluations at multiples of 750 steps are right
after a sync for H = 30, 100 (not 750) and 150, and step 6000 is for every H here. One method at a time:
``--config.methods=<name> --config.loss_target_method=`` (about 11 minutes each on 2 CPU cores).
Streaming DiLoCo's row is read on its global model (``--config.base.eval_params=global``: its workers'
own parameters are never right after a full sync); for every other row here the two agree at the
sync-aligned evaluations.
"""

import ml_collections

from experiments.configs import charlm_composition


def get_config() -> ml_collections.ConfigDict:
    c = charlm_composition.get_config()
    c.base.corpus = "stdlib"
    c.base.steps = 6000
    c.base.eval_windows = 1024
    c.methods = ",".join(
        [
            "exact_mean",
            "diloco_h100_int8_summed",
            "diloco_h150",
            "diloco_h150_fp4_requantized",
            "diloco_h300_int8_summed",
            "sparseloco_h30",
            "muon_mean",  # session 10: data parallel with MuLoCo's Muon, the Muon rows' reference
            "muloco_h150_fp4_requantized",
            "muloco_h300_fp4_requantized",
            "muloco_h600_fp4_requantized",  # session 11
        ]
    )
    return c
