"""Attack x aggregator grid on digits: accuracy table and heat map.

  python -m experiments.robustness [--config=experiments/configs/robustness.py] [--workdir=runs/robustness]

Writes ``results.json`` and one ``heatmap_f<f>.png`` per Byzantine count.
"""

from __future__ import annotations

import copy
import json
import os

import matplotlib
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from experiments import train

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _split(value: str) -> list[str]:
    return [v.strip() for v in str(value).split(",")]


def run_grid(config, workdir: str | None, verbose: bool = True) -> dict:
    attacks = [a for a in _split(config.attacks) if a]
    rows = [agg + var for agg in _split(config.aggregators) if agg for var in _split(config.variants)]
    results = {}
    for f in [int(v) for v in _split(config.num_byzantine)]:
        table = np.zeros((len(rows), len(attacks)))
        for i, row in enumerate(rows):
            for j, attack in enumerate(attacks):
                cfg = copy.deepcopy(config.base)
                cfg.num_byzantine = f
                cfg.method = f"robust/{attack}/{row}"
                table[i, j] = train.train_and_evaluate(cfg, None, verbose=False)["summary"]["test_accuracy"]
                if verbose:
                    print(f"f={f} {row:<26} {attack:<10} acc {table[i, j]:.4f}", flush=True)
        results[f] = table
        print(f"\nTest accuracy, n={config.base.num_workers}, f={f} (rows: aggregator, columns: attack)")
        print(f"{'':<26}" + "".join(f"{a:>10}" for a in attacks))
        for row, vals in zip(rows, table):
            print(f"{row:<26}" + "".join(f"{v:>10.3f}" for v in vals))
        if workdir:
            os.makedirs(workdir, exist_ok=True)
            fig, ax = plt.subplots(figsize=(1.2 * len(attacks) + 3, 0.45 * len(rows) + 1.5))
            im = ax.imshow(table, vmin=0, vmax=1, cmap="viridis")
            ax.set_xticks(range(len(attacks)), attacks, rotation=30)
            ax.set_yticks(range(len(rows)), rows)
            for (i, j), v in np.ndenumerate(table):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w" if v < 0.6 else "k", fontsize=7)
            ax.set_title(f"digits test accuracy, n={config.base.num_workers}, f={f}")
            fig.colorbar(im)
            fig.tight_layout()
            fig.savefig(os.path.join(workdir, f"heatmap_f{f}.png"), dpi=110)
            plt.close(fig)
    out = {"attacks": attacks, "rows": rows, "tables": {str(f): t.tolist() for f, t in results.items()}}
    if workdir:
        with open(os.path.join(workdir, "results.json"), "w") as fh:
            json.dump(out, fh, indent=1)
    return out


def main(argv):
    del argv
    run_grid(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
    config_flags.DEFINE_config_file(
        "config", os.path.join(os.path.dirname(__file__), "configs", "robustness.py"), "Grid config."
    )
    flags.DEFINE_string("workdir", "runs/robustness", "Output folder.")
    app.run(main)
