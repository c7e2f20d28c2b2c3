"""Checkpoint directories moved out of the way (corrupt steps, crashed saves): kept for a while, then bounded.

A step that fails its checks when a training run resumes from an older one is renamed
``corrupt-<step>-<ns>``; a crashed save's orbax temporary directory becomes ``abandoned-<step>-<ns>``
(``<ns>``: when it was moved, in nanoseconds since the epoch). Neither name starts with a digit, so
orbax never takes one for a step and ``max_to_keep`` rotation never deletes it. Each holds
``set_aside.json``: its step, why it was moved, its old name and when.

The run that owns the directory keeps the newest ``keep`` of them (``run.keep_set_aside``) and deletes
older ones, one log line each, whenever it sets another one aside. Readers (``archlab-eval``,
``Trainer.restore``) never move or delete anything: a live run may own the directory.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from pathlib import Path

log = logging.getLogger(__name__)

NOTE_FILE = "set_aside.json"
KINDS = ("corrupt", "abandoned")
_NAME = re.compile(r"(corrupt|abandoned)-(0|[1-9]\d*)-(\d+)")
# What an abandoned-* directory from before set_aside.json existed was.
_UNNOTED = {"abandoned": "a save that never committed (orbax temporary directory)", "corrupt": "unknown"}


def _parse(name: str) -> tuple[str, int, int] | None:
    """``(kind, step, ns)`` of a set-aside directory name, else None."""
    m = _NAME.fullmatch(name)
    return (m.group(1), int(m.group(2)), int(m.group(3))) if m else None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def set_aside(path: Path, step: int, kind: str, reason: str) -> Path:
    """Rename ``path`` (a step or temporary directory) to ``<kind>-<step>-<ns>`` beside it and note why."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    target = path.with_name(f"{kind}-{step}-{time.time_ns()}")
    path.rename(target)
    note = {"step": step, "kind": kind, "reason": reason, "was": path.name,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        _write_atomic(target / NOTE_FILE, json.dumps(note, indent=2) + "\n")
    except OSError as error:  # the rename is what protects the data; the note only explains it
        log.warning("set %s aside as %s but could not write its %s (%s)", path.name, target.name, NOTE_FILE, error)
    return target


def entries(root: Path) -> list[dict]:
    """The set-aside directories under ``root``, oldest first: name, step, kind, reason, time."""
    found = []
    for p in Path(root).iterdir() if Path(root).is_dir() else ():
        parsed = _parse(p.name)
        if parsed is None or not p.is_dir():
            continue
        kind, step, ns = parsed
        entry = {"name": p.name, "step": step, "kind": kind, "reason": _UNNOTED[kind],
                 "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ns / 1e9))}
        try:
            note = json.loads((p / NOTE_FILE).read_text())
            if isinstance(note, dict) and isinstance(note.get("reason"), str):
                entry["reason"] = note["reason"]
        except (OSError, UnicodeDecodeError, ValueError):
            pass  # no note (older archlab) or an unreadable one: the name still says what it is
        found.append((ns, p.name, entry))
    return [entry for _, _, entry in sorted(found)]


def prune(root: Path, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` set-aside directories under ``root``; returns the names deleted."""
    if keep < 0:
        raise ValueError(f"keep must be at least 0, got {keep}")
    old = [e["name"] for e in entries(root)]
    old = old[: max(0, len(old) - keep)]
    for name in old:
        shutil.rmtree(Path(root) / name)
        log.warning("deleted the set-aside checkpoint directory %s in %s (only the newest %d are kept: "
                    "run.keep_set_aside)", name, root, keep)
    return old
