"""Char-LM: synchronous AdamW vs DiLoCo (H = 10, 50, 200), Local SGD, Streaming DiLoCo, QSR.

python -m experiments.compare --config=experiments/configs/charlm_outer.py --workdir=runs/charlm_outer
"""

import ml_collections

from experiments.configs import charlm, default


def get_config() -> ml_collections.ConfigDict:
    c = default.comparison(charlm.get_config())
    c.base.steps = 3000
    c.base.eval_every = 250
    c.methods = "exact_mean,diloco_h10,diloco_h50,diloco_h200,local_sgd_h10,streaming_diloco_h50,qsr_diloco"
    c.target_accuracy = 0.5  # next-character accuracy on the validation text
    c.bandwidth_gbit = 1.0
    c.latency_ms = 0.0
    return c
