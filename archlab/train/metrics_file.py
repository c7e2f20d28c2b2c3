"""The run's metric files: ``metrics.jsonl`` (one JSON row per line) and ``summary.json``, read and
repaired so that damage never blocks a resume (nothing is lost: a damaged file is kept beside it).

Written through :class:`archlab.train.tracking.Tracker`; importable from there too.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"


def _write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so a crash leaves the old file or the new one, never half."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _keep_damaged(path: Path) -> Path:
    """Copy a damaged file to ``<name>.damaged-<ns>`` beside it before it is rewritten (nothing is lost)."""
    copy = path.with_name(f"{path.name}.damaged-{time.time_ns()}")
    shutil.copy2(path, copy)
    return copy


def trim_metrics_file(path: Path, resume_step: float) -> int:
    """Drop rows with ``step > resume_step`` (and torn lines) left by a crashed run; return how many.

    A killed run may leave its last line torn: dropped quietly. Damage anywhere else (a line that is
    not a JSON row, bytes that are not UTF-8) never blocks the resume either: the bad lines are
    dropped with a warning naming the file and how many rows were lost, after the file as it was is
    copied to ``metrics.jsonl.damaged-<ns>``. The file is rewritten atomically, only when needed.
    """
    if not path.exists():
        return 0
    lines = path.read_bytes().split(b"\n")
    torn_tail = lines[-1] != b""  # a complete file ends with a newline
    kept, dropped, damaged = [], 0, 0
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
            step = row.get("step") if isinstance(row, dict) else None
            if not isinstance(step, (int, float)) or isinstance(step, bool):
                raise ValueError("not a metrics row")
        except ValueError:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            dropped += 1
            damaged += not (torn_tail and i == len(lines) - 1)
            continue
        if step > resume_step:
            dropped += 1
        else:
            kept.append(raw.decode("utf-8"))
    if damaged:
        copy = _keep_damaged(path)
        log.warning("%s: %d damaged line(s) dropped (rows lost); the file as it was is kept as %s",
                    path, damaged, copy.name)
    if dropped:
        _write_atomic(path, "".join(f"{line}\n" for line in kept))
    return dropped


def read_json_object(path: Path) -> tuple[dict[str, Any], Path | None, str]:
    """A JSON object file's contents ({} when absent). A damaged one (unreadable, not an object) is
    moved to ``<name>.damaged-<ns>``, never deleted: returns ({}, where it went, what was wrong)."""
    if not path.exists():
        return {}, None, ""
    try:
        values = json.loads(path.read_bytes().decode("utf-8"))
        if isinstance(values, dict):
            return values, None, ""
        problem = "not a JSON object"
    except ValueError as error:
        problem = " ".join(str(error).split())[:120]
    moved = path.with_name(f"{path.name}.damaged-{time.time_ns()}")
    path.rename(moved)
    return {}, moved, problem


def read_summary(path: Path) -> dict[str, Any]:
    """``summary.json``'s values; a damaged one is moved to ``summary.json.damaged-<ns>`` with a warning and
    rebuilt from ``metrics.jsonl`` beside it (each metric's last value), rather than blocking a resume."""
    values, moved, problem = read_json_object(path)
    if moved is None:
        return values
    rebuilt = last_values(path.with_name(METRICS_FILE))
    log.warning("%s is damaged (%s); moved to %s and rebuilt from %s (%d values)", path, problem, moved.name,
                METRICS_FILE, len(rebuilt))
    return rebuilt


def metric_rows(metrics_path: Path) -> Iterator[dict[str, Any]]:
    """The rows of a ``metrics.jsonl`` in file order; unreadable lines (and a missing file) give none."""
    if not metrics_path.is_file():
        return
    for raw in metrics_path.read_bytes().splitlines():
        try:
            row = json.loads(raw.decode("utf-8"))
        except ValueError:
            continue
        if isinstance(row, dict):
            yield row


def last_values(metrics_path: Path) -> dict[str, Any]:
    """Each metric's last value in a ``metrics.jsonl`` (unreadable lines skipped), with ``step``."""
    values: dict[str, Any] = {}
    for row in metric_rows(metrics_path):
        values.update(row)
    return values
