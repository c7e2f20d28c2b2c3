"""Objective batches meet networks: logits for any family, and the weighted loss.

The objective transforms produce batches whose keys say what they are; this module
routes them to the matching model call. The networks themselves never see a loss.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from archlab.objectives.losses import cross_entropy_and_accuracy

Array = jax.Array

# Keys of a batch that the model does not consume (loss-side only).
LOSS_KEYS = ("targets", "decoder_targets", "weights")


def logits_and_targets(model: Any, batch: Mapping[str, Array]) -> tuple[Array, Array, Array]:
    """``(logits_BTV, targets_BT, weights_BT)`` for an objective batch and a model of its family."""
    family = model.cfg.family
    if family == "encoder_decoder":
        logits_BTV = model(
            batch["encoder_inputs"], batch["decoder_inputs"],
            encoder_segment_ids_BS=batch["encoder_segment_ids"], encoder_positions_BS=batch["encoder_positions"],
            decoder_segment_ids_BT=batch["decoder_segment_ids"], decoder_positions_BT=batch["decoder_positions"],
        )
        return logits_BTV, batch["decoder_targets"], batch["weights"]
    kwargs = dict(segment_ids_BT=batch["segment_ids"], positions_BT=batch["positions"])
    if family == "decoder_only" and "prefix_mask" in batch:
        kwargs["prefix_BT"] = batch["prefix_mask"]
    return model(batch["inputs"], **kwargs), batch["targets"], batch["weights"]


def loss_and_metrics(model: Any, batch: Mapping[str, Array]) -> tuple[Array, dict[str, Array]]:
    """Mean token cross-entropy over weighted targets, and the sums that aggregate across batches."""
    logits_BTV, targets_BT, weights_BT = logits_and_targets(model, batch)
    loss_sum, correct_sum, weight_sum = cross_entropy_and_accuracy(logits_BTV, targets_BT, weights_BT)
    loss = loss_sum / jnp.maximum(weight_sum, 1.0)
    return loss, {"loss_sum": loss_sum, "weight_sum": weight_sum, "correct_sum": correct_sum}
