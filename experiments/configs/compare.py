"""The main job: digits, 8 simulated workers, every method side by side.

``methods`` lists (comma-separated) names from ``experiments.methods.METHODS``; ``base`` is the
training config each runs with. Time-to-target uses a stated bandwidth model:
a step costs (measured compute time of one worker) + (bytes it sends) /
``bandwidth_gbit`` Gbit/s + ``latency_ms`` per step that communicates.
"""

import ml_collections

from experiments.configs import digits


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.base = digits.get_config()
    c.methods = (  # comma-separated names from experiments.methods
        "exact_mean,local_only,powersgd_r2,topk_1pct_ef,topk_1pct,sign_ef,local_sgd_h10,"
        "robust/none/trimmed_mean+nnm+mom,shampoo"
    )
    c.target_accuracy = 0.95
    c.bandwidth_gbit = 1.0
    c.latency_ms = 0.0
    return c
