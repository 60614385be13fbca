"""Loss/accuracy vs steps and vs bytes on the wire."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_runs(histories: dict[str, list[dict]], path: str, metric: str = "test_accuracy") -> None:
    """Three panels: train loss vs steps, ``metric`` vs steps, ``metric`` vs bytes per worker."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name, hist in histories.items():
        steps = [r["step"] for r in hist]
        axes[0].plot(steps, [r["train_loss"] for r in hist], label=name)
        axes[1].plot(steps, [r[metric] for r in hist], label=name)
        if hist[-1]["bytes_per_worker"] > 0:  # methods that never communicate have no point here
            mib = [max(r["bytes_per_worker"], 1) / 2**20 for r in hist]
            axes[2].plot(mib, [r[metric] for r in hist], marker=".", label=name)
    axes[0].set(xlabel="step", ylabel="train loss", yscale="log")
    axes[1].set(xlabel="step", ylabel=metric)
    axes[2].set(xlabel="MiB sent per worker", ylabel=metric, xscale="log")
    for ax in axes[1:]:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
