"""Digits (MLP, hidden 512), 8 simulated workers: AdamW vs Shampoo by refresh cadence and block size.

  python -m experiments.compare --config=experiments/configs/digits_shampoo.py

The last column is the first step at which each method reaches AdamW's (``exact_mean``) final test
loss, and its ratio to AdamW's steps. Shampoo's settings: ``base.hparams.shampoo`` (defaults
``experiments.methods.SHAMPOO_DEFAULTS``), with each variant's cadence and block size on top.
"""

import ml_collections

from experiments.configs import default, digits


def get_config() -> ml_collections.ConfigDict:
    c = default.comparison(digits.get_config())
    c.base.hidden = 512
    c.base.steps = 400
    c.base.eval_every = 25
    c.base.optimizer = "adamw"
    c.base.learning_rate = 3e-3
    c.base.weight_decay = 1e-4
    c.base.hparams.shampoo.learning_rate = 3e-3
    c.base.hparams.shampoo.weight_decay = 1e-4
    c.variants = ml_collections.ConfigDict(
        {
            f"shampoo_every{every}_block{block}": {
                "method": "shampoo",
                "precondition_every": every,
                "block_size": block,
            }
            for every, block in ((1, 128), (10, 128), (10, 32))
        }
    )
    c.methods = "exact_mean,shampoo_every1_block128,shampoo_every10_block128,shampoo_every10_block32"
    c.loss_target_method = "exact_mean"
    c.target_accuracy = 0.95
    c.bandwidth_gbit = 1.0
    c.latency_ms = 0.0
    return c
