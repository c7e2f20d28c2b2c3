"""Pre-training objectives: host-side batch transforms, losses and the objective registry."""

from archlab.objectives.clm import next_token_targets, read_packed_batch
from archlab.objectives.losses import weighted_accuracy, weighted_cross_entropy
from archlab.objectives.mlm import mask_tokens
from archlab.objectives.prefix_lm import split_prefix
from archlab.objectives.registry import (
    FAMILIES,
    OBJECTIVE_FAMILY,
    check_compatible,
    make_transform,
    raw_row_length,
)
from archlab.objectives.span_corruption import (
    compute_input_and_target_lengths,
    corrupt_spans,
    random_spans_noise_mask,
    span_corruption_lengths,
)

__all__ = [
    "FAMILIES",
    "OBJECTIVE_FAMILY",
    "check_compatible",
    "compute_input_and_target_lengths",
    "corrupt_spans",
    "make_transform",
    "mask_tokens",
    "next_token_targets",
    "random_spans_noise_mask",
    "raw_row_length",
    "read_packed_batch",
    "span_corruption_lengths",
    "split_prefix",
    "weighted_accuracy",
    "weighted_cross_entropy",
]
