"""Reading W&B offline runs back without a server, through wandb's own ``wandb leet inspect``
(what the tests check archlab's W&B records with)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

# wandb's JSON output writes non-finite floats as these strings.
_NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
_INSPECT_TIMEOUT_S = 120


def offline_run_files(folder: Path, run_id: str | None = None) -> list[Path]:
    """The ``.wandb`` transaction logs of the offline runs in ``folder/wandb/`` (of run ``run_id`` only,
    when given), oldest first. ``folder`` is what the tracker got as ``wandb_dir``: the experiment folder
    for archlab's apps, the run directory for a bare ``Tracker``.

    A resumed run adds a directory with the same run id (``offline-run-<time>-<id>[-N]``).
    """
    pattern = f"wandb/offline-run-*/run-{run_id or '*'}.wandb"
    return sorted(Path(folder).glob(pattern), key=lambda p: p.parent.name)


def _inspect(path: Path, *flags: str) -> str:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no W&B run at {path}")
    cmd = [sys.executable, "-m", "wandb", "leet", "inspect", "--json", *flags, str(path)]
    done = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=_INSPECT_TIMEOUT_S)
    if done.returncode != 0:
        raise RuntimeError(f"`wandb leet inspect` failed on {path} (exit {done.returncode}): "
                           f"{done.stderr.strip()[-2000:]}")
    return done.stdout


def _finite_or_float(value: Any) -> Any:
    if isinstance(value, str) and value in _NON_FINITE:
        return _NON_FINITE[value]
    if isinstance(value, dict):
        return {k: _finite_or_float(v) for k, v in value.items()}
    return value


def read_offline_run(path: Path) -> dict:
    """A run's state as ``wandb leet inspect --summary --json`` prints it.

    ``path`` is a ``.wandb`` file, its run directory, or a ``wandb`` directory (latest run).
    Keys: ``run_id, name, project, entity, notes, tags, config, state`` ("finished" / "failed" /
    "running"), ``exit_code, step`` (last ``_step``), ``summary`` (latest values, nested keys as
    dicts), ``start_time, last_write, file, console, console_lines``. Group and job type are not
    in it: they are in the ``"run"`` record of :func:`read_offline_records`.
    Non-finite summary values come back as floats.
    """
    out = json.loads(_inspect(path, "--summary"))
    out["summary"] = _finite_or_float(out.get("summary", {}))
    return out


def read_offline_records(path: Path) -> list[dict]:
    """Every record of the transaction log, as ``wandb leet inspect --json`` prints them.

    Each is ``{"num": n, "type": t, t: {...}}``; e.g. ``type == "run"`` holds ``run_id, project,
    run_group, job_type, tags, display_name, config`` (as ``{"update": {...}}``) and ``resume``.
    """
    return [json.loads(line) for line in _inspect(path).splitlines() if line.strip()]


def read_offline_history(path: Path) -> list[dict]:
    """The logged rows, in order: each a flat dict with ``_step``, ``_runtime``, ``_timestamp``
    and the metrics (nested keys dotted, ``"NaN"`` / ``"Infinity"`` turned back into floats)."""
    return [
        _finite_or_float(rec["history"]["item"])
        for rec in read_offline_records(path)
        if rec.get("type") == "history"
    ]
