"""The main job: train one model under several methods and compare them.

Usage::

  python -m experiments.compare                       # default: digits, 8 workers
  python -m experiments.compare --config.methods=exact_mean,local_only --workdir=runs/compare

Prints a table (method, final train loss, test accuracy, bytes sent per
worker, wall time, time-to-target under the config's bandwidth model),
and writes ``results.json`` and ``plot.png`` to ``workdir``.
"""

from __future__ import annotations

import copy
import json
import os

from absl import app, flags
from ml_collections import config_flags

from experiments import plotting, train


def modeled_time_to_target(history, config, summary) -> float | None:
    """Seconds to reach ``config.target_accuracy`` on the modeled cluster, or None.

    One worker's compute per step is the measured wall time per simulated
    step divided by the number of workers (the simulation runs them all on
    this machine); communication is bytes / bandwidth (+ latency per step).
    """
    steps = summary["step"]
    compute = summary["wall_time"] / steps / config.base.num_workers
    bytes_per_step = summary["bytes_per_worker"] / steps
    comm = bytes_per_step * 8 / (config.bandwidth_gbit * 1e9)
    if bytes_per_step > 0:
        comm += config.latency_ms / 1e3
    for record in history:
        if record["test_accuracy"] >= config.target_accuracy:
            return record["step"] * (compute + comm)
    return None


def steps_to_loss(history, target: float) -> int | None:
    """The first evaluated step whose test loss is at or below ``target``, or None."""
    return next((r["step"] for r in history if r["test_loss"] <= target), None)


def add_steps_to_reference_loss(rows, histories, reference: str) -> None:
    """Adds, per row, the steps to reach ``reference``'s final test loss and the ratio to its steps."""
    ref = next((r for r in rows if r["method"] == reference), None)
    if ref is None:
        raise ValueError(f"loss_target_method={reference!r} is not among the compared methods.")
    for r in rows:
        steps = steps_to_loss(histories[r["method"]], ref["test_loss"])
        r["steps_to_reference_loss"] = steps
        r["step_ratio_to_reference"] = None if steps is None else steps / ref["step"]


def format_table(rows, config) -> str:
    target = f"t->{config.target_accuracy:.0%} @{config.bandwidth_gbit:g}Gb/s"
    by_loss = "steps_to_reference_loss" in rows[0]
    width = max(22, *(len(r["method"]) for r in rows))
    loss_head = f" {'steps->ref loss':>16}" if by_loss else ""
    head = (
        f"{'method':<{width}} {'train loss':>10} {'test loss':>9} {'test acc':>9} {'MiB/worker':>11} "
        f"{'fewer B':>9} {'wall s':>7} {target:>16}{loss_head}"
    )
    lines = [head, "-" * len(head)]
    ref = next((r["bytes_per_worker"] for r in rows if r["method"] == "exact_mean"), None)
    for r in rows:
        ratio = f"{ref / r['bytes_per_worker']:.1f}x" if ref and r["bytes_per_worker"] else "-"
        ttt = f"{r['time_to_target']:.3f}s" if r["time_to_target"] is not None else "not reached"
        loss_col = ""
        if by_loss:
            steps = r["steps_to_reference_loss"]
            reached = "not reached" if steps is None else f"{steps} ({r['step_ratio_to_reference']:.2f}x)"
            loss_col = f" {reached:>16}"
        lines.append(
            f"{r['method']:<{width}} {r['train_loss']:>10.4f} {r['test_loss']:>9.4f} "
            f"{r['test_accuracy']:>9.4f} "
            f"{r['bytes_per_worker'] / 2**20:>11.3f} {ratio:>9} {r['wall_time']:>7.1f} {ttt:>16}{loss_col}"
        )
    return "\n".join(lines)


def run_comparison(config, workdir: str | None) -> list[dict]:
    methods = config.methods
    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",") if m.strip()]
    rows, histories = [], {}
    for name in methods:
        cfg = copy.deepcopy(config.base)
        cfg.method = name
        result = train.train_and_evaluate(cfg, os.path.join(workdir, name) if workdir else None)
        summary = result["summary"]
        summary["time_to_target"] = modeled_time_to_target(result["history"], config, summary)
        rows.append(summary)
        histories[name] = result["history"]
    if config.get("loss_target_method"):
        add_steps_to_reference_loss(rows, histories, config.loss_target_method)
    print()
    print(format_table(rows, config))
    print(
        f"\nModel: {config.base.num_workers} workers, {config.base.dataset}/{config.base.model}; "
        f"time-to-target = steps x (compute per worker-step + bytes/{config.bandwidth_gbit:g} Gbit/s"
        f" + {config.latency_ms:g} ms latency per communicating step)."
    )
    if workdir:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump({"config": config.to_dict(), "rows": rows, "histories": histories}, f, indent=1)
        plotting.plot_runs(histories, os.path.join(workdir, "plot.png"))
        print(f"Wrote {workdir}/results.json and {workdir}/plot.png")
    return rows


def main(argv):
    del argv
    config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
    run_comparison(config, workdir)


if __name__ == "__main__":
    config_flags.DEFINE_config_file(
        "config", os.path.join(os.path.dirname(__file__), "configs", "compare.py"), "Comparison config."
    )
    flags.DEFINE_string("workdir", "runs/compare", "Output folder.")
    app.run(main)
