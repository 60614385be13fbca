"""Char-LM: exact-mean AdamW vs exact-mean Shampoo, 8 simulated workers.

  python -m experiments.compare --config=experiments/configs/charlm_shampoo.py --workdir=runs/shampoo

The table's last column is steps-to-target: the first evaluation at which each method reaches AdamW's
(``exact_mean``) final validation loss, and its ratio to AdamW's step count. Shampoo's options are
``experiments.methods.SHAMPOO_DEFAULTS`` updated by ``config.base.shampoo`` (e.g.
``--config.base.shampoo.beta2=0.95``); ``shampoo/every<k>/block<b>/graft<type>`` sets cadence,
block size and grafting.
"""

import ml_collections

from experiments.configs import charlm


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.base = charlm.get_config()
    c.base.steps = 1000
    c.base.eval_every = 50
    c.base.shampoo = ml_collections.ConfigDict({"learning_rate": 3e-3})  # + SHAMPOO_DEFAULTS
    c.methods = (
        "exact_mean,shampoo/every10/block128,shampoo/every10/block128/graftadam,"
        "shampoo/every100/block128,shampoo/every10/block32"
    )
    c.loss_target_method = "exact_mean"
    c.target_accuracy = 0.55
    c.bandwidth_gbit = 1.0
    c.latency_ms = 0.0
    return c
