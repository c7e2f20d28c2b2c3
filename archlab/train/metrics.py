"""Aggregating evaluation sums into loss, perplexity, accuracy and bits per byte; the progress bar."""

from __future__ import annotations

import math

from tqdm.auto import tqdm


class Aggregate:
    """Running sums of ``loss_sum``, ``weight_sum`` and ``correct_sum`` over batches."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}

    def add(self, batch_sums: dict) -> None:
        for key in ("loss_sum", "weight_sum", "correct_sum"):
            self.sums[key] = self.sums.get(key, 0.0) + float(batch_sums[key])


def eval_metrics(totals: Aggregate, bytes_per_token: float, prefix: str) -> dict[str, float]:
    """Mean loss per target token (nats), perplexity, token accuracy and bits per byte.

    Bits per byte = loss / ln 2 / (bytes per token): comparable across tokenizers.
    """
    weight = max(totals.sums["weight_sum"], 1.0)
    loss = totals.sums["loss_sum"] / weight
    return {
        f"{prefix}/loss": loss,
        f"{prefix}/perplexity": math.exp(min(loss, 50.0)),
        f"{prefix}/accuracy": totals.sums["correct_sum"] / weight,
        f"{prefix}/bits_per_byte": loss / math.log(2) / bytes_per_token,
        f"{prefix}/target_tokens": totals.sums["weight_sum"],
    }


def progress_bar(enabled: bool, start: int, total: int) -> tqdm:
    return tqdm(total=total, initial=start, disable=not enabled, unit="step", dynamic_ncols=True, leave=True)
