"""Federated digits: a non-IID split (each worker sees 2 classes), FedAvg and FedAdam vs exact mean.

python -m experiments.compare --config=experiments/configs/digits_federated.py --workdir=runs/fed
"""

import ml_collections

from experiments.configs import default, digits


def get_config() -> ml_collections.ConfigDict:
    c = default.comparison(digits.get_config())
    c.base.classes_per_worker = 2
    c.base.optimizer = "sgd"
    c.base.momentum = 0.0
    c.base.learning_rate = 0.3
    c.base.steps = 600
    c.methods = "exact_mean,local_only,fedavg_h10,fedadam_h10,local_sgd_h10"
    c.target_accuracy = 0.9
    c.bandwidth_gbit = 1.0
    c.latency_ms = 0.0
    return c
