"""Test loss against simulated wall time for a straggler comparison (``digits_stragglers``).

  python -m experiments.plot_stragglers [runs/digits_stragglers]

Reads ``<workdir>/results.json`` (written by ``experiments.compare``) and writes
``<workdir>/simulated_time.png``: one curve per run with a ``simulated_time`` in its history, and a
table of the simulated seconds to the config's target accuracy.
"""

from __future__ import annotations

import json
import os
import sys


def time_to_accuracy(history, target):
    """The simulated time of the first evaluation at or above ``target`` test accuracy, or None."""
    return next((r["simulated_time"] for r in history if r["test_accuracy"] >= target), None)


def main(workdir: str = "runs/digits_stragglers") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(os.path.join(workdir, "results.json")) as f:
        results = json.load(f)
    target = results["config"]["target_accuracy"]
    fig, ax = plt.subplots(figsize=(6, 4))
    print(f"{'run':<12} {'steps':>6} {'sim s':>9} {'test acc':>9} {f'sim s to {target:.0%}':>14}")
    for name, history in results["histories"].items():
        if not history or "simulated_time" not in history[-1]:
            continue
        ax.plot([r["simulated_time"] for r in history], [r["test_loss"] for r in history], label=name)
        reach = time_to_accuracy(history, target)
        last = history[-1]
        reach_s = "not reached" if reach is None else f"{reach:.1f}"
        print(
            f"{name:<12} {last['step']:>6} {last['simulated_time']:>9.1f} {last['test_accuracy']:>9.4f} "
            f"{reach_s:>14}"
        )
    ax.set_xlabel("simulated wall time (s)")
    ax.set_ylabel("test loss")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    out = os.path.join(workdir, "simulated_time.png")
    fig.savefig(out, dpi=120)
    print(f"Wrote {out}")


if __name__ == "__main__":
    main(*sys.argv[1:2])
