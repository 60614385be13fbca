"""Attack x aggregator grid on digits: accuracy table and heat map.

  python -m experiments.robustness [--config=experiments/configs/robustness.py] [--workdir=runs/robustness]

Each cell trains method ``robust`` with the cell's ``hparams.robust.attack`` / ``aggregator`` and the
row's variant (``plain``, ``nnm``, ``mom``, ``nnm_mom``). Prints one line per cell with its count,
elapsed time and ETA; writes ``results.json`` (rewritten after every cell, so an interrupted grid
keeps its finished cells) and one ``heatmap_f<f>.png`` per Byzantine count.
"""

from __future__ import annotations

import copy
import json
import os
import time

import matplotlib
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from experiments import methods, train

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

VARIANTS = {
    "plain": {},
    "nnm": {"nnm": True},
    "mom": {"worker_momentum": True},
    "nnm_mom": {"nnm": True, "worker_momentum": True},
}
ROW_SUFFIX = {"plain": "", "nnm": "+nnm", "mom": "+mom", "nnm_mom": "+nnm+mom"}


def _split(value: str) -> list[str]:
    return [v.strip() for v in str(value).split(",") if v.strip()]


def grid_cells(config) -> tuple[list[str], list[tuple[str, str]], list[int]]:
    """``(attacks, rows, fs)``: rows are ``(aggregator, variant)``; every name is checked first."""
    attacks, aggregators = _split(config.attacks), _split(config.aggregators)
    variants = _split(config.variants) or ["plain"]
    for field, names, known in (
        ("attacks", attacks, methods.ATTACKS),
        ("aggregators", aggregators, methods.AGGREGATORS),
        ("variants", variants, VARIANTS),
    ):
        unknown = [n for n in names if n not in known]
        if unknown or not names:
            raise ValueError(
                f"config.{field}={getattr(config, field)!r}: unknown {unknown}; choose from {list(known)}."
            )
    fs = [int(v) for v in _split(config.num_byzantine)]
    for f in fs:
        if not 0 <= 2 * f < config.base.num_workers:
            raise ValueError(
                f"config.num_byzantine has f={f}: needs 0 <= f < base.num_workers / 2 "
                f"= {config.base.num_workers / 2:g}."
            )
    return attacks, [(a, v) for a in aggregators for v in variants], fs


def cell_config(config, f: int, attack: str, aggregator: str, variant: str):
    cfg = copy.deepcopy(config.base)
    cfg.method = "robust"
    cfg.num_byzantine = f
    cfg.label = f"{aggregator}{ROW_SUFFIX[variant]}/{attack}"
    cfg.hparams.robust.update(dict(attack=attack, aggregator=aggregator, **VARIANTS[variant]))
    return cfg


def run_grid(config, workdir: str | None, verbose: bool = True) -> dict:
    attacks, rows, fs = grid_cells(config)
    labels = [agg + ROW_SUFFIX[var] for agg, var in rows]
    total, done, start = len(fs) * len(rows) * len(attacks), 0, time.perf_counter()
    results = {}
    out = {"attacks": attacks, "rows": labels, "tables": {}}
    for f in fs:
        table = np.full((len(rows), len(attacks)), np.nan)
        for i, (agg, var) in enumerate(rows):
            for j, attack in enumerate(attacks):
                cfg = cell_config(config, f, attack, agg, var)
                table[i, j] = train.train_and_evaluate(cfg, None, verbose=False)["summary"]["test_accuracy"]
                done += 1
                elapsed = time.perf_counter() - start
                eta = elapsed / done * (total - done)
                if verbose:
                    print(
                        f"[{done}/{total}] f={f} {labels[i]:<26} {attack:<10} acc {table[i, j]:.4f} | "
                        f"{elapsed:.0f}s, ETA {eta:.0f}s",
                        flush=True,
                    )
                out["tables"][str(f)] = table.tolist()
                if workdir:
                    os.makedirs(workdir, exist_ok=True)
                    with open(os.path.join(workdir, "results.json"), "w") as fh:
                        json.dump(out, fh, indent=1)
        results[f] = table
        print(f"\nTest accuracy, n={config.base.num_workers}, f={f} (rows: aggregator, columns: attack)")
        print(f"{'':<26}" + "".join(f"{a:>10}" for a in attacks))
        for row, vals in zip(labels, table):
            print(f"{row:<26}" + "".join(f"{v:>10.3f}" for v in vals))
        if workdir:
            os.makedirs(workdir, exist_ok=True)
            fig, ax = plt.subplots(figsize=(1.2 * len(attacks) + 3, 0.45 * len(rows) + 1.5))
            im = ax.imshow(table, vmin=0, vmax=1, cmap="viridis")
            ax.set_xticks(range(len(attacks)), attacks, rotation=30)
            ax.set_yticks(range(len(rows)), labels)
            for (i, j), v in np.ndenumerate(table):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w" if v < 0.6 else "k", fontsize=7)
            ax.set_title(f"digits test accuracy, n={config.base.num_workers}, f={f}")
            fig.colorbar(im)
            fig.tight_layout()
            fig.savefig(os.path.join(workdir, f"heatmap_f{f}.png"), dpi=110)
            plt.close(fig)
    return out


def main(argv):
    del argv
    f = flags.FLAGS
    path = config_flags.get_config_filename(f["config"]).split(":")[0]
    run_grid(f.config, f.workdir or os.path.join("runs", os.path.splitext(os.path.basename(path))[0]))


if __name__ == "__main__":
    config_flags.DEFINE_config_file(
        "config", os.path.join(os.path.dirname(__file__), "configs", "robustness.py"), "Grid config."
    )
    flags.DEFINE_string("workdir", None, "Output folder (default: runs/<config name>).")
    app.run(main)
