"""Digits (MLP), 8 simulated workers on a simulated clock with Pareto(1, 1.5) compute times: the
exact mean (waits for all 8), static backup workers b = 2, 4, 6, and DBW choosing b online, with
a fixed smoothness L = 1 (``dbw``) and with L estimated online (``dbw_online_L``).

  python -m experiments.compare --config=experiments/configs/digits_stragglers.py

Every straggler run records ``simulated_time`` (seconds on the simulated clock: the sum over steps of
the (n - b)-th fastest compute time) next to ``step`` in its ``metrics.json`` history; the exact mean
waits for the slowest worker, i.e. ``exact_mean`` is ``backup`` with ``num_backup=0`` (run
``backup_b0`` for its clock). Bytes are the same for every row (backup workers still send zeros in the
all-reduce). Plot of test loss against simulated time: ``python -m experiments.plot_stragglers``.

DBW's choice hinges on L: measured here (200 steps), L = 1 behaves like b = 6 (the best static b for
95% accuracy, within 2% of its simulated time), L = 10 like b = 0, and the online estimate (the
noise-subtracted change of successive mean gradients) comes out large on this noisy MLP, so
``dbw_online_L`` waits for almost every worker. Tuning L replaces tuning b; see BENCHMARKS.
"""

import ml_collections

from experiments.configs import default, digits


def get_config() -> ml_collections.ConfigDict:
    c = default.comparison(digits.get_config())
    c.base.steps = 200
    c.base.eval_every = 25
    c.base.optimizer = "sgd"
    c.base.momentum = 0.0  # DBW's gain model is that of plain SGD at the config's learning rate
    c.base.learning_rate = 0.1
    clock = {"delays": "pareto", "delay_a": 1.0, "delay_b": 1.5, "clock_seed": 0}
    c.variants = ml_collections.ConfigDict(
        {
            **{f"backup_b{b}": {"method": "backup", "num_backup": b, **clock} for b in (0, 2, 4, 6)},
            "dbw": {"method": "dbw", "initial_backup": 4, "decay": 0.9, "smoothness": 1.0, **clock},
            "dbw_online_L": {"method": "dbw", "initial_backup": 4, "decay": 0.9, "smoothness": 0.0, **clock},
        }
    )
    c.methods = "backup_b0,backup_b2,backup_b4,backup_b6,dbw,dbw_online_L"
    c.target_accuracy = 0.95
    return c
