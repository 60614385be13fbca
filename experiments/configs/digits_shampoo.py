"""Digits (MLP, hidden 512), 8 simulated workers: AdamW vs Shampoo by refresh cadence and block size.

  python -m experiments.compare --config=experiments/configs/digits_shampoo.py --workdir=runs/digits_shampoo

The last column is the first step at which each method reaches AdamW's (``exact_mean``) final test
loss, and its ratio to AdamW's steps. Shampoo's options: ``experiments.methods.SHAMPOO_DEFAULTS``,
updated by ``config.base.shampoo``.
"""

import ml_collections

from experiments.configs import digits


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.base = digits.get_config()
    c.base.hidden = 512
    c.base.steps = 400
    c.base.eval_every = 25
    c.base.optimizer = "adamw"
    c.base.learning_rate = 3e-3
    c.base.weight_decay = 1e-4
    c.base.shampoo = ml_collections.ConfigDict({"learning_rate": 3e-3})
    c.methods = "exact_mean,shampoo/every1/block128,shampoo/every10/block128,shampoo/every10/block32"
    c.loss_target_method = "exact_mean"
    c.target_accuracy = 0.95
    c.bandwidth_gbit = 1.0
    c.latency_ms = 0.0
    return c
