"""Char-LM: exact-mean AdamW vs exact-mean Shampoo, 8 simulated workers.

  python -m experiments.compare --config=experiments/configs/charlm_shampoo.py

The table's last column is steps-to-target: the first evaluation at which each method reaches AdamW's
(``exact_mean``) final validation loss, and its ratio to AdamW's step count. Shampoo's settings are
``base.hparams.shampoo`` (defaults: ``experiments.methods.SHAMPOO_DEFAULTS``; e.g.
``--config.base.hparams.shampoo.beta2=0.95``); each variant below sets its refresh cadence, block size
or grafting on top (``--config.variants.shampoo_every100_block128.precondition_every=50``).
"""

import ml_collections

from experiments.configs import charlm, default


def get_config() -> ml_collections.ConfigDict:
    c = default.comparison(charlm.get_config())
    c.base.steps = 1000
    c.base.eval_every = 50
    c.base.hparams.shampoo.learning_rate = 3e-3
    c.base.hparams.shampoo.weight_decay = 1e-4
    c.variants = ml_collections.ConfigDict(
        {
            "shampoo_every10_block128": {"method": "shampoo", "precondition_every": 10, "block_size": 128},
            "shampoo_every10_block128_adam": {
                "method": "shampoo",
                "precondition_every": 10,
                "block_size": 128,
                "grafting": "adam",
            },
            "shampoo_every100_block128": {"method": "shampoo", "precondition_every": 100, "block_size": 128},
            "shampoo_every10_block32": {"method": "shampoo", "precondition_every": 10, "block_size": 32},
        }
    )
    c.methods = (
        "exact_mean,shampoo_every10_block128,shampoo_every10_block128_adam,shampoo_every100_block128,"
        "shampoo_every10_block32"
    )
    c.loss_target_method = "exact_mean"
    c.target_accuracy = 0.55
    c.bandwidth_gbit = 1.0
    c.latency_ms = 0.0
    return c
