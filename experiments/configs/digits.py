"""Digits (scikit-learn's bundled 8x8 images) with an MLP and 8 simulated workers."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.dataset = "digits"
    c.model = "mlp"  # or "cnn"
    c.hidden = 128
    c.method = "exact_mean"  # a name in experiments.methods.METHODS
    c.optimizer = "sgd"
    c.learning_rate = 0.05
    c.momentum = 0.9
    c.num_workers = 8
    c.batch_size = 16  # per worker
    c.steps = 400
    c.eval_every = 50
    c.seed = 0
    c.execution = "simulate"  # or "data_parallel"
    c.skip_nonfinite = True
    c.checkpoint_every = 0  # steps between checkpoints (a multiple of eval_every); 0: none
    c.keep_checkpoints = 2
    c.classes_per_worker = ml_collections.FieldReference(None, field_type=int)
    return c
