"""Decentralized digits: no all-reduce, 8 workers on a ring or an exponential graph, non-IID data.

The federated config's split (each worker sees 2 classes), so the workers' optima differ: plain D-SGD
pays for the heterogeneity, gradient tracking corrects it, CHOCO-SGD gossips top-10% compressed
changes.

python -m experiments.compare --config=experiments/configs/digits_decentralized.py --workdir=runs/dec
"""

import ml_collections

from experiments.configs import digits_federated


def get_config() -> ml_collections.ConfigDict:
    c = digits_federated.get_config()
    c.base.learning_rate = 0.1
    c.base.steps = 1000
    c.methods = (
        "exact_mean,local_only,dsgd_ring,dsgd_exponential,dsgd_one_peer_exponential,"
        "gradient_tracking_ring,choco_ring_topk10"
    )
    c.target_accuracy = 0.8
    return c
