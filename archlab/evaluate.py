"""Evaluate saved checkpoints: rebuild everything from the run's own config, then score.

``archlab-eval checkpoint=<dir>`` accepts a run directory, its ``checkpoints/``
directory, one step directory, or a sweep directory holding many runs.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import tempfile
from pathlib import Path

from archlab.errors import CheckpointError, CorruptCheckpointError
from archlab.samples import sample_continuations, validation_prompts
from archlab.schema import EvalConfig
from archlab.train.checkpoint import Checkpointer
from archlab.train.run_dir import CONFIG_FILE, under_restarted
from archlab.train.run_end import SAMPLE_COLUMNS
from archlab.train.tracking import Tracker, read_json_object, wandb_options
from archlab.trainer import Trainer, config_dict, load_run_config

log = logging.getLogger(__name__)

EVAL_FILE = "eval.json"


def find_runs(path: Path) -> tuple[list[Path], int | None]:
    """Run directories under ``path`` and the step named by a step directory (if one was given)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no such directory: {path}")
    if path.name.isdigit() and path.parent.name == "checkpoints":
        return [path.parent.parent], int(path.name)
    if path.name == "checkpoints":
        path = path.parent
    if (path / CONFIG_FILE).is_file():
        runs = [path]
    else:
        runs = sorted(p.parent for p in path.rglob(CONFIG_FILE)
                      if (p.parent / "checkpoints").is_dir() and not under_restarted(p.parent, path))
    runs = [r for r in runs if Checkpointer(r / "checkpoints", async_save=False).latest_step() is not None]
    if not runs:
        raise CheckpointError(f"no checkpoints in {path}")
    return runs, None


def find_one_run(path: str, *, key: str, reader: str) -> tuple[Path, int | None]:
    """The one run directory ``path`` names (``find_runs``, but a sweep directory is refused), and the
    step a step directory names; ``key=path`` and ``reader`` name the setting and the app in the refusal."""
    runs, step = find_runs(Path(path))
    if len(runs) > 1:
        raise CheckpointError(
            f"{key}={path} holds {len(runs)} runs (a sweep directory); {reader} reads one run: name its "
            f"directory, e.g. {key}={runs[0]}"
        )
    return runs[0], step


def evaluate(cfg: EvalConfig) -> list[dict]:
    runs, step_from_path = find_runs(Path(cfg.checkpoint))
    results = []
    for run_dir in runs:
        results.extend(evaluate_run(run_dir, cfg, step_from_path if cfg.step is None else cfg.step))
    return results


def evaluate_run(run_dir: Path, cfg: EvalConfig, step: int | None) -> list[dict]:
    train_cfg = load_run_config(run_dir)
    if cfg.expect_family and cfg.expect_family != train_cfg.model.family:
        raise CheckpointError(
            f"{run_dir} holds a {train_cfg.model.family} model, not the requested {cfg.expect_family}"
        )
    checkpoints = Checkpointer(run_dir / "checkpoints", async_save=False)
    trainer = Trainer.for_run(run_dir, data=cfg.data)
    plan = trainer.plan
    # The same verification and fallback as a resumed training run (Checkpointer.restore), but
    # nothing is set aside: evaluation only reads, and the run may be training right now.
    loaded = [] if cfg.all_steps else [trainer.load(checkpoints, step).step]
    steps = checkpoints.all_steps() if cfg.all_steps else loaded
    batches = trainer.validation_batches(cfg.batches, cfg.batch_size)
    prompts = _prompt_ids(cfg, trainer) if cfg.samples and plan.model.family != "encoder_only" else []

    def open_tracker() -> Tracker:
        return Tracker(
            run_dir / "eval_logs", backend=cfg.logger.backend, project=cfg.logger.project,
            group=cfg.logger.group or train_cfg.logger.group or train_cfg.experiment, name=f"{train_cfg.run.name}-eval",
            tags=[plan.model.family, train_cfg.objective.name, train_cfg.size_name], job_type="eval",
            config={"checkpoint": str(run_dir), "train": config_dict(train_cfg)},
            mode=cfg.logger.mode, entity=cfg.logger.entity, online_timeout=cfg.logger.online_timeout,
            **wandb_options(cfg.logger, run_dir),  # beside the training runs of its experiment
        )

    results, tracker = [], None
    for step_k in steps:
        if step_k not in loaded:
            try:
                trainer.load(checkpoints, step_k)
            except CorruptCheckpointError as error:  # all_steps: the other steps are still worth scoring
                log.warning("%s; skipped it", str(error).rstrip("."))
                continue
        # Opened only once a checkpoint restored: a refused checkpoint leaves the run directory as it was.
        tracker = tracker or open_tracker()
        metrics = trainer.evaluate(batches, prefix="eval")
        result = {"run": str(run_dir), "step": step_k, "family": plan.model.family,
                  "objective": train_cfg.objective.name, **metrics}
        if cfg.samples and plan.model.family != "encoder_only":
            result["samples"] = sample_continuations(trainer.model, trainer.tokenizer, prompts, cfg.max_new_tokens,
                                                      prefix=train_cfg.objective.name == "prefix_lm")
        tracker.log({**metrics, "tokens": step_k * plan.tokens_per_step}, step_k, replace=True)
        tracker.log_table("eval/samples", SAMPLE_COLUMNS,
                          [[step_k, s["prompt"], s["continuation"]] for s in result.get("samples", [])], step_k)
        _print_result(result)
        _record(run_dir, result)
        results.append(result)
    if tracker is not None:
        tracker.finish()
    if not results:
        raise CheckpointError(f"no usable checkpoint in {checkpoints.directory} (every step failed its checks)")
    return results


def _prompt_ids(cfg: EvalConfig, trainer: Trainer) -> list[list[int]]:
    """The given prompts' tokens, or the openings of held-out validation documents."""
    if cfg.prompts:
        return [trainer.tokenizer.encode(text) for text in cfg.prompts[:cfg.samples]]
    return validation_prompts(trainer.corpus.validation, cfg.samples, cfg.prompt_tokens)


def _print_result(result: dict) -> None:
    metrics = "  ".join(f"{k.split('/')[-1]}={v:.4g}" for k, v in result.items() if k.startswith("eval/"))
    print(f"[{result['family']}/{result['objective']}] {result['run']} step {result['step']}: {metrics}")
    for sample in result.get("samples", []):
        print(f"  {sample['prompt']!r} -> {sample['continuation']!r}")


def _record(run_dir: Path, result: dict) -> None:
    """``eval.json`` keeps one entry per evaluated step (re-evaluating a step replaces its entry).

    Read, changed and replaced under ``eval.json.lock`` (``flock``: evaluations of one run at the
    same time wait for each other, and a killed one releases it), through a temporary file of this
    writer's own, so the file is always whole. A damaged ``eval.json`` is moved aside, not lost.
    """
    path = run_dir / EVAL_FILE
    with open(path.with_name(f"{EVAL_FILE}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        entries = _read_entries(path)
        entries[str(result["step"])] = result
        fd, tmp = tempfile.mkstemp(dir=run_dir, prefix=f".{EVAL_FILE}.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(entries, indent=2))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def _read_entries(path: Path) -> dict:
    entries, moved, problem = read_json_object(path)
    if moved is not None:
        log.warning("%s is damaged (%s); moved to %s, a new one is started", path, problem, moved.name)
    return entries
