"""The main job: digits, 8 simulated workers, every method side by side.

  python -m experiments.compare                      # writes runs/compare/{results.json,plot.png}

``methods`` lists (comma-separated) method or preset names from ``experiments.methods`` (or names
in ``variants``); ``base`` is the training config each runs with. Time-to-target uses a stated
network model: a step costs (steady-state compute time of one worker, compilation excluded) +
(bytes it sends) / ``bandwidth_gbit`` Gbit/s, plus ``latency_ms`` per step that communicates.
"""

import ml_collections

from experiments.configs import default, digits


def get_config() -> ml_collections.ConfigDict:
    c = default.comparison(digits.get_config())
    c.methods = (  # comma-separated names from experiments.methods
        "exact_mean,local_only,powersgd_r2,topk_1pct_ef,topk_1pct,sign_ef,local_sgd_h10,"
        "trimmed_mean_nnm_mom,shampoo"
    )
    c.target_accuracy = 0.95
    c.bandwidth_gbit = 1.0
    c.latency_ms = 0.0
    return c
