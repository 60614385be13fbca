"""Character-level transformer LM on Python standard-library source, 8 simulated workers."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.dataset = "charlm"
    c.model = "transformer"
    c.dim = 64
    c.heads = 4
    c.layers = 2
    c.seq_len = 64
    c.eval_windows = 64
    c.method = "exact_mean"
    c.optimizer = "adamw"
    c.learning_rate = 3e-3
    c.weight_decay = 1e-4
    c.num_workers = 8
    c.batch_size = 8  # sequences per worker
    c.steps = 600
    c.eval_every = 100
    c.seed = 0
    c.execution = "simulate"
    c.skip_nonfinite = True
    c.checkpoint_every = 0  # steps between checkpoints (a multiple of eval_every); 0: none
    c.keep_checkpoints = 2
    return c
