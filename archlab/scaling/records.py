"""One flat record per finished training run, read from its run directory.

A record holds what a scaling analysis needs (family, size, budget, seed, parameter and FLOP
counts under both conventions, tokens, epochs over the corpus, final validation loss) and,
for the generative families, the continuation bits per byte of ``archlab.scaling.continuation``.
Records are the rows of a study's committed CSV: the run directories are not committed.
"""

from __future__ import annotations

import csv
import json
import math
import warnings
from pathlib import Path

import yaml

from archlab.errors import CheckpointError, ConfigError
from archlab.train.run_dir import under_restarted

FIELDS = (
    "experiment", "run", "family", "objective", "size", "seed", "budget_flops",
    "params_total", "params_non_embedding", "flops_per_token", "flops_per_token_non_embedding",
    "C_total", "C_non_embedding", "tokens", "total_steps", "corpus_train_tokens", "epochs",
    "val_loss", "val_bits_per_byte", "continuation_bpb", "data_source", "lr",
)


def find_run_dirs(paths: list[str | Path]) -> list[Path]:
    """Run directories (holding config.yaml and summary.json) at or under ``paths``."""
    found: set[Path] = set()
    for path in map(Path, paths):
        if not path.exists():
            raise ConfigError(f"no such directory: {path}")
        candidates = [path] if (path / "config.yaml").is_file() else [
            p.parent for p in path.rglob("config.yaml") if not under_restarted(p.parent, path)]
        found.update(c for c in candidates if (c / "summary.json").is_file())
    return sorted(found)


_CORPUS_TOKENS: dict[str, int] = {}


def corpus_train_tokens(run_dir: Path, cfg) -> int:
    """Training tokens of the run's corpus (packed, with its own tokenizer), cached per data config."""
    from archlab.train.run_dir import TOKENIZER_FILE
    from archlab.train.setup import load_corpus, row_length_for

    key = json.dumps([cfg.data.source, dict(cfg.data.options), cfg.data.vocab_size, row_length_for(cfg)], sort_keys=True)
    if key not in _CORPUS_TOKENS:
        corpus = load_corpus(cfg.data, row_length_for(cfg), run_dir / TOKENIZER_FILE)
        _CORPUS_TOKENS[key] = int(corpus.train.n_tokens)
    return _CORPUS_TOKENS[key]


def run_finished(run_dir: str | Path) -> bool:
    """Whether the run reached its last step and wrote its final validation loss."""
    summary_path = Path(run_dir) / "summary.json"
    if not summary_path.is_file():
        return False
    summary = json.loads(summary_path.read_text())
    return summary.get("step") == summary.get("total_steps") and "val/loss" in summary


def read_run(run_dir: str | Path, *, continuation: bool = True) -> dict | None:
    """The record of a finished run; None when it stopped before its last step."""
    from archlab.trainer import load_run_config

    run_dir = Path(run_dir)
    if not run_finished(run_dir):
        return None
    summary = json.loads((run_dir / "summary.json").read_text())
    cfg = load_run_config(run_dir)
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    c_total = float(summary["train_flops_total"])
    fpt, fpt_ne = float(summary["flops_per_token"]), float(summary["flops_per_token_non_embedding"])
    tokens = int(summary["total_steps"]) * int(summary["tokens_per_step"])
    train_tokens = corpus_train_tokens(run_dir, cfg)
    record = {
        "experiment": saved.get("experiment", cfg.experiment), "run": cfg.run.name, "family": cfg.model.family,
        "objective": cfg.objective.name, "size": cfg.size_name, "seed": cfg.run.seed,
        "budget_flops": cfg.run.flops if cfg.run.flops is not None else c_total,
        "params_total": int(summary["params_total"]), "params_non_embedding": int(summary["params_non_embedding"]),
        "flops_per_token": fpt, "flops_per_token_non_embedding": fpt_ne,
        "C_total": c_total, "C_non_embedding": c_total * fpt_ne / fpt,
        "tokens": tokens, "total_steps": int(summary["total_steps"]), "corpus_train_tokens": train_tokens,
        "epochs": tokens / train_tokens, "val_loss": float(summary["val/loss"]),
        "val_bits_per_byte": float(summary.get("val/bits_per_byte", math.nan)),
        "continuation_bpb": math.nan, "data_source": cfg.data.source, "lr": float(cfg.optimizer.lr),
    }
    if continuation:
        record["continuation_bpb"] = continuation_bpb(run_dir)
    return record


def continuation_bpb(run_dir: str | Path) -> float:
    """The run's continuation bits per byte; NaN for an encoder-only run or an unreadable checkpoint."""
    from archlab.scaling.continuation import run_continuation_bpb

    try:
        score = run_continuation_bpb(run_dir)
    except CheckpointError as error:  # e.g. a checkpoint format older or newer than this code
        warnings.warn(f"{run_dir}: no continuation score ({error})", stacklevel=2)
        return math.nan
    return math.nan if score is None else score.bits_per_byte


def write_records(path: str | Path, records: list[dict]) -> Path:
    """Write records as CSV (columns ``FIELDS``), sorted by experiment, family, budget, size, seed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = sorted(records, key=lambda r: (r["experiment"], r["family"], float(r["budget_flops"]),
                                          float(r["params_total"]), int(r["seed"]), float(r.get("lr", 0) or 0)))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: r.get(k, "") for k in FIELDS})
    return path


def read_records(path: str | Path) -> list[dict]:
    """Records from a CSV written by ``write_records`` (numbers parsed back)."""
    out = []
    with Path(path).open(newline="") as f:
        for row in csv.DictReader(f):
            rec: dict = {}
            for k, v in row.items():
                if k in ("experiment", "run", "family", "objective", "size", "data_source"):
                    rec[k] = v
                elif k in ("seed", "params_total", "params_non_embedding", "tokens", "total_steps",
                           "corpus_train_tokens"):
                    rec[k] = int(float(v))
                else:
                    rec[k] = float(v) if v not in ("", None) else math.nan
            out.append(rec)
    return out


def merge_records(old: list[dict], new: list[dict]) -> list[dict]:
    """``old`` with every (experiment, run) present in ``new`` replaced by the new record."""
    key = lambda r: (r["experiment"], r["run"])  # noqa: E731
    merged = {key(r): r for r in old}
    merged.update({key(r): r for r in new})
    return list(merged.values())
