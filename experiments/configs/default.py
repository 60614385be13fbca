"""The default training config: digits (scikit-learn's bundled 8x8 images), an MLP, 8 simulated workers.

  python -m experiments.main                          # this config, method exact_mean
  python -m experiments.main --list                   # every field below, every method and preset

Every field the training code reads is declared here (other configs start from this one), so any
of them can be set from the command line (``--config.learning_rate=0.1``). Method settings live
under ``hparams.<method>`` (``--config.hparams.diloco.sync_every=20``); see experiments/methods.py.
"""

import ml_collections

from experiments import methods

# One line per field, shown by ``--list``.
FIELD_DOCS = {
    "dataset": "'digits' (sklearn 8x8 digits) or 'charlm' (stdlib-source characters)",
    "model": "'mlp' or 'cnn' (digits), 'transformer' (charlm)",
    "hidden": "MLP/CNN hidden width",
    "method": "a method or preset name (--list shows them)",
    "label": "name shown in progress lines and tables ('' = the method)",
    "optimizer": "base optimizer after the communication transform: 'sgd', 'adam' or 'adamw'",
    "learning_rate": "base optimizer learning rate (> 0, finite); DiLoCo/FedAvg inner/client lr",
    "momentum": "SGD momentum in [0, 1)",
    "weight_decay": "AdamW weight decay (>= 0)",
    "num_workers": "simulated (or real) workers (>= 1)",
    "batch_size": "examples (sequences) per worker per step (>= 1)",
    "steps": "training steps (>= 1)",
    "eval_every": "steps per jitted chunk; evaluate, log and maybe checkpoint after each (>= 1)",
    "seed": "data split, init and per-step batches",
    "execution": "'simulate' (vmap on one device) or 'data_parallel' (shard_map over devices)",
    "eval_params": "'workers' (mean of the workers' own losses) or 'global' (an outer loop's anchor)",
    "skip_nonfinite": "skip a step (in agreement) when any gradient or update is non-finite",
    "checkpoint_every": "steps between checkpoints, a multiple of eval_every; 0: none",
    "keep_checkpoints": "checkpoints kept (>= 1)",
    "classes_per_worker": "non-IID split: classes each worker sees (None: IID)",
    "num_byzantine": "Byzantine workers f for the 'robust' method (the first f workers)",
    "hparams": "per-method settings",
    "dim": "transformer width",
    "heads": "transformer heads",
    "layers": "transformer layers",
    "seq_len": "tokens per training sequence",
    "eval_windows": "held-out windows evaluated",
}


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.dataset = "digits"
    c.model = "mlp"  # or "cnn"
    c.hidden = 128
    c.method = "exact_mean"  # a name in experiments.methods.METHODS or PRESETS
    c.label = ""
    c.optimizer = "sgd"
    c.learning_rate = 0.05
    c.momentum = 0.9
    c.weight_decay = 1e-4
    c.num_workers = 8
    c.batch_size = 16  # per worker
    c.steps = 400
    c.eval_every = 50
    c.seed = 0
    c.execution = "simulate"  # or "data_parallel"
    c.eval_params = "workers"  # or "global": evaluate optdist.outer.global_params(state), the anchor
    c.skip_nonfinite = True
    c.checkpoint_every = 0  # steps between checkpoints (a multiple of eval_every); 0: none
    c.keep_checkpoints = 2
    c.classes_per_worker = ml_collections.FieldReference(None, field_type=int)
    c.num_byzantine = 2
    c.hparams = methods.default_hparams()
    return c


COMPARISON_DOCS = {
    "base": "the training config every method runs with (all fields above, as base.<field>)",
    "methods": "comma-separated method, preset or variant names, trained in order",
    "variants": "named runs: variants.<label> = {method: <name>, <field>: <value>, ...} (hparams fields)",
    "target_accuracy": "time-to-target column: first evaluation at or above this test accuracy",
    "bandwidth_gbit": "network model: link bandwidth per worker, Gbit/s",
    "latency_ms": "network model: latency per communicating step (a step whose byte count grows), ms",
    "loss_target_method": "if set, a column of steps to reach this method's final test loss",
}


def comparison(base: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A comparison config (experiments.compare) over training config ``base``, every field declared."""
    c = ml_collections.ConfigDict()
    c.base = base
    c.methods = "exact_mean"
    c.variants = ml_collections.ConfigDict()
    c.target_accuracy = 0.95
    c.bandwidth_gbit = 1.0
    c.latency_ms = 0.0
    c.loss_target_method = ""
    return c
