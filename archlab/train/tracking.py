"""Experiment tracking: every metric goes to ``metrics.jsonl`` in the run directory, and to W&B when asked.

``metrics.jsonl`` is the record of truth (one JSON object per line: ``step`` plus the metrics,
NaN written as ``NaN``); W&B is a view of it that must never stop training. Any exception from
``wandb.init``, ``run.log`` or the summary falls back (online -> offline once, else W&B off) with
one ``logging.warning``, and the file keeps being written.

W&B x-axes: the default ``_step`` is the training step (every row is logged with ``step=``).
Every training row also carries ``tokens`` and ``flops``; ``train/*``, ``val/*`` and ``eval/*`` use
``tokens`` as their step metric, so W&B charts them against tokens seen. W&B allows one step metric per key,
so to plot against compute pick ``flops`` as the chart's X axis in the UI (any logged scalar can
be an X axis) — it is in every row.

W&B files go to ``<wandb_dir>/wandb/``: the training loop, members and ``archlab-eval`` pass the
experiment folder (``runs/<experiment>/``, or ``logger.dir``; see :func:`wandb_options`), so every run
of an experiment is one ``runs/<experiment>/wandb/offline-run-<time>-<id>/run-<id>.wandb`` beside
the others: ``wandb leet runs/<experiment>/wandb`` browses them all, ``wandb sync
runs/<experiment>/wandb/offline-run-*`` uploads them (``tests/wandb_offline.py`` reads one back
without a server). The run id lives in the run directory (``wandb_run_id``, checkpoint metadata),
so where the W&B files are has no bearing on resuming. A tracker made without ``wandb_dir`` keeps
them in ``run_dir/wandb/``.

Besides scalars: :meth:`Tracker.log_table` (generated samples), :meth:`Tracker.log_image` (the
loss curve) and :meth:`Tracker.log_artifact` (run files, checkpoints), each under the same rule:
a W&B failure is one warning and W&B off, never a stopped run. System metrics and console capture
are off unless asked for (``system_metrics``, ``console``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import secrets
import string
from pathlib import Path
from typing import Any

from archlab.errors import ConfigError
from archlab.train.metrics_file import (  # noqa: F401  (last_values, read_json_object: re-exported)
    METRICS_FILE, SUMMARY_FILE, _write_atomic, last_values, read_json_object, read_summary, trim_metrics_file,
)
from archlab.schema import LOGGER_BACKENDS as BACKENDS, WANDB_CONSOLE as CONSOLES, WANDB_MODES as MODES

log = logging.getLogger(__name__)

JOB_TYPES = ("train", "eval")
# Older spellings wandb still accepts in WANDB_MODE.
_MODE_ALIASES = {"dryrun": "offline", "run": "online"}
# Metrics plotted against tokens seen by default; `flops` is the alternative X axis.
TOKEN_AXIS_GLOBS = ("train/*", "val/*", "eval/*")


def _plain(value: Any) -> Any:
    """A JSON-ready Python scalar from a float, int, numpy or JAX scalar."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if hasattr(value, "item"):
        return value.item()
    return float(value)


