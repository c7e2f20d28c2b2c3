"""Everything a run derives from its config: corpus, model shape, budget, FLOPs, batches."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

from archlab.accounting import FlopCounts, ParamCounts, count_params, forward_flops
from archlab.config import ModelConfig
from archlab.data import Corpus, PackedRows, batch_at, prepare_corpus
from archlab.errors import ConfigError
from archlab.objectives.registry import make_transform, raw_row_length
from archlab.objectives.span_corruption import span_corruption_lengths
from archlab.schema import DataConfig, TrainConfig

Transform = Callable[[dict, np.random.Generator], dict]


@dataclass(frozen=True)
class Plan:
    """Derived numbers of a run: computed once, logged, never typed twice."""

    model: ModelConfig  # with the tokenizer's real vocabulary size
    row_length: int  # raw tokens per packed row (568 for span corruption at 512)
    decoder_length: int | None  # target length for encoder-decoder
    tokens_per_step: int  # raw data tokens consumed per update
    total_steps: int
    token_budget: int
    params: ParamCounts
    flops: FlopCounts  # forward FLOPs of one row

    @property
    def train_flops_per_step(self) -> int:
        return self.flops.train * self.tokens_per_step // self.row_length

    def derived(self) -> dict[str, float]:
        return {
            "params_total": self.params.total,
            "params_non_embedding": self.params.non_embedding,
            "flops_per_token": self.flops.per_token(),
            "flops_per_token_non_embedding": self.flops.per_token(include_head=False),
            "train_flops_per_step": self.train_flops_per_step,
            "train_flops_total": self.train_flops_per_step * self.total_steps,
            "token_budget": self.token_budget,
            "tokens_per_step": self.tokens_per_step,
            "total_steps": self.total_steps,
            "row_length": self.row_length,
        }


def row_length_for(cfg: TrainConfig) -> int:
    if cfg.task.enabled:  # one labelled example per row of data.seq_len tokens
        return cfg.data.seq_len
    return raw_row_length(cfg.objective.name, cfg.data.seq_len, **cfg.objective.options)


def decoder_length_for(cfg: TrainConfig) -> int | None:
    if cfg.objective.name != "span_corruption" or cfg.task.enabled:  # a task runs the encoder only
        return None
    return span_corruption_lengths(cfg.data.seq_len, **cfg.objective.options)[1]


def check_batch(cfg: TrainConfig) -> None:
    """Batch divisibility by micro-batches, before anything is built (``sharding.check_mesh``: by the mesh)."""
    accum = cfg.optimizer.grad_accum_steps
    if cfg.run.batch_size % accum:
        raise ConfigError(
            f"run.batch_size {cfg.run.batch_size} is not divisible by optimizer.grad_accum_steps {accum}"
        )


def make_plan(cfg: TrainConfig, vocab_size: int) -> Plan:
    """Steps from the token budget, FLOPs and parameter counts, for the real vocabulary."""
    model = replace(cfg.model, vocab_size=vocab_size)
    row_length = row_length_for(cfg)
    decoder_length = decoder_length_for(cfg)
    if decoder_length is not None and model.position == "learned" and decoder_length > model.max_seq_len:
        raise ConfigError(f"decoder length {decoder_length} is longer than the position table {model.max_seq_len}")
    params = count_params(model)
    tokens_per_step = cfg.run.batch_size * row_length
    flops = forward_flops(model, cfg.data.seq_len, decoder_length)
    if cfg.run.flops is not None:
        # Training FLOPs per raw data token, as train_flops_per_step counts them (for span
        # corruption a raw row of 568 tokens feeds 512 encoder + 114 decoder positions).
        budget = int(cfg.run.flops * row_length / flops.train)
    elif cfg.run.tokens_per_param is not None:
        budget = int(cfg.run.tokens_per_param * params.total)
    elif cfg.run.tokens is not None:
        budget = int(cfg.run.tokens)
    else:
        budget = cfg.run.steps * tokens_per_step
    if budget < tokens_per_step:
        if cfg.run.flops is not None:
            raise ConfigError(
                f"the compute budget run.flops={cfg.run.flops:.3g} buys {budget:,} tokens, less than one batch "
                f"({cfg.run.batch_size} rows x {row_length} tokens = {tokens_per_step:,})"
            )
        raise ConfigError(
            f"the token budget {budget:,} is smaller than one batch ({cfg.run.batch_size} rows x {row_length} "
            f"tokens = {tokens_per_step:,})"
        )
    return Plan(model, row_length, decoder_length, tokens_per_step, math.ceil(budget / tokens_per_step), budget, params, flops)


def load_corpus(data: DataConfig, row_length: int, tokenizer_file: str | Path | None = None) -> Corpus:
    tokenizer_file = tokenizer_file or data.tokenizer_file
    return prepare_corpus(
        data.source, dict(data.options), vocab_size=data.vocab_size, row_length=row_length,
        cache_dir=data.cache_dir, tokenizer_file=tokenizer_file,
    )


def objective_transform(cfg: TrainConfig, vocab_size: int) -> Transform:
    return make_transform(cfg.objective.name, vocab_size=vocab_size, seq_len=cfg.data.seq_len, **cfg.objective.options)


def spread_rows(rows: PackedRows, n_rows: int) -> PackedRows:
    """``n_rows`` rows evenly spaced over the whole split (every held-out document part represented)."""
    index = np.unique(np.linspace(0, rows.n_rows - 1, min(n_rows, rows.n_rows)).round().astype(np.int64))
    return replace(rows, tokens=rows.tokens[index], segment_ids=rows.segment_ids[index],
                   positions=rows.positions[index])


def validation_batches(
    rows: PackedRows, transform: Transform, *, batch_size: int, n_batches: int, seed: int,
    eval_rows: int | None = None,
) -> list[dict[str, np.ndarray]]:
    """A fixed set of validation batches (same rows, same objective noise every evaluation).

    Without ``eval_rows``: the split's first ``n_batches x batch_size`` rows. With it: that many
    rows spread evenly over the split (rounded up to whole batches, at most the split), so the
    score does not depend on the batch size or on which document comes first.
    """
    if rows.n_rows == 0:
        raise ConfigError("the validation split has no rows")
    if eval_rows is not None:
        n_batches = max(1, math.ceil(min(eval_rows, rows.n_rows) / batch_size))
        rows = spread_rows(rows, n_batches * batch_size)
        n_batches = max(1, rows.n_rows // batch_size)
    return [
        batch_at(rows, k, batch_size=batch_size, seed=seed, transform=transform, shuffle=False)
        for k in range(n_batches)
    ]
