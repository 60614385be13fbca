"""The main job: train one model under several methods and compare them.

Usage::

  python -m experiments.compare                       # default: digits, 8 workers -> runs/compare
  python -m experiments.compare --config.methods=exact_mean,local_only
  python -m experiments.compare --config=experiments/configs/compression_sweep.py  # runs/compression_sweep
  python -m experiments.compare --list                # fields, methods, presets

Prints a table (method, final train loss, test accuracy, bytes sent per worker, wall time,
time-to-target under the config's network model), and writes ``results.json`` and ``plot.png`` to
``--workdir`` (default ``runs/<config name>``), and each method's ``metrics.json`` under
``<workdir>/<method>/``. Every method name is checked before any method trains.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from experiments import listing, methods, plotting, train
from experiments.configs import default as default_config


def modeled_time_to_target(history, config, summary) -> float | None:
    """Seconds to reach ``config.target_accuracy`` on the modeled cluster, or None.

    At the first evaluation ``r`` at or above the target:
    ``r.step * compute + r.bytes_per_worker * 8 / bandwidth + r.comm_rounds * latency``.
    ``compute`` (one worker's step) is the *steady-state* time per simulated step divided by the
    number of workers (the simulation runs them all on this machine); compilation is excluded (the
    first call of each chunk shape is not timed as compute). ``comm_rounds`` counts the steps on
    which the worker sent bytes.
    """
    step_time = summary.get("step_time")
    if step_time is None:  # no steady-state measurement (should not happen): fall back to wall time
        step_time = summary["wall_time"] / summary["step"]
    compute = step_time / config.base.num_workers
    for record in history:
        if record["test_accuracy"] >= config.target_accuracy:
            comm = record["bytes_per_worker"] * 8 / (config.bandwidth_gbit * 1e9)
            comm += record.get("comm_rounds", 0) * config.latency_ms / 1e3
            return record["step"] * compute + comm
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


def _split(methods_field) -> list[str]:
    if isinstance(methods_field, str):
        return [m.strip() for m in methods_field.split(",") if m.strip()]
    return [str(m) for m in methods_field]


def validate_comparison(config) -> None:
    """Checks the comparison's own fields (errors name the field)."""
    if not 0 <= config.target_accuracy <= 1:
        raise ValueError(f"config.target_accuracy={config.target_accuracy!r}: must be in [0, 1].")
    if not (math.isfinite(config.bandwidth_gbit) and config.bandwidth_gbit > 0):
        raise ValueError(f"config.bandwidth_gbit={config.bandwidth_gbit!r}: must be a finite number > 0.")
    if not (math.isfinite(config.latency_ms) and config.latency_ms >= 0):
        raise ValueError(f"config.latency_ms={config.latency_ms!r}: must be a finite number >= 0.")


def run_configs(config) -> list[tuple[str, object]]:
    """``(label, training config)`` per entry of ``config.methods``, every one validated.

    An entry is a name in ``config.variants`` (a method plus its field values), a preset or a
    method. Any unknown name or bad field fails here, before anything trains.
    """
    validate_comparison(config)
    names = _split(config.methods)
    if not names:
        raise ValueError(
            "config.methods is empty: list method names, e.g. --config.methods=exact_mean,local_only."
        )
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"config.methods lists {duplicates} more than once.")
    variants = config.variants
    target = config.loss_target_method
    if target and target not in names:
        raise ValueError(f"config.loss_target_method={target!r} is not among config.methods {names}.")
    runs = []
    for name in names:
        cfg = copy.deepcopy(config.base)
        cfg.label = name
        if name in variants:
            variant = dict(variants[name])
            cfg.method = variant.pop("method", None) or ""
            if cfg.method not in methods.METHODS:
                raise ValueError(
                    f"config.variants.{name}.method={cfg.method!r}: must be a registered method "
                    f"({', '.join(sorted(methods.METHODS))})."
                )
            fields = cfg.hparams[cfg.method]
            unknown = sorted(set(variant) - set(fields.keys()))
            if unknown:
                raise ValueError(
                    f"config.variants.{name} sets {unknown}, which {cfg.method} does not have; its fields: "
                    f"{sorted(fields.keys())}."
                )
            for key, value in variant.items():
                fields[key] = value
        else:
            try:
                methods.resolve(name)
            except ValueError as e:
                raise ValueError(f"config.methods: {e}") from None
            cfg.method = name
        cfg = cfg.copy_and_resolve_references()
        train.validate(cfg, prefix="config.base")
        methods.build(cfg, prefix="config.base")  # factory errors surface now, not after other runs
        runs.append((name, cfg))
    return runs


def run_comparison(
    config, workdir: str | None, *, resume: bool = False, overwrite: bool = False, verbose: bool = True
) -> list[dict]:
    runs = run_configs(config)
    rows, histories = [], {}
    for name, cfg in runs:
        result = train.train_and_evaluate(
            cfg,
            os.path.join(workdir, name) if workdir else None,
            resume=resume,
            overwrite=overwrite,
            verbose=verbose,
        )
        summary = result["summary"]
        summary["time_to_target"] = modeled_time_to_target(result["history"], config, summary)
        summary["final_val_loss"] = summary["test_loss"]  # the held-out loss (validation text for the LM)
        rows.append(summary)
        histories[name] = result["history"]
    if config.loss_target_method:
        add_steps_to_reference_loss(rows, histories, config.loss_target_method)
    print()
    print(format_table(rows, config))
    print(footer(rows, config))
    if workdir:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump({"config": config.to_dict(), "rows": rows, "histories": histories}, f, indent=1)
        plotting.plot_runs(histories, os.path.join(workdir, "plot.png"))
        print(f"Wrote {workdir}/results.json and {workdir}/plot.png")
    return rows


def footer(rows, config) -> str:
    compile_s = sum(r.get("compile_time") or 0.0 for r in rows)
    return (
        f"\nModel: {config.base.num_workers} workers, {config.base.dataset}/{config.base.model}. "
        f"Time-to-target = steps x compute per worker-step + bytes / {config.bandwidth_gbit:g} Gbit/s"
        f" + {config.latency_ms:g} ms x communicating steps.\n"
        "Compute per worker-step = steady-state step time / workers: compilation excluded (the first "
        f"call of each chunk shape is not counted; {compile_s:.1f}s in all here). 'wall s' includes "
        "compilation and evaluation."
    )


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    f = flags.FLAGS
    config = f.config
    if f.list:
        listing.print_listing(config, default_config.COMPARISON_DOCS, "Comparison config")
        return
    path = config_flags.get_config_filename(f["config"]).split(":")[0]
    workdir = f.workdir or os.path.join("runs", os.path.splitext(os.path.basename(path))[0])
    try:
        run_comparison(config, workdir, resume=f.resume, overwrite=f.overwrite)
    except (ValueError, train.RunExistsError, train.NoIntactCheckpointError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    config_flags.DEFINE_config_file(
        "config", os.path.join(os.path.dirname(__file__), "configs", "compare.py"), "Comparison config."
    )
    flags.DEFINE_string("workdir", None, "Output folder (default: runs/<config name>).")
    flags.DEFINE_bool("resume", False, "Continue each method from its newest intact checkpoint.")
    flags.DEFINE_bool("overwrite", False, "Delete earlier checkpoints in the workdir and start over.")
    flags.DEFINE_bool(
        "list", False, "Print the config's fields, the registered methods and presets, and exit."
    )
    app.run(main)
