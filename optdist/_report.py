"""Benchmark output shared by the bench scripts: one aligned table on stdout, the rows as JSON."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any


def print_rows(title: str, rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> None:
    """Prints ``title`` and one line per row; ``columns`` are ``(header, key, format spec)``.

    A format spec starting with ``<`` is left-aligned text, e.g. ``("method", "method", "<24")``;
    otherwise the header is right-aligned to the spec's width, e.g. ``("ms/step", "ms", ">10.3f")``.
    """
    print(title)

    def width(spec: str) -> int:
        digits = "".join(ch for ch in spec.lstrip("<>").split(".")[0] if ch.isdigit())
        return int(digits or 0)

    print("".join(f"{h:<{width(s)}}" if s.startswith("<") else f"{h:>{width(s)}}" for h, _, s in columns))
    for row in rows:
        print("".join(format(row[key], spec) for _, key, spec in columns))


def write_json(payload: Any, path: str | None) -> None:
    """Writes ``payload`` as indented JSON to ``path`` (nothing if ``path`` is None)."""
    if path:
        with open(path, "w") as f:
            json.dump(payload, f, indent=2)
