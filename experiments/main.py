"""Train and evaluate one method: the Flax-examples style binary.

  python -m experiments.main                                   # configs/default.py: digits MLP, exact mean
  python -m experiments.main --config=experiments/configs/charlm.py --config.method=diloco_h50
  python -m experiments.main --config.method=top_k --config.hparams.top_k.ratio=0.05
  python -m experiments.main --list                            # config fields, methods, presets

Writes ``metrics.json`` and ``plot.png`` (and, with ``--config.checkpoint_every``, verified
checkpoints) to ``--workdir``, by default ``runs/<config name>/<method>``. A workdir holding
checkpoints of an earlier run is refused unless ``--resume`` (continue it; only ``steps`` may
change) or ``--overwrite`` (start over).

Multi-process (multi-host) runs: every process runs this same program with
``--coordinator_address``, ``--num_processes`` and ``--process_id`` (``experiments.launch`` starts
them on one machine); ``--peer_timeout`` bounds the wait for the other processes.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time

from absl import app, flags, logging
from ml_collections import config_flags

from experiments import listing, train
from experiments.configs import default as default_config

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")
FLAGS = flags.FLAGS

config_flags.DEFINE_config_file("config", os.path.join(CONFIG_DIR, "default.py"), "Training config file.")
flags.DEFINE_string("workdir", None, "Output folder (default: runs/<config name>/<method>).")
flags.DEFINE_bool("resume", False, "Continue from the newest intact checkpoint in workdir.")
flags.DEFINE_bool("overwrite", False, "Delete the workdir's checkpoints of an earlier run and start over.")
flags.DEFINE_bool("list", False, "Print the config's fields, the registered methods and presets, and exit.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs).")
flags.DEFINE_integer("num_processes", 1, "Number of processes (jax.distributed.initialize).")
flags.DEFINE_integer("process_id", 0, "This process's index.")
flags.DEFINE_integer(
    "peer_timeout", 300, "Seconds to wait for all processes to connect (multi-process runs)."
)
flags.DEFINE_integer("kill_at_step", None, "Fault injection: SIGKILL this process after that step.")


def config_name(flag_name: str = "config") -> str:
    """The config file's stem (``experiments/configs/charlm.py`` -> ``charlm``)."""
    path = config_flags.get_config_filename(FLAGS[flag_name]).split(":")[0]
    return os.path.splitext(os.path.basename(path))[0]


def _wait_for_coordinator(address: str, timeout: float) -> bool:
    """Polls ``host:port`` until it accepts a TCP connection; False after ``timeout`` seconds."""
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, int(port)), timeout=1.0):
                return True
        except OSError:
            time.sleep(0.5)
    return False


def connect_processes(address: str, num_processes: int, process_id: int, timeout: int) -> None:
    """``jax.distributed.initialize`` with a log of what this process waits for, bounded by ``timeout``.

    A process other than 0 first waits for the coordinator's port to open (and exits 1 with a clear
    message if it never does); while connecting, a line every 10 s says what is still awaited.
    (JAX aborts the process if the peers do not all register in time; the log says why.)
    """
    import jax

    def say(msg):
        print(f"process {process_id}/{num_processes}: {msg}", flush=True)

    if not address:
        raise app.UsageError("--num_processes > 1 needs --coordinator_address=host:port (process 0's).")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    start = time.monotonic()
    if process_id == 0:
        say(f"hosting the coordinator at {address}; waiting up to {timeout}s for {num_processes} processes")
    else:
        say(f"waiting up to {timeout}s for the coordinator (process 0) at {address}")
        if not _wait_for_coordinator(address, timeout):
            say(
                f"the coordinator at {address} did not open within {timeout}s: start process 0 (or check "
                "--coordinator_address), or raise --peer_timeout."
            )
            sys.exit(1)
        say(f"coordinator reachable; registering with it (all {num_processes} processes must join)")
    done = threading.Event()

    def heartbeat():
        while not done.wait(10.0):
            say(
                f"still waiting after {time.monotonic() - start:.0f}s for all {num_processes} processes to "
                f"register at {address} (timeout {timeout}s, --peer_timeout)"
            )

    threading.Thread(target=heartbeat, daemon=True).start()
    try:
        remaining = max(1, int(timeout - (time.monotonic() - start)))
        jax.distributed.initialize(
            coordinator_address=address,
            num_processes=num_processes,
            process_id=process_id,
            initialization_timeout=remaining,
        )
    finally:
        done.set()
    say(f"all {num_processes} processes connected after {time.monotonic() - start:.1f}s")


def run() -> None:
    app.run(main)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # progress lines only; no per-save orbax logs
    config = FLAGS.config
    if FLAGS.list:
        listing.print_listing(config, default_config.FIELD_DOCS, f"Training config {config_name()}")
        return
    if FLAGS.num_processes > 1:
        connect_processes(
            FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id, FLAGS.peer_timeout
        )
        config.execution = "data_parallel"
    workdir = FLAGS.workdir or os.path.join("runs", config_name(), config.label or config.method)
    try:
        train.train_and_evaluate(
            config, workdir, resume=FLAGS.resume, overwrite=FLAGS.overwrite, kill_at_step=FLAGS.kill_at_step
        )
    except (ValueError, train.RunExistsError, train.NoIntactCheckpointError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    if FLAGS.process_id == 0:
        print(f"Wrote {workdir}/metrics.json and {workdir}/plot.png", flush=True)


if __name__ == "__main__":
    run()
