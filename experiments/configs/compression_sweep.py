"""Compression sweep on digits (MLP, hidden 512), 8 simulated workers: accuracy vs bytes.

  python -m experiments.compare --config=experiments/configs/compression_sweep.py --workdir=runs/compression

The plot's right panel is test accuracy against MiB sent per worker.
"""

import ml_collections

from experiments.configs import default, digits


def get_config() -> ml_collections.ConfigDict:
    c = default.comparison(digits.get_config())
    c.base.hidden = 512
    c.base.steps = 500
    c.methods = (
        "exact_mean,powersgd_r1,powersgd_r2,powersgd_r4,topk_1pct_ef,topk_1pct,topk_1pct_ef21,"
        "topk_1pct_econtrol,qsgd_8bit,terngrad,sign_ef,bf16,demo,local_only"
    )
    c.target_accuracy = 0.95
    c.bandwidth_gbit = 1.0
    c.latency_ms = 0.0
    return c
