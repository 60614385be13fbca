"""Launch ``experiments.train`` as several CPU processes on this machine (loopback).

Each process gets ``--devices_per_process`` forced CPU devices; together they
form one ``jax.distributed`` job, data-parallel over all devices (collectives
over gloo). If any process dies, the launcher ends the others and exits
non-zero; rerun with ``--resume`` to continue from the last checkpoint.

  python -m experiments.launch --num_processes=2 -- \
      --config=experiments/configs/digits.py --workdir=runs/mp --config.checkpoint_every=50

Fault injection for tests: ``--kill_process=1 --kill_at_step=30`` makes
process 1 SIGKILL itself after step 30.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    train_args: list[str],
    num_processes: int = 2,
    devices_per_process: int = 4,
    kill_process: int | None = None,
    kill_at_step: int | None = None,
    timeout: float = 600.0,
    cwd: str | None = None,
) -> tuple[int, list[str]]:
    """Runs the job; returns (exit code, per-process output)."""
    address = f"127.0.0.1:{free_port()}"
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}")
    env["JAX_PLATFORMS"] = "cpu"
    logs, procs = [], []
    for i in range(num_processes):
        args = [
            sys.executable,
            "-m",
            "experiments.train",
            f"--coordinator_address={address}",
            f"--num_processes={num_processes}",
            f"--process_id={i}",
            *train_args,
        ]
        if kill_process == i and kill_at_step is not None:
            args.append(f"--kill_at_step={kill_at_step}")
        log = open(os.path.join(_log_dir(), f"process_{i}_{os.getpid()}.log"), "w+")
        logs.append(log)
        procs.append(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd))
    deadline = time.monotonic() + timeout
    code = 0
    while any(p.poll() is None for p in procs):
        failed = [p for p in procs if p.poll() not in (None, 0)]
        if failed or time.monotonic() > deadline:
            code = failed[0].returncode if failed else 124
            for p in procs:
                if p.poll() is None:
                    p.kill()
            break
        time.sleep(0.2)
    for p in procs:
        p.wait()
        code = code or p.returncode
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    return code, outputs


def _log_dir() -> str:
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), "optdist_launch")
    os.makedirs(path, exist_ok=True)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_processes", type=int, default=2)
    parser.add_argument("--devices_per_process", type=int, default=4)
    parser.add_argument("--kill_process", type=int, default=None)
    parser.add_argument("--kill_at_step", type=int, default=None)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("train_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    train_args = [a for a in args.train_args if a != "--"]
    code, outputs = launch(
        train_args,
        args.num_processes,
        args.devices_per_process,
        args.kill_process,
        args.kill_at_step,
        args.timeout,
    )
    progress = [ln for ln in outputs[0].splitlines() if ln.startswith("[")]
    print("\n".join(progress))
    if code:
        for i, out in enumerate(outputs):
            print(f"--- process {i}, last lines ---")
            print("\n".join(out.splitlines()[-15:]))
    sys.exit(code)


if __name__ == "__main__":
    main()
