"""Char-LM: exact-mean AdamW vs exact-mean Shampoo (Adam grafting), 8 simulated workers.

  python -m experiments.compare --config=experiments/configs/charlm_shampoo.py --workdir=runs/shampoo

Steps-to-target: the first evaluation at which each method reaches AdamW's final validation loss.
"""

import ml_collections

from experiments.configs import charlm


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.base = charlm.get_config()
    c.base.steps = 1000
    c.base.eval_every = 50
    c.base.shampoo_learning_rate = 3e-3
    c.methods = "exact_mean,shampoo_every10"
    c.target_accuracy = 0.55
    c.bandwidth_gbit = 1.0
    c.latency_ms = 0.0
    return c
