"""Loss vs bytes on the wire for a finished comparison: the table and the Pareto front.

  python -m experiments.pareto runs/charlm_composition [--reference=exact_mean]

Reads every method's ``<workdir>/<method>/metrics.json`` (written by ``python -m
experiments.compare`` as each method finishes, so a comparison run in several parts, or cut short,
is read whole) and prints, per method: final validation loss, its gap to the reference
(synchronous data parallel), bytes sent per worker, how many times fewer than the reference, and
the modelled time to reach the reference's final loss within 2% on two networks (1 Gbit/s and 100
Mbit/s, 10 ms per communicating step):

  time = steps x compute per worker-step + bytes x 8 / bandwidth + communicating steps x latency,

with compute the measured steady-state time of one simulated step divided by the number of
workers (compilation excluded). It writes ``<workdir>/pareto.png`` (loss against log bytes, the
Pareto front drawn through the non-dominated methods), ``<workdir>/pareto.md`` and
``<workdir>/pareto.json`` (one row per method: ``method``, ``final_val_loss``, ``bytes_per_worker``...).
"""

from __future__ import annotations

import json
import os

from absl import app, flags

NETWORKS = ((1.0, 10.0), (0.1, 10.0))  # (Gbit/s, ms per communicating step)
TOLERANCE = 0.02

_REFERENCE = flags.DEFINE_string("reference", "exact_mean", "the data-parallel baseline's label")


def time_to_loss(history, target, compute, gbit, latency_ms):
    """Modelled seconds until the first evaluation at or below ``target`` (None: never)."""
    for r in history:
        if r["test_loss"] <= target:
            comm = r["bytes_per_worker"] * 8 / (gbit * 1e9) + r.get("comm_rounds", 0) * latency_ms / 1e3
            return r["step"] * compute + comm
    return None


def pareto_front(rows):
    """Labels of the rows no other row beats on both loss and bytes."""
    front = []
    for r in rows:
        dominated = any(
            o is not r
            and o["final_val_loss"] <= r["final_val_loss"]
            and o["bytes_per_worker"] <= r["bytes_per_worker"]
            and (o["final_val_loss"], o["bytes_per_worker"]) != (r["final_val_loss"], r["bytes_per_worker"])
            for o in rows
        )
        if not dominated:
            front.append(r["method"])
    return front


def load(workdir: str) -> dict:
    """``{"rows", "histories", "workers"}`` from the per-method ``metrics.json`` files under ``workdir``."""
    rows, histories, workers = [], {}, None
    for name in sorted(os.listdir(workdir)):
        path = os.path.join(workdir, name, "metrics.json")
        if os.path.isfile(path):
            with open(path) as f:
                metrics = json.load(f)
            rows.append(metrics["summary"])
            histories[metrics["summary"]["method"]] = metrics["history"]
            workers = metrics["config"]["num_workers"]
    if not rows:
        raise FileNotFoundError(f"no <method>/metrics.json under {workdir}: run experiments.compare first.")
    return {"rows": rows, "histories": histories, "workers": workers}


def analyse(results: dict, reference: str) -> list[dict]:
    """One row per method with the table's columns (see the module docstring)."""
    rows_in = results["rows"]
    workers = results["workers"]
    ref = next((r for r in rows_in if r["method"] == reference), None)
    if ref is None:
        raise ValueError(f"--reference={reference!r} is not among {[r['method'] for r in rows_in]}.")
    target = ref["test_loss"] * (1 + TOLERANCE)
    out = []
    for r in rows_in:
        compute = (r.get("step_time") or r["wall_time"] / r["step"]) / workers
        row = {
            "method": r["method"],
            "final_val_loss": r["test_loss"],
            "gap": r["test_loss"] / ref["test_loss"] - 1,
            "bytes_per_worker": r["bytes_per_worker"],
            "fewer": ref["bytes_per_worker"] / r["bytes_per_worker"]
            if r["bytes_per_worker"]
            else float("inf"),
        }
        history = results["histories"][r["method"]]
        for gbit, ms in NETWORKS:
            row[f"ttt_{gbit:g}gbit"] = time_to_loss(history, target, compute, gbit, ms)
        out.append(row)
    return out


def _seconds(value):
    return "never" if value is None else f"{value:.1f}"


def table(rows, reference: str) -> str:
    head = (
        "| method | final val loss | gap to exact mean | MiB / worker | × fewer bytes | "
        "time to loss ≤ ref·1.02, 1 Gbit/s + 10 ms (s) | same, 100 Mbit/s + 10 ms (s) |\n"
        "| --- | --- | --- | --- | --- | --- | --- |"
    )
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['final_val_loss']:.4f} | {100 * r['gap']:+.2f}% | "
            f"{r['bytes_per_worker'] / 2**20:.3f} | {r['fewer']:.0f}× | {_seconds(r['ttt_1gbit'])} | "
            f"{_seconds(r['ttt_0.1gbit'])} |"
        )
    for tol in (0.01, 0.02):
        within = [r for r in rows if r["gap"] <= tol and r["method"] != reference]
        best = max(within, key=lambda r: r["fewer"], default=None)
        verdict = f"**{best['method']}**, {best['fewer']:.0f}× fewer bytes" if best else "none"
        lines.append(
            f"\nMost byte-efficient method within {100 * tol:.0f}% of {reference}'s loss: {verdict}."
        )
    lines.append(f"Pareto front (loss vs bytes): {', '.join(pareto_front(rows))}.")
    return "\n".join(lines)


def plot(rows, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    front = set(pareto_front(rows))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        x = max(r["bytes_per_worker"], 1)
        ax.scatter(x, r["final_val_loss"], s=40, zorder=3, marker="o" if r["method"] in front else "x")
        ax.annotate(
            r["method"], (x, r["final_val_loss"]), textcoords="offset points", xytext=(4, 4), fontsize=7
        )
    pts = sorted((max(r["bytes_per_worker"], 1), r["final_val_loss"]) for r in rows if r["method"] in front)
    ax.plot(*zip(*pts), "k--", lw=1, label="Pareto front")
    ref = min(r["final_val_loss"] / (1 + r["gap"]) for r in rows)  # the reference's loss
    ax.axhline(
        ref * (1 + TOLERANCE), color="grey", lw=0.8, ls=":", label=f"reference + {100 * TOLERANCE:.0f}%"
    )
    ax.set_xscale("log")
    ax.set_xlabel("bytes sent per worker (log)")
    ax.set_ylabel("final validation loss")
    ax.set_title("Loss vs bytes on the wire")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv):
    if len(argv) != 2:
        raise app.UsageError("usage: python -m experiments.pareto <workdir with results.json>")
    workdir = argv[1]
    rows = analyse(load(workdir), _REFERENCE.value)
    text = table(rows, _REFERENCE.value)
    print(text)
    with open(os.path.join(workdir, "pareto.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(workdir, "pareto.json"), "w") as f:
        json.dump(rows, f, indent=1)
    plot(rows, os.path.join(workdir, "pareto.png"))
    print(f"Wrote {workdir}/pareto.md, pareto.json and pareto.png")


if __name__ == "__main__":
    app.run(main)
