"""Character-level transformer LM on Python standard-library source, 8 simulated workers."""

import ml_collections

from experiments.configs import default


def get_config() -> ml_collections.ConfigDict:
    c = default.get_config()
    del c.hidden, c.classes_per_worker  # digits-only fields
    c.dataset = "charlm"
    c.corpus = "files"  # 16 fixed stdlib files (400k chars); "stdlib": the whole library (~10M)
    c.model = "transformer"
    c.dim = 64
    c.heads = 4
    c.layers = 2
    c.seq_len = 64
    c.eval_windows = 64
    c.optimizer = "adamw"
    c.learning_rate = 3e-3
    c.weight_decay = 1e-4
    c.batch_size = 8  # sequences per worker
    c.steps = 600
    c.eval_every = 100
    return c
