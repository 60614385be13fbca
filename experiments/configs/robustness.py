"""Byzantine robustness on digits: n = 10 workers, f of them Byzantine, attack x aggregator grid.

  python -m experiments.robustness                    # writes runs/robustness/

Each cell trains method ``robust`` with ``hparams.robust.attack`` and ``hparams.robust.aggregator``
set to the cell's attack and aggregator and the row's variant on top, and reports the final test
accuracy. Variants: ``plain``, ``nnm`` (nearest-neighbour mixing), ``mom`` (worker momentum),
``nnm_mom`` (both).
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
    c.variants = "plain,nnm_mom"  # comma-separated: plain, nnm, mom, nnm_mom
    c.num_byzantine = "2"  # comma-separated f values
    return c
