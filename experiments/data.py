"""Embedded datasets that need no download.

* ``digits``: scikit-learn's bundled 8x8 handwritten digits (1797 images,
  10 classes), pixels scaled to [0, 1], a fixed seeded 80/20 train/test split.
* ``charlm``: a character-level corpus made from the Python standard
  library's own source files (present on every machine). The file list is
  fixed and the text is filtered to printable ASCII, so the corpus is
  deterministic for a given Python version (it differs between versions);
  the last 10% is the validation split. ``corpus="stdlib"`` takes every
  ``.py`` file of the standard library instead (sorted walk, tests, demos,
  IDLE, tkinter and site-packages left out): ~10M characters on CPython 3.11,
  25x the default, so that a run of a few thousand steps sees its training
  text about once instead of dozens of times.

Per-worker data: :func:`partition` splits the training examples over
workers, IID (a seeded shuffle) or non-IID by label (each worker sees a few
classes), padded by repetition so every shard has the same size.
"""

from __future__ import annotations

import dataclasses
import os
import sysconfig

import numpy as np

# Modules present, with the same paths, in CPython 3.11 and 3.12.
STDLIB_FILES = (
    "functools.py",
    "heapq.py",
    "bisect.py",
    "textwrap.py",
    "string.py",
    "fractions.py",
    "statistics.py",
    "difflib.py",
    "shlex.py",
    "copy.py",
    "contextlib.py",
    "dataclasses.py",
    "collections/__init__.py",
    "json/decoder.py",
    "json/encoder.py",
    "argparse.py",
)
VOCAB_SIZE = 128  # printable ASCII, tab and newline fit below 128
CORPORA = ("files", "stdlib")  # the fixed file list above / the whole standard library
_SKIPPED_DIRS = {"test", "tests", "idlelib", "tkinter", "turtledemo", "lib2to3", "site-packages"}
_SKIPPED_DIRS |= {"__pycache__"}


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Arrays of one task. For ``charlm`` x_* are token streams and y_* are None."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray | None
    x_test: np.ndarray
    y_test: np.ndarray | None
    num_classes: int


def load_digits(seed: int = 0) -> Dataset:
    from sklearn.datasets import load_digits as sk_digits

    data = sk_digits()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target.astype(np.int32)
    perm = np.random.default_rng(seed).permutation(len(x))
    cut = int(0.8 * len(x))
    train, test = perm[:cut], perm[cut:]
    return Dataset("digits", x[train], y[train], x[test], y[test], 10)


def _stdlib_tree(root: str) -> list[str]:
    """Every ``.py`` file under ``root`` (relative paths, sorted walk), skipping :data:`_SKIPPED_DIRS`."""
    found = []
    for here, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIPPED_DIRS)
        found += [os.path.relpath(os.path.join(here, f), root) for f in sorted(files) if f.endswith(".py")]
    return found


def stdlib_corpus(max_chars: int | None = None, corpus: str = "files") -> str:
    """The concatenated, ASCII-filtered source of :data:`STDLIB_FILES` (``corpus="files"``) or of the
    whole standard library (``corpus="stdlib"``)."""
    if corpus not in CORPORA:
        raise ValueError(f"corpus must be one of {CORPORA}; got {corpus!r}.")
    root = sysconfig.get_paths()["stdlib"]
    parts = []
    for rel in STDLIB_FILES if corpus == "files" else _stdlib_tree(root):
        with open(os.path.join(root, rel), encoding="utf-8") as f:
            parts.append(f.read())
    text = "\n".join(parts)
    text = "".join(ch for ch in text if ch in "\n\t" or 32 <= ord(ch) < 127)
    return text[:max_chars] if max_chars else text


def load_charlm(max_chars: int | None = 400_000, corpus: str = "files") -> Dataset:
    """The char-LM token streams: the first ``max_chars`` characters of the default corpus, or the
    whole standard library (``corpus="stdlib"``, ``max_chars`` ignored)."""
    text = stdlib_corpus(max_chars if corpus == "files" else None, corpus)
    tokens = np.frombuffer(text.encode("ascii"), np.uint8).astype(np.int32)
    cut = int(0.9 * len(tokens))
    return Dataset("charlm", tokens[:cut], None, tokens[cut:], None, VOCAB_SIZE)


def load(name: str, seed: int = 0, corpus: str = "files") -> Dataset:
    if name == "digits":
        return load_digits(seed)
    if name == "charlm":
        return load_charlm(corpus=corpus)
    raise ValueError(f"Unknown dataset {name!r}: choose 'digits' or 'charlm'.")


def partition(
    num_examples: int,
    num_workers: int,
    *,
    labels: np.ndarray | None = None,
    classes_per_worker: int | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Example indices per worker, shape ``[num_workers, shard_size]``.

    IID by default. With ``classes_per_worker``, worker ``i`` gets examples
    of classes ``i, i+1, ... (mod C)`` only (a non-IID split).
    """
    rng = np.random.default_rng(seed)
    if classes_per_worker is None:
        perm = rng.permutation(num_examples)
        shards = np.array_split(perm, num_workers)
    else:
        if labels is None:
            raise ValueError("classes_per_worker needs labels.")
        num_classes = int(labels.max()) + 1
        by_class = [rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)]
        owners = [
            [w for w in range(num_workers) if (c - w) % num_classes < classes_per_worker]
            for c in range(num_classes)
        ]
        shards = [[] for _ in range(num_workers)]
        for c, idx in enumerate(by_class):
            if not owners[c]:
                continue
            for k, part in enumerate(np.array_split(idx, len(owners[c]))):
                shards[owners[c][k]].extend(part.tolist())
        shards = [np.asarray(s) for s in shards]
    size = max(len(s) for s in shards)
    return np.stack([np.resize(s, size) for s in shards]).astype(np.int32)
