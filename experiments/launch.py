"""Launch ``experiments.main`` as several CPU processes on this machine (loopback).

Each process gets ``--devices_per_process`` forced CPU devices; together they
form one ``jax.distributed`` job, data-parallel over all devices (collectives
over gloo). If any process dies, the launcher ends the others and exits
non-zero (128 + N when a process was killed by signal N, as a shell reports it); rerun with
``--resume`` to continue from the last checkpoint. Each process logs what it waits for while the
job forms; ``--peer_timeout`` bounds that wait (seconds).

  python -m experiments.launch --num_processes=2 -- \
      --config=experiments/configs/digits.py --workdir=runs/mp --config.checkpoint_every=50

Fault injection for tests: ``--kill_process=1 --kill_at_step=30`` makes
process 1 SIGKILL itself after step 30.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def exit_status(returncode: int) -> int:
    """A child's return code as a process exit status: a signal N (``-N``) becomes ``128 + N``."""
    return 128 - returncode if returncode < 0 else returncode


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name} (exit status {exit_status(returncode)})"
    return f"exit status {returncode}"


def launch(
    train_args: list[str],
    num_processes: int = 2,
    devices_per_process: int = 4,
    kill_process: int | None = None,
    kill_at_step: int | None = None,
    timeout: float = 600.0,
    cwd: str | None = None,
    peer_timeout: int = 300,
) -> tuple[int, list[str]]:
    """Runs the job; returns (exit status, per-process output).

    The status is 0, the first failing process's status (``128 + N`` for a process killed by
    signal N), or 124 when ``timeout`` seconds passed.
    """
    address = f"127.0.0.1:{free_port()}"
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}")
    env["JAX_PLATFORMS"] = "cpu"
    logs, procs = [], []
    for i in range(num_processes):
        args = [
            sys.executable,
            "-m",
            "experiments.main",
            f"--coordinator_address={address}",
            f"--peer_timeout={peer_timeout}",
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
    code, ended = 0, set()
    while any(p.poll() is None for p in procs):
        failed = [p for p in procs if p.poll() not in (None, 0)]
        if failed or time.monotonic() > deadline:
            code = exit_status(failed[0].returncode) if failed else 124
            for i, p in enumerate(procs):
                if p.poll() is None:
                    p.kill()
                    ended.add(i)
            break
        time.sleep(0.2)
    for p in procs:
        p.wait()
    if not code:
        code = next((exit_status(p.returncode) for p in procs if p.returncode), 0)
    outputs = []
    for i, (log, p) in enumerate(zip(logs, procs)):
        log.seek(0)
        text = log.read()
        log.close()
        if i in ended:
            why = "the job timed out" if code == 124 else "another process failed"
            text += f"\n[launcher] process {i}: ended by the launcher because {why}\n"
        elif p.returncode:
            text += f"\n[launcher] process {i}: {describe_exit(p.returncode)}\n"
        outputs.append(text)
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
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds for the whole job")
    parser.add_argument(
        "--peer_timeout", type=int, default=300, help="seconds each process waits for the others to join"
    )
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
        peer_timeout=args.peer_timeout,
    )
    progress = [ln for ln in outputs[0].splitlines() if ln.startswith("[")]
    print("\n".join(progress))
    if code:
        print(f"job failed (exit status {code})")
        for i, out in enumerate(outputs):
            print(f"--- process {i}, last lines ---")
            print("\n".join(out.splitlines()[-15:]))
    sys.exit(code)


if __name__ == "__main__":
    main()
