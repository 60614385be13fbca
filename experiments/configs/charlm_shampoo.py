"""Char-LM: exact-mean AdamW vs exact-mean Shampoo, 8 simulated workers.

  python -m experiments.compare --config=experiments/configs/charlm_shampoo.py --workdir=runs/shampoo

The table's last column is steps-to-target: the first evaluation at which each method reaches AdamW's
(``exact_mean``) final validation loss, and its ratio to AdamW's step count. Shampoo's options are
``experiments.methods.SHAMPOO_DEFAULTS`` updated by ``config.base.shampoo`` (e.g.
``--config.base.shampoo.beta2=0.99``); ``shampoo/every<k>/block<b>`` sets cadence and block size.
"""

import ml_collections

from experiments.configs import charlm


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.base = charlm.get_config()
    c.base.steps = 1000
    c.base.eval_every = 50
    c.base.shampoo = ml_collections.ConfigDict(
        {"learning_rate": 3e-3, "grafting": "adam", "momentum": 0.0, "beta2": 0.999}
    )
    c.methods = "exact_mean,shampoo/every10/block128"
    c.loss_target_method = "exact_mean"
    c.target_accuracy = 0.55
    c.bandwidth_gbit = 1.0
    c.latency_ms = 0.0
    return c
