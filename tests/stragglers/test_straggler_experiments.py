"""The straggler methods in the experiments: simulated time recorded next to steps, the config validates."""

import numpy as np

from experiments import compare, train
from experiments.configs import digits_stragglers
from optdist.stragglers import clock
from tests.experiments.test_experiments import tiny_digits


def test_backup_run_records_simulated_time_next_to_steps():
    c = tiny_digits("backup", steps=4, eval_every=2)
    c.hparams.backup.update(dict(num_backup=1, delays="shifted_exponential", delay_a=1.0, delay_b=0.5))
    history = train.train_and_evaluate(c, None, verbose=False)["history"]
    assert [r["step"] for r in history] == [2, 4]
    model = clock.shifted_exponential(1.0, 0.5)
    expect = np.cumsum([np.sort(np.asarray(clock.compute_times(model, 0, t, 4)))[2] for t in range(4)])
    np.testing.assert_allclose([r["simulated_time"] for r in history], expect[[1, 3]], rtol=1e-5)


def test_digits_stragglers_config_builds_every_run():
    runs = compare.run_configs(digits_stragglers.get_config())
    assert [name for name, _ in runs] == [
        "backup_b0",
        "backup_b2",
        "backup_b4",
        "backup_b6",
        "dbw",
        "dbw_online_L",
    ]
