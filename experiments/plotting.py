"""Loss/accuracy vs steps and vs bytes on the wire.

One colour (and line style) per method, the same in every panel; each panel's legend sits below
it, outside the data area; axes are logarithmic where values span decades (train loss; bytes,
when the sending methods' totals span more than a decade). Methods that send nothing cannot sit on
a log bytes axis: they appear in the bytes panel as a dashed horizontal line at their final metric,
labelled ``(0 bytes)``.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STYLES = ("-", "--", ":", "-.")


def method_styles(names) -> dict[str, dict]:
    """A fixed ``{color, linestyle}`` per method, by its position in ``names`` (tab10, then styles)."""
    cmap = plt.get_cmap("tab10")
    return {
        name: {"color": cmap(i % 10), "linestyle": STYLES[(i // 10) % len(STYLES)]}
        for i, name in enumerate(names)
    }


def make_figure(histories: dict[str, list[dict]], metric: str = "test_accuracy"):
    """The three-panel figure (train loss vs steps, ``metric`` vs steps, ``metric`` vs MiB sent)."""
    styles = method_styles(list(histories))
    ncol = min(3, max(1, (len(histories) + 4) // 5))
    rows_of_legend = -(-len(histories) // ncol)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2 + 0.22 * rows_of_legend))
    sends = {n: h for n, h in histories.items() if h and h[-1]["bytes_per_worker"] > 0}
    for name, hist in histories.items():
        steps = [r["step"] for r in hist]
        style = styles[name]
        axes[0].plot(steps, [r["train_loss"] for r in hist], label=name, **style)
        axes[1].plot(steps, [r[metric] for r in hist], label=name, **style)
        if name in sends:
            mib = [max(r["bytes_per_worker"], 1) / 2**20 for r in hist]
            axes[2].plot(mib, [r[metric] for r in hist], marker=".", label=name, **style)
    for name, hist in histories.items():  # after the senders, so the x range is known
        if name not in sends and hist:
            style = {**styles[name], "linestyle": "--"}
            axes[2].axhline(hist[-1][metric], label=f"{name} (0 bytes)", linewidth=1.0, **style)
    losses = [r["train_loss"] for h in histories.values() for r in h if r["train_loss"] > 0]
    axes[0].set(xlabel="step", ylabel="train loss", yscale="log" if losses else "linear")
    axes[1].set(xlabel="step", ylabel=metric)
    totals = [max(r["bytes_per_worker"] for r in h) for h in sends.values()]
    spans_decades = bool(totals) and max(totals) > 10 * min(
        r["bytes_per_worker"] for h in sends.values() for r in h if r["bytes_per_worker"] > 0
    )
    axes[2].set(xlabel="MiB sent per worker", ylabel=metric, xscale="log" if spans_decades else "linear")
    for ax in axes:
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=ncol, frameon=False)
    fig.tight_layout()
    return fig, axes


def plot_runs(histories: dict[str, list[dict]], path: str, metric: str = "test_accuracy") -> dict[str, dict]:
    """Writes the three-panel figure to ``path``; returns each method's ``{color, linestyle}``."""
    fig, _ = make_figure(histories, metric)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return method_styles(list(histories))
