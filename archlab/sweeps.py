"""Sweeps (``archlab-train -m``): job names that never collide, jobs that fail alone, and a table.

A job's default ``run.name`` is the single run's (``<family>-<size>-<objective>-s<seed>``) plus
every command-line override that changes what is trained beyond those four, sorted:
``-m optimizer.lr=1e-3,3e-3 run.steps=20`` writes ``decoder_only-mini-clm-s0,optimizer.lr=0.001,run.steps=20``
and its sibling. So a sweep never lands in a single run's directory, two sweeps that differ in a
fixed value never share one, and the same sweep again resumes (or skips, when finished) each job.
Keys that do not change the run (logging, progress, checkpoint cadence, ``run.restart``) stay out
of the name, so adding them resumes the same jobs.

A job that is refused, fails or stops on a non-finite loss prints its one line and the sweep goes
on; at the end ``SweepTable`` prints every job's row (``archlab.runs_table``), writes it as
``runs/<experiment>/sweep-<UTC time>.csv`` and exits 1 if any job did not finish.
"""

from __future__ import annotations

import hashlib
import re
import sys
import time
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

# What a job's name leaves out: already in the base name, or not part of what is trained.
_IN_BASE_NAME = ("model", "size", "objective", "run.seed")
_TRAINED = ("model", "objective", "optimizer", "data", "rules", "run.batch_size", "run.tokens",
            "run.tokens_per_param", "run.flops", "run.steps", "run.branches", "run.members")
_NOT_TRAINED = ("data.cache_dir",)
_UNSAFE = re.compile(r"[^A-Za-z0-9._,=+\-\[\]{}:@]")
MAX_NAME = 160  # a longer name keeps its start and ends in a hash of the whole (filenames: 255 bytes)

_OUTCOMES: dict[str, str] = {}  # run directory -> why the job did not finish (this process's jobs)


def in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _is_trained(key: str) -> bool:
    if key in _IN_BASE_NAME or key in _NOT_TRAINED:
        return False
    return any(key == prefix or key.startswith(prefix + ".") for prefix in _TRAINED)


def job_suffix(overrides: list[str]) -> str:
    """``,key=value`` for each override that changes what is trained, sorted; '' when none does."""
    parts = []
    for override in overrides:
        key, sep, value = override.lstrip("+~").partition("=")
        if sep and _is_trained(key):
            parts.append(f"{key}={value}")
    if not parts:
        return ""
    suffix = _UNSAFE.sub("_", "," + ",".join(sorted(parts))).replace("..", "_")
    if len(suffix) > MAX_NAME:
        suffix = suffix[:MAX_NAME - 9] + "-" + hashlib.sha256(suffix.encode()).hexdigest()[:8]
    return suffix


def _job_suffix_resolver() -> str:
    """``${archlab.sweep_job:}`` in ``conf/run/default.yaml``: the job's suffix in a multirun, else ''."""
    if not in_multirun():
        return ""
    return job_suffix(list(HydraConfig.get().overrides.task))


def register_resolver() -> None:
    if not OmegaConf.has_resolver("archlab.sweep_job"):
        OmegaConf.register_new_resolver("archlab.sweep_job", _job_suffix_resolver)


def note_failure(run_dir: Path, reason: str) -> None:
    """Record why this process's job in ``run_dir`` did not finish, for the sweep's table."""
    _OUTCOMES[str(Path(run_dir).resolve())] = reason


class SweepTable(Callback):
    """Hydra callback (``conf/train.yaml``): collects each job's run directory and, when the
    sweep ends, prints the table, writes its CSV and exits 1 if a job did not finish."""

    def __init__(self) -> None:
        self.jobs: list[tuple[Path, str | None]] = []

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        run_dir = Path(config.hydra.runtime.output_dir).resolve()
        reason = _OUTCOMES.pop(str(run_dir), None)
        if reason is None and getattr(job_return, "status", None) is not None and job_return.status.name == "FAILED":
            reason = f"crashed: {job_return._return_value!r}"
        self.jobs.append((run_dir, reason))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from archlab import runs_table

        sweep_dir = Path(config.hydra.sweep.dir)
        if not self.jobs:  # jobs ran in other processes (a cluster launcher): the folder tells
            rows = runs_table.table_rows([sweep_dir]) if sweep_dir.is_dir() else []
        else:
            rows = [self._row(sweep_dir, run_dir, reason) for run_dir, reason in self.jobs]
        if not rows:
            return
        stamp = time.strftime('%Y%m%d-%H%M%S', time.gmtime())
        out = sweep_dir / f"sweep-{stamp}.csv"
        for n in range(2, 1000):  # two sweeps ending in one second keep both tables
            if not out.exists():
                break
            out = sweep_dir / f"sweep-{stamp}-{n}.csv"
        runs_table.write_csv(rows, out)
        print(runs_table.format_table(rows))
        unfinished = [r for r in rows if r.status != "done"]
        print(f"{len(rows)} jobs, {len(rows) - len(unfinished)} done; table written to {out} "
              f"(archlab-runs {sweep_dir} prints it again)")
        if unfinished:
            print(f"archlab-train: error: {len(unfinished)} of {len(rows)} jobs did not finish: "
                  + ", ".join(r.run for r in unfinished), file=sys.stderr)
            sys.exit(1)

    @staticmethod
    def _row(sweep_dir: Path, run_dir: Path, reason: str | None):
        from archlab import runs_table

        try:
            name = run_dir.relative_to(sweep_dir.resolve()).as_posix()
        except ValueError:
            name = str(run_dir)  # run.dir put the job elsewhere
        if not (run_dir / "config.yaml").is_file():  # refused before anything was written
            return runs_table.RunRow(run=name, status=f"refused: {reason or 'no run was written'}")
        row = runs_table.read_row(run_dir, name)
        if reason and not row.status.startswith(("done", "stopped: ")):
            row.status = f"failed: {reason}"
        return row
