"""Char-LM without an all-reduce: AdamW locally, then gossip on a ring / exponential graphs.

  python -m experiments.compare --config=experiments/configs/charlm_decentralized.py --workdir=runs/dec_lm

Every worker reads its own slice of the text (IID); each is evaluated on its own parameters. The last
column is steps-to-target: the first evaluation at which a method reaches synchronous AdamW's final
validation loss.
"""

import ml_collections

from experiments.configs import charlm, default


def get_config() -> ml_collections.ConfigDict:
    c = default.comparison(charlm.get_config())
    c.base.steps = 1000
    c.base.eval_every = 50
    c.methods = (
        "exact_mean,dsgd_ring,dsgd_exponential,dsgd_one_peer_exponential,gradient_tracking_ring,"
        "choco_ring_topk10"
    )
    c.loss_target_method = "exact_mean"
    c.target_accuracy = 0.5
    c.bandwidth_gbit = 1.0
    c.latency_ms = 0.0
    return c
