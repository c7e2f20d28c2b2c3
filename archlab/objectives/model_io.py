"""Objective batches meet networks: logits for any family, and the weighted loss.

The objective transforms produce batches whose keys say what they are; every model reads its own
inputs from them (``batch_hidden``) and names its targets' key (``TARGETS``), so nothing here
branches on the family. The networks themselves never see a loss.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from archlab.objectives.losses import cross_entropy_and_accuracy, head_cross_entropy_and_accuracy

Array = jax.Array

# Keys of a batch that the model does not consume (loss-side only).
LOSS_KEYS = ("targets", "decoder_targets", "weights", "prediction_positions")


def hidden_and_targets(model: Any, batch: Mapping[str, Array], dropout_key: Array | None = None
                       ) -> tuple[Array, Array, Array]:
    """``(hidden_BTD, targets_BT, weights_BT)``: the final hidden states that the LM head reads.

    A batch with ``prediction_positions`` ``[B, K]`` (masked LM) gets all three at those K
    positions only (``T`` becomes ``K``): the head and the loss then skip the positions that carry
    no loss, and every weighted position is among the K, so the loss is unchanged.
    """
    hidden_BTD = model.batch_hidden(batch, dropout_key)
    targets_BT, weights_BT = batch[model.TARGETS], batch["weights"]
    if "prediction_positions" not in batch:
        return hidden_BTD, targets_BT, weights_BT
    positions_BK = batch["prediction_positions"].astype(jnp.int32)
    return (
        jnp.take_along_axis(hidden_BTD, positions_BK[..., None], axis=1),
        jnp.take_along_axis(targets_BT, positions_BK, axis=1),
        jnp.take_along_axis(weights_BT, positions_BK, axis=1),
    )


def logits_and_targets(model: Any, batch: Mapping[str, Array], dropout_key: Array | None = None
                       ) -> tuple[Array, Array, Array]:
    """``(logits_BTV, targets_BT, weights_BT)`` for an objective batch and a model of its family."""
    hidden_BTD, targets_BT, weights_BT = hidden_and_targets(model, batch, dropout_key)
    return model.logits(hidden_BTD), targets_BT, weights_BT


def loss_and_metrics(model: Any, batch: Mapping[str, Array], dropout_key: Array | None = None
                     ) -> tuple[Array, dict[str, Array]]:
    """Mean token cross-entropy over weighted targets, and the sums that aggregate across batches
    (``dropout_key``: training's dropout draws; None evaluates).

    With ``model.head_chunk > 0`` (512 on the CPU by default) the output head and the loss run fused, chunk by
    chunk (``head_cross_entropy_and_accuracy``); with 0 the logits are materialised first. Both
    give the same values and gradients (tests/test_objectives.py).
    """
    if hasattr(model, "loss_and_metrics"):  # a task head on a backbone (tasks/model.py) scores its own targets
        return model.loss_and_metrics(batch, dropout_key)
    chunk = model.cfg.head_chunk
    if chunk > 0:
        hidden_BTD, targets_BT, weights_BT = hidden_and_targets(model, batch, dropout_key)
        features_BTD = model.lm_head.features(hidden_BTD)
        table_VD, bias_V = model.head_weights()
        loss_sum, correct_sum, weight_sum = head_cross_entropy_and_accuracy(
            features_BTD.reshape(-1, features_BTD.shape[-1]), table_VD, bias_V,
            targets_BT.reshape(-1), weights_BT.reshape(-1), chunk=chunk,
        )
    else:
        logits_BTV, targets_BT, weights_BT = logits_and_targets(model, batch, dropout_key)
        loss_sum, correct_sum, weight_sum = cross_entropy_and_accuracy(logits_BTV, targets_BT, weights_BT)
    loss = loss_sum / jnp.maximum(weight_sum, 1.0)
    return loss, {"loss_sum": loss_sum, "weight_sum": weight_sum, "correct_sum": correct_sum}
