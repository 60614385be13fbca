"""Output of the benchmark scripts: progress with an ETA, one aligned table, JSON written row by row.

A benchmark that runs past its time limit (``timeout`` in ``gpu.sh``) keeps every row measured so far:
:class:`Results` rewrites its JSON file (atomically) after each row, with ``"complete": false`` until
:meth:`Results.finish`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any


def _width(spec: str) -> int:
    digits = "".join(ch for ch in spec.lstrip("<>").split(".")[0] if ch.isdigit())
    return int(digits or 0)


def format_header(columns: Sequence[tuple[str, str, str]]) -> str:
    """The header line of :func:`format_row`'s columns."""
    return "".join(f"{h:<{_width(s)}}" if s.startswith("<") else f"{h:>{_width(s)}}" for h, _, s in columns)


def format_row(row: dict, columns: Sequence[tuple[str, str, str]]) -> str:
    """One table line; ``columns`` are ``(header, key, format spec)``, e.g. ``("ms", "ms", ">10.3f")``.

    A missing key or a None value prints as ``-`` (a row that failed, or a figure that does not apply).
    """
    cells = []
    for _, key, spec in columns:
        value = row.get(key)
        if value is None:
            cells.append(f"{'-':>{_width(spec)}}")
        else:
            cells.append(format(value, spec))
    return "".join(cells)


def print_rows(title: str, rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> None:
    """Prints ``title``, the header and one line per row.

    A format spec starting with ``<`` is left-aligned text, e.g. ``("method", "method", "<24")``;
    otherwise the header is right-aligned to the spec's width, e.g. ``("ms/step", "ms", ">10.3f")``.
    """
    print(title)
    print(format_header(columns))
    for row in rows:
        print(format_row(row, columns))
    sys.stdout.flush()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    """Counts finished items and prints ``[done/total] label  elapsed  ETA`` to stderr after each.

    The ETA is the mean time per finished item times the items left (items of one script are alike
    enough for that; the first, which compiles the most, makes it pessimistic early on).
    """

    def __init__(self, total: int, stream: Any = None):
        if total < 0:
            raise ValueError(f"total must be >= 0; got {total}.")
        self.total, self.done = total, 0
        self.start = time.perf_counter()
        self.stream = stream if stream is not None else sys.stderr

    def eta(self) -> float | None:
        """Seconds left (None before the first item)."""
        if not self.done:
            return None
        elapsed = time.perf_counter() - self.start
        return elapsed / self.done * max(self.total - self.done, 0)

    def step(self, label: str = "") -> None:
        self.done += 1
        elapsed = time.perf_counter() - self.start
        eta = self.eta()
        print(
            f"[{self.done}/{self.total}] {label}  elapsed {_duration(elapsed)}  ETA {_duration(eta or 0.0)}",
            file=self.stream,
            flush=True,
        )


class Results:
    """The rows of one benchmark run, written to ``path`` as JSON after every row.

    The file holds ``{"benchmark", "machine", "config", "complete", "rows"}``; ``complete`` turns true
    in :meth:`finish`, so a file left by a run that was stopped says so. ``path=None`` writes nothing.
    """

    def __init__(self, path: str | None, benchmark: str, machine: dict, config: dict | None = None):
        self.path = path
        self.payload: dict[str, Any] = {
            "benchmark": benchmark,
            "machine": machine,
            "config": dict(config or {}),
            "complete": False,
            "rows": [],
        }
        self._write()

    @property
    def rows(self) -> list[dict]:
        return self.payload["rows"]

    def add(self, row: dict) -> dict:
        self.rows.append(row)
        self._write()
        return row

    def finish(self, **extra: Any) -> dict:
        """Marks the run complete (``extra`` goes into the payload too) and writes the file."""
        self.payload.update(extra, complete=True)
        self._write()
        if self.path:
            print(f"wrote {self.path}", flush=True)
        return self.payload

    def _write(self) -> None:
        if not self.path:
            return
        tmp = f"{self.path}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.payload, f, indent=1)
        os.replace(tmp, self.path)  # a reader never sees a half-written file
