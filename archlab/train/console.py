"""What a training run tells its user: a start block, the compile time, one line per evaluation,
generated samples and a final summary.

Everything goes through the ``archlab.train.console`` logger, so it reaches the console (Hydra's
job logging, ``conf/hydra/job_logging/archlab.yaml``) and ``train.log`` (``run_dir.log_to_file``)
alike; while the progress bar draws, ``logging_redirect_tqdm`` writes the lines above it.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

log = logging.getLogger(__name__)

# Evaluation metrics shown on one line (the rest are in metrics.jsonl and summary.json).
EVAL_SHOWN = ("loss", "bits_per_byte", "perplexity", "accuracy", "macro_f1", "chunk_f1", "tag_accuracy", "exact_match",
              "f1")  # pre-training, then the task runs' metrics (tasks/scoring.py)


class ConsoleFormatter(logging.Formatter):
    """Plain messages for information; warnings and errors say what they are."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        if record.levelno >= logging.WARNING:
            return f"{record.levelname.lower()}: {message}"
        return message


def _count(n: float) -> str:
    return f"{n:,.0f}" if n < 1e9 else f"{n:.3g}"


def start_block(*, run_dir: Path, family: str, objective: str, size: str, derived: dict, seq_len: int,
                batch_size: int, devices: str, start_step: int, init_from: str | None = None) -> list[str]:
    """The lines printed before the first step: what is about to run, where, and how much of it."""
    steps = int(derived["total_steps"])
    start = f"from the weights of {init_from}" if init_from else "from scratch"
    begin = f"resuming at step {start_step} of {steps:,}" if start_step else f"{steps:,} steps {start}"
    return [
        f"run        {run_dir}",
        f"model      {family} / {objective} / size {size}",
        f"parameters {_count(derived['params_total'])} total, {_count(derived['params_non_embedding'])} non-embedding",
        f"budget     {_count(derived['token_budget'])} tokens ({_count(derived['tokens_per_step'])} per step: "
        f"{batch_size} rows x {int(derived['row_length'])} tokens, sequence {seq_len}), "
        f"{derived['train_flops_total']:.3g} training FLOPs",
        f"devices    {devices}",
        f"plan       {begin}",
    ]


def log_lines(lines: list[str]) -> None:
    for line in lines:
        log.info("%s", line)


def log_compiling(what: str) -> None:
    log.info("compiling %s (the first call; later calls reuse it)...", what)


def log_compiled(what: str, seconds: float) -> None:
    log.info("compiled %s and ran it once in %.1f s", what, seconds)


def evaluation_line(step: int, total_steps: int, metrics: dict[str, float], seconds: float,
                    prefix: str = "val") -> str:
    shown = [f"{name.replace('_', ' ')} {metrics[f'{prefix}/{name}']:.4g}" for name in EVAL_SHOWN
             if f"{prefix}/{name}" in metrics and math.isfinite(metrics[f"{prefix}/{name}"])]
    return f"step {step:,}/{total_steps:,}  {prefix}: " + "  ".join(shown) + f"  ({seconds:.1f} s)"


def log_evaluation(step: int, total_steps: int, metrics: dict[str, float], seconds: float) -> None:
    log.info("%s", evaluation_line(step, total_steps, metrics, seconds))


def log_branch(name: str, val_loss: float) -> None:
    log.info("branch %s cooled down: val loss %.4g", name, val_loss)


def log_samples(samples: list[dict]) -> None:
    for sample in samples:
        log.info("sample     %r -> %r", sample["prompt"], sample["continuation"])


def summary_lines(final: dict, run_dir: Path, seconds: float) -> list[str]:
    """The final summary: every number ``summary.json`` gains at the end, and where it is."""
    numbers = {k: v for k, v in final.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    width = max((len(k) for k in numbers), default=0)
    lines = [f"done in {seconds:.1f} s: {run_dir / 'summary.json'}"]
    lines += [f"  {k:<{width}}  {v:.6g}" if isinstance(v, float) else f"  {k:<{width}}  {v:,}"
              for k, v in sorted(numbers.items())]
    if final.get("set_aside"):
        lines.append("  set aside: " + ", ".join(f"{entry['name']} ({entry['kind']}, step {entry['step']})"
                                                 for entry in final["set_aside"]))
    return lines
