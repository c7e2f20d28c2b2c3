"""One table for a sweep or any runs directory: run, family, size, parameters, budget, validation
loss, bits per byte and status, printed and written as CSV (``archlab-runs``, and the end of every
``archlab-train -m`` sweep).

The table is read from what each run directory holds (``config.yaml``, ``summary.json``, the run
lock), so it describes a finished sweep, one still running elsewhere, or several at once.
"""

from __future__ import annotations

import argparse
import csv
import fcntl
import json
import os
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import yaml

from archlab.train.run_dir import CONFIG_FILE, LOCK_FILE, under_restarted
from archlab.train.tracking import SUMMARY_FILE

TABLE_FILE = "runs.csv"


@dataclass
class RunRow:
    """One run (or branch, or member) as the table shows it; empty strings where a value is unknown."""

    run: str
    family: str = ""
    size: str = ""
    params: int | str = ""
    tokens: int | str = ""
    flops: float | str = ""
    val_loss: float | str = ""
    val_bpb: float | str = ""
    status: str = ""


COLUMNS = tuple(f.name for f in fields(RunRow))


def run_dirs(root: Path) -> list[Path]:
    """Every run directory under ``root`` (runs, their branches and members), skipping runs moved
    aside by ``run.restart`` and the step directories inside checkpoints."""
    root = Path(root)
    found = [p.parent for p in root.rglob(CONFIG_FILE)]
    return sorted(d for d in found if "checkpoints" not in d.relative_to(root).parts
                  and not under_restarted(d, root))


def _is_locked(run_dir: Path) -> bool:
    """True while a live ``archlab-train`` holds the run (the kernel drops a dead one's lock)."""
    path = run_dir / LOCK_FILE
    if not path.is_file():
        return False
    with open(path, "rb") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    return False


def run_status(run_dir: Path, summary: dict) -> str:
    """``done``, ``running``, ``stopped: <why>`` (a non-finite stop, a skip limit) or
    ``incomplete (step s/S)`` (killed, stopped on a signal, or not started)."""
    step, total = summary.get("step"), summary.get("total_steps")
    if isinstance(step, int) and isinstance(total, int) and step >= total:
        return "done"
    if _is_locked(run_dir):
        return "running"
    if summary.get("stopped"):
        return f"stopped: {summary['stopped']}"
    return f"incomplete (step {step if isinstance(step, int) else 0}/{total if isinstance(total, int) else '?'})"


def _read_summary(path: Path) -> dict:
    """``summary.json`` as it is ({} when absent or unreadable): a table only reads, so a damaged
    one is left for the run's next launch to set aside and rebuild."""
    try:
        values = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError):
        return {}
    return values if isinstance(values, dict) else {}


def _number(value):
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else ""


def read_row(run_dir: Path, name: str) -> RunRow:
    """The row for one run directory, named ``name`` in the table."""
    try:
        config = yaml.safe_load((run_dir / CONFIG_FILE).read_text()) or {}
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        config = {}
    config = config if isinstance(config, dict) else {}
    summary = _read_summary(run_dir / SUMMARY_FILE)
    model = config.get("model") if isinstance(config.get("model"), dict) else {}
    return RunRow(
        run=name, family=str(model.get("family", "")), size=str(config.get("size_name", "")),
        params=_number(summary.get("params_total")), tokens=_number(summary.get("token_budget")),
        flops=_number(summary.get("train_flops_total")), val_loss=_number(summary.get("val/loss")),
        val_bpb=_number(summary.get("val/bits_per_byte")), status=run_status(run_dir, summary),
    )


def table_rows(roots: list[Path]) -> list[RunRow]:
    """Rows for every run under each root, named by their path from it (the root's own name when
    several roots are given)."""
    rows = []
    for root in roots:
        root = Path(root)
        for run_dir in run_dirs(root):
            relative = run_dir.relative_to(root).as_posix()
            if relative == ".":  # the root is itself a run
                name = root.name
            else:
                name = relative if len(roots) == 1 else f"{root.name}/{relative}"
            rows.append(read_row(run_dir, name))
    return rows


def _shown(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if value >= 1e6 else f"{value:.4f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def format_table(rows: list[RunRow]) -> str:
    """Aligned text: numbers right-aligned, the rest left."""
    cells = [list(COLUMNS)] + [[_shown(v) for v in asdict(row).values()] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    numeric = {"params", "tokens", "flops", "val_loss", "val_bpb"}
    lines = []
    for line in cells:
        lines.append("  ".join(cell.rjust(w) if COLUMNS[i] in numeric else cell.ljust(w)
                               for i, (cell, w) in enumerate(zip(line, widths))).rstrip())
    return "\n".join(lines)


def write_csv(rows: list[RunRow], path: Path) -> None:
    """The rows as CSV (full precision), written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    with open(partial, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(asdict(row) for row in rows)
    os.replace(partial, path)


def main(argv: list[str] | None = None) -> None:
    """``archlab-runs DIR [DIR ...] [--csv PATH]``: print the table and write it as CSV."""
    parser = argparse.ArgumentParser(
        prog="archlab-runs", description="Print and write (CSV) the table of every run under one or more runs "
        "directories: a sweep (runs/<experiment>), several, or one run with its branches and members.")
    parser.add_argument("dirs", nargs="+", type=Path, help="runs directories (e.g. runs/sizes)")
    parser.add_argument("--csv", type=Path, default=None,
                        help=f"where to write the CSV (default: DIR/{TABLE_FILE} for one directory; "
                        "required for several)")
    args = parser.parse_args(argv)
    missing = [str(d) for d in args.dirs if not d.is_dir()]
    if missing:
        parser.exit(2, f"archlab-runs: error: no such directory: {', '.join(missing)}\n")
    if args.csv is None and len(args.dirs) > 1:
        parser.exit(2, "archlab-runs: error: several directories need --csv PATH (where to write the table)\n")
    rows = table_rows(args.dirs)
    if not rows:
        parser.exit(2, f"archlab-runs: error: no runs (no {CONFIG_FILE}) under {', '.join(map(str, args.dirs))}\n")
    out = args.csv or args.dirs[0] / TABLE_FILE
    write_csv(rows, out)
    print(format_table(rows))
    print(f"{len(rows)} runs; table written to {out}", file=sys.stdout)