def new_run_id(length: int = 8) -> str:
    """A fresh W&B run id (base 36); drawn from ``secrets`` so seeded runs still get distinct ids."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(length))


def wandb_options(logger_cfg: Any, run_dir: Path) -> dict[str, Any]:
    """The Tracker keyword arguments a ``LoggerConfig`` sets besides names and mode: where the W&B files go
    (``logger.dir``, else the run directory's parent, the experiment folder), system metrics, console capture."""
    folder = Path(logger_cfg.dir) if logger_cfg.dir else Path(run_dir).parent
    return {"wandb_dir": folder, "system_metrics": logger_cfg.system_metrics, "console": logger_cfg.console}


def artifact_name(text: str) -> str:
    """``text`` as a W&B artifact name (letters, digits, ``-``, ``_``, ``.``; other characters become ``-``)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", text)[:128] or "run"


def _has_credentials() -> bool:
    """Whether W&B has an API key, found without ever prompting (wandb.init would ask on a TTY)."""
    import wandb

    if wandb.run is not None:  # someone else's run already logged in this process
        return True
    return wandb.login(prompt=False, verify=False)


def _resolve_mode(mode: str) -> str:
    """The W&B mode to use: ``WANDB_MODE`` from the user's environment wins over the config."""
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    chosen = _MODE_ALIASES.get(env, env) if env else mode
    if chosen not in MODES:
        source = "WANDB_MODE" if env else "mode"
        raise ConfigError(f"{source}={chosen!r} is not a W&B mode; use one of {', '.join(MODES)}")
    return chosen


class Tracker:
    """Logs metrics of one run to ``run_dir/metrics.jsonl`` and, with ``backend="wandb"``, to W&B.

    ``run_id`` resumes that W&B run (``resume="allow"``); ``resume_step`` is the step of the
    checkpoint being resumed: rows after it in ``metrics.jsonl`` are from a crashed tail and are
    removed. Several trackers may be open in one process (``reinit="create_new"``), so W&B is only
    reached through this tracker's own run object, never ``wandb.log``.

    ``wandb_dir``: the folder whose ``wandb/`` holds the W&B files (default ``run_dir``; shared by the
    runs of an experiment, see :func:`wandb_options`). ``system_metrics``: W&B's system-metrics
    sampler; ``console``: W&B's console capture (``off`` | ``wrap`` | ``redirect`` | ``auto``).
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        backend: str,
        project: str,
        group: str | None,
        name: str,
        tags: list[str],
        job_type: str,
        config: dict,
        mode: str = "offline",
        run_id: str | None = None,
        resume_step: int | None = None,
        entity: str | None = None,
        online_timeout: float = 30.0,
        wandb_dir: Path | None = None,
        system_metrics: bool = False,
        console: str = "off",
    ) -> None:
        if backend not in BACKENDS:
            raise ConfigError(f"tracking backend {backend!r} is unknown; use one of {', '.join(BACKENDS)}")
        if job_type not in JOB_TYPES:
            raise ConfigError(f"job_type {job_type!r} is unknown; use one of {', '.join(JOB_TYPES)}")
        if console not in CONSOLES:
            raise ConfigError(f"W&B console {console!r} is unknown; use one of {', '.join(CONSOLES)}")
        wandb_mode = _resolve_mode(mode) if backend == "wandb" else "disabled"

        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        metrics_path = self.run_dir / METRICS_FILE
        if resume_step is not None:
            dropped = trim_metrics_file(metrics_path, resume_step)
            if dropped:
                log.info("dropped %d rows after step %d from %s", dropped, resume_step, metrics_path)
        else:  # appending (evaluation): a killed writer's torn last line must not swallow the next row
            trim_metrics_file(metrics_path, math.inf)
        self._metrics = metrics_path.open("a")
        summary_path = self.run_dir / SUMMARY_FILE
        self._summary: dict[str, Any] = read_summary(summary_path)
        self._last_step = resume_step or 0
        self._finished = False

        self._run = None
        self._run_id: str | None = None
        self._wandb_mode: str | None = None
        self._online_timeout = online_timeout
        self._wandb_dir = Path(wandb_dir) if wandb_dir is not None else self.run_dir
        self._system_metrics, self._console = bool(system_metrics), console
        if wandb_mode != "disabled":
            init_kwargs = dict(
                entity=entity,
                project=project,
                group=group,
                name=name,
                tags=list(tags),
                job_type=job_type,
                config=dict(config),
            )
            self._start_wandb(init_kwargs, wandb_mode, run_id)

    # -- W&B life cycle -------------------------------------------------------------------

    def _start_wandb(self, init_kwargs: dict, mode: str, run_id: str | None) -> None:
        resume = "allow" if run_id is not None else None
        # The id is fixed before the first attempt so an offline fallback is the same run.
        run_id = run_id or new_run_id()
        try:
            if mode == "online" and not _has_credentials():
                raise RuntimeError("no W&B credentials (WANDB_API_KEY, ~/.netrc or `wandb login`)")
            self._run = self._init(init_kwargs, mode, run_id, resume)
        except Exception as first:
            if mode != "online":
                log.warning("W&B disabled, metrics go to %s only: %s: %s",
                            self._metrics.name, type(first).__name__, first)
                return
            self._run = self._init_offline(init_kwargs, run_id, resume, first)
            if self._run is None:
                return
            mode = "offline"
        self._run_id = self._run.id
        self._wandb_mode = mode

    def _init_offline(self, init_kwargs: dict, run_id: str, resume: str | None, online_error: Exception):
        """The offline fallback of a failed online start: the same run id, or (when this process's failed
        online attempt still holds that id) a fresh one, which later resumes then continue."""
        failures = []
        for attempt_id, attempt_resume in ((run_id, resume), (new_run_id(), None)):
            try:
                run = self._init(init_kwargs, "offline", attempt_id, attempt_resume)
            except Exception as error:
                failures.append(f"{type(error).__name__}: {' '.join(str(error).split())[:200]}")
                continue
            renamed = "" if attempt_id == run_id else f" under a new id {attempt_id} ({run_id} was taken)"
            log.warning("W&B online init failed (%s: %s); logging offline%s to %s; upload it later with "
                        "`wandb sync`", type(online_error).__name__, " ".join(str(online_error).split())[:200],
                        renamed, Path(run.dir).parent)
            return run
        log.warning("W&B disabled, metrics go to %s only: online init failed (%s: %s), then offline init "
                    "failed (%s)", self._metrics.name, type(online_error).__name__,
                    " ".join(str(online_error).split())[:200], "; then ".join(failures))
        return None

    def _init(self, init_kwargs: dict, mode: str, run_id: str, resume: str | None):
        import wandb

        settings = wandb.Settings(
            init_timeout=self._online_timeout,  # an unreachable server costs this long, then offline
            silent=True,
            console=self._console,  # "off" by default: leave stdout/stderr (progress bars) alone
            # Off by default: throughput and MFU are logged by us, and tests stay quiet and deterministic.
            x_disable_stats=not self._system_metrics,
        )
        self._wandb_dir.mkdir(parents=True, exist_ok=True)
        run = wandb.init(
            **init_kwargs,
            dir=str(self._wandb_dir),
            mode=mode,
            id=run_id,
            resume=resume,
            reinit="create_new",
            settings=settings,
        )
        try:
            run.define_metric("tokens")
            run.define_metric("flops")
            for glob in TOKEN_AXIS_GLOBS:
                run.define_metric(glob, step_metric="tokens")
        except Exception:
            run.finish(exit_code=1)
            raise
        return run

    def _disable_wandb(self, what: str, error: Exception) -> None:
        log.warning("W&B %s failed (%s: %s); W&B logging is off for the rest of this run, "
                    "metrics go to %s only", what, type(error).__name__, error, self._metrics.name)
        run, self._run = self._run, None
        try:
            run.finish(exit_code=1)
        except Exception:
            pass

    # -- public API -----------------------------------------------------------------------

    @property
    def run_id(self) -> str | None:
        """The W&B run id (store it with the checkpoint to resume the run); None without W&B."""
        return self._run_id

    @property
    def wandb_mode(self) -> str | None:
        """The mode W&B actually runs in ("online" / "offline"), or None when it is off."""
        return self._wandb_mode if self._run is not None else None

    def log(self, metrics: dict[str, float], step: int, replace: bool = False) -> None:
        """Append one row at training step ``step``; W&B gets it with ``_step = step``.

        ``replace``: drop the file's earlier rows of this step first (re-evaluating a step, or an
        evaluation killed after writing it, leaves one row per step, not two)."""
        if replace:
            self._drop_step(int(step))
        row = {"step": int(step)}
        row.update((k, _plain(v)) for k, v in metrics.items() if k != "step")
        self._metrics.write(json.dumps(row) + "\n")
        self._metrics.flush()
        self._last_step = int(step)
        if self._run is not None:
            try:
                self._run.log({k: v for k, v in row.items() if k != "step"}, step=int(step))
            except Exception as e:
                self._disable_wandb("log", e)

    def _drop_step(self, step: int) -> None:
        path = Path(self._metrics.name)
        self._metrics.flush()
        lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()

        def of_step(line: str) -> bool:
            try:
                row = json.loads(line)
            except ValueError:
                return False
            return isinstance(row, dict) and row.get("step") == step

        kept = [line for line in lines if not of_step(line)]
        if len(kept) < len(lines):
            self._metrics.close()
            _write_atomic(path, "".join(f"{line}\n" for line in kept))
            self._metrics = path.open("a")

    def summary(self, values: dict) -> None:
        """Record final values: W&B's run summary and ``run_dir/summary.json`` (merged with earlier calls)."""
        plain = {k: _plain(v) if not isinstance(v, (dict, list)) else v for k, v in values.items()}
        self._summary.update(plain)
        _write_atomic(self.run_dir / SUMMARY_FILE, json.dumps(self._summary, indent=2, sort_keys=True) + "\n")
        if self._run is not None:
            try:
                self._run.summary.update(plain)
            except Exception as e:
                self._disable_wandb("summary", e)

    def summary_value(self, key: str) -> Any:
        """A value ``summary.json`` holds now (None when absent)."""
        return self._summary.get(key)

    def log_image(self, key: str, path: Path, step: int | None = None) -> None:
        """Log an image file (a plot) to W&B at ``step`` (default: the last logged step); no-op without W&B."""
        if self._run is None:
            return
        if not Path(path).is_file():
            log.warning("no image at %s; %r not logged", path, key)
            return
        import wandb

        try:
            self._run.log({key: wandb.Image(str(path))}, step=self._last_step if step is None else int(step))
        except Exception as e:
            self._disable_wandb("log_image", e)

    def log_table(self, key: str, columns: list[str], rows: list[list], step: int | None = None) -> None:
        """Log one ``wandb.Table`` of ``rows`` at ``step`` (default: the last logged step); no-op without W&B.

        One table per call (W&B shows a step slider over a key's tables); ``metrics.jsonl`` does not hold it."""
        if self._run is None or not rows:
            return
        import wandb

        try:
            table = wandb.Table(columns=list(columns), data=[list(r) for r in rows])
            self._run.log({key: table}, step=self._last_step if step is None else int(step))
        except Exception as e:
            self._disable_wandb("log_table", e)

    def log_artifact(self, name: str, kind: str, paths: list[Path], metadata: dict | None = None,
                     aliases: list[str] | None = None) -> bool:
        """Log files and directories (a directory's files under its own name) as one W&B artifact of type
        ``kind``; returns whether it was logged. No-op without W&B; a missing path is skipped with a warning.

        The files are copied into W&B's staging area (``WANDB_DATA_DIR``) until uploaded, so a checkpoint
        rotated away later still syncs."""
        if self._run is None:
            return False
        present = [Path(p) for p in paths if Path(p).exists()]
        for missing in (Path(p) for p in paths if not Path(p).exists()):
            log.warning("no file at %s; left out of W&B artifact %r", missing, name)
        if not present:
            return False
        import wandb

        try:
            artifact = wandb.Artifact(artifact_name(name), type=kind,
                                      metadata={k: _plain(v) for k, v in (metadata or {}).items()})
            for path in present:
                if path.is_dir():
                    artifact.add_dir(str(path), name=path.name)
                else:
                    artifact.add_file(str(path))
            self._run.log_artifact(artifact, aliases=aliases)
        except Exception as e:
            self._disable_wandb("log_artifact", e)
            return False
        return True

    def finish(self, exit_code: int = 0) -> None:
        """Close ``metrics.jsonl`` and finish the W&B run (a non-zero ``exit_code`` marks it failed). Idempotent."""
        if self._finished:
            return
        self._finished = True
        self._metrics.close()
        if self._run is not None:
            run, self._run = self._run, None
            try:
                run.finish(exit_code=exit_code)
            except Exception as e:
                log.warning("W&B finish failed (%s: %s); metrics are in %s", type(e).__name__, e,
                            self._metrics.name)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish(exit_code=0 if exc_type is None else 1)


class QuietTracker:
    """The tracker of a process other than process 0 in a multi-process run: it records nothing.

    Process 0 writes ``metrics.jsonl``, ``summary.json`` and W&B for the whole run (its values are the
    run's: every process computes the same replicated metrics); a second writer would tear them.
    """

    run_id: str | None = None
    wandb_mode: str | None = None

    def log(self, metrics: dict[str, float], step: int, replace: bool = False) -> None:
        pass

    def summary(self, values: dict) -> None:
        pass

    def summary_value(self, key: str) -> Any:
        return None

    def log_image(self, key: str, path: Path, step: int | None = None) -> None:
        pass

    def log_table(self, key: str, columns: list[str], rows: list[list], step: int | None = None) -> None:
        pass

    def log_artifact(self, name: str, kind: str, paths: list[Path], metadata: dict | None = None,
                     aliases: list[str] | None = None) -> bool:
        return False

    def finish(self, exit_code: int = 0) -> None:
        pass
