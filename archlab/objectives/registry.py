"""Which objective trains which model family, and the host-side transform for each objective."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from archlab.config import FAMILIES
from archlab.errors import ConfigError, DataError, IncompatibleObjectiveError
from archlab.objectives.clm import next_token_targets
from archlab.objectives.mlm import mask_tokens
from archlab.objectives.prefix_lm import split_prefix
from archlab.objectives.span_corruption import corrupt_spans, span_corruption_lengths

Transform = Callable[[Mapping[str, np.ndarray], np.random.Generator], dict[str, np.ndarray]]

OBJECTIVE_FAMILY: dict[str, str] = {
    "mlm": "encoder_only",
    "clm": "decoder_only",
    "prefix_lm": "decoder_only",
    "span_corruption": "encoder_decoder",
}

# The function whose keyword options each objective accepts (beyond vocab_size / lengths).
_OPTION_SOURCE: dict[str, Callable[..., Any]] = {
    "mlm": mask_tokens,
    "clm": next_token_targets,
    "prefix_lm": split_prefix,
    "span_corruption": corrupt_spans,
}
_FIXED_ARGS = {"vocab_size", "inputs_length", "segment_ids_BR"}


def _check_objective(objective: str) -> None:
    if objective not in OBJECTIVE_FAMILY:
        raise ConfigError(f"unknown objective '{objective}'; known objectives: {', '.join(OBJECTIVE_FAMILY)}")


def check_compatible(family: str, objective: str) -> None:
    """Refuse an objective/model-family pairing that cannot train, with one sentence saying what would."""
    _check_objective(objective)
    if family not in FAMILIES:
        raise ConfigError(f"unknown model family '{family}'; known families: {', '.join(FAMILIES)}")
    trains = OBJECTIVE_FAMILY[objective]
    if trains != family:
        fits = [name for name, fam in OBJECTIVE_FAMILY.items() if fam == family]
        raise IncompatibleObjectiveError(
            f"objective '{objective}' trains {trains} models, not {family} (use objective={' or '.join(fits)})"
        )


def _check_options(objective: str, options: Mapping[str, Any]) -> None:
    params = inspect.signature(_OPTION_SOURCE[objective]).parameters
    allowed = sorted(n for n, p in params.items() if p.kind is p.KEYWORD_ONLY and n not in _FIXED_ARGS)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigError(
            f"objective '{objective}' does not take option(s) {unknown}; it takes {allowed or 'no options'}"
        )


def raw_row_length(objective: str, seq_len: int, **options: Any) -> int:
    """Length of the packed rows the data pipeline must produce for a model of length ``seq_len``.

    ``seq_len`` for mlm, clm and prefix_lm. For span_corruption ``seq_len`` is the encoder
    length and the raw row is T5's full ``tokens_length`` (568 for 512), with nothing
    subtracted: noise is drawn over all raw tokens and EOS is appended after corruption.
    """
    _check_objective(objective)
    _check_options(objective, options)
    if objective == "span_corruption":
        return span_corruption_lengths(seq_len, **options)[0]
    return seq_len


def make_transform(objective: str, *, vocab_size: int, seq_len: int, **options: Any) -> Transform:
    """The pure host transform ``(packed batch, rng) -> model batch`` for ``objective``.

    Options are validated now (by name, then by a dry run on an all-padding batch) so a bad
    configuration fails before anything is compiled. The transform checks that each batch
    has rows of ``raw_row_length(objective, seq_len, **options)`` tokens.
    """
    row_length = raw_row_length(objective, seq_len, **options)

    def transform(batch: Mapping[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        width = np.shape(batch["tokens"])[-1]
        if width != row_length:
            raise DataError(f"objective '{objective}' expects packed rows of {row_length} tokens, got {width}")
        if objective == "mlm":
            return mask_tokens(batch, rng, vocab_size=vocab_size, **options)
        if objective == "clm":
            return next_token_targets(batch, rng)
        if objective == "prefix_lm":
            return split_prefix(batch, rng, **options)
        return corrupt_spans(
            batch["tokens"],
            rng,
            vocab_size=vocab_size,
            inputs_length=seq_len,
            segment_ids_BR=batch.get("segment_ids"),
            **options,
        )

    empty = np.zeros((1, row_length), np.int32)
    transform({"tokens": empty, "segment_ids": empty, "positions": empty}, np.random.default_rng(0))
    return transform
