"""Byzantine robustness on digits: n = 10 workers, f of them Byzantine, attack x aggregator grid.

  python -m experiments.robustness --workdir=runs/robustness

Each cell trains ``robust/<attack>/<aggregator><variant>`` (see experiments.methods) and reports
the final test accuracy; variants add nearest-neighbour mixing (+nnm) and worker momentum (+mom).
"""

import ml_collections

from experiments.configs import digits


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.base = digits.get_config()
    c.base.num_workers = 10
    c.base.num_byzantine = 2
    c.base.steps = 300
    c.base.eval_every = 100
    c.base.learning_rate = 0.05
    c.attacks = "none,sign_flip,ipm,alie,gaussian,mimic,nan_inf"
    c.aggregators = "mean,median,trimmed_mean,krum,geometric_median,centered_clip,monna,flag"
    c.variants = ",+nnm+mom"  # comma-separated suffixes ("" = plain)
    c.num_byzantine = "2"  # comma-separated f values
    return c
