"""A pre-trained network with a task head: the states each family's recipe reads, the loss, the predictions.

The recipe (README, "Fine-tuning"):

- encoder-only: its bidirectional states; classification pools them (mean, or [CLS] with ``task.pooling=cls``).
- decoder-only: its causal states. Classification reads the last token ([EOS]), the one position that has
  seen the whole text; a tag is read at the word's last sub-word, which has seen the word and everything
  before it but nothing after; a QA span's start and end are read from states that have seen the question
  and the context up to themselves.
- encoder-decoder: its encoder's states, as encoder-only (mean pooling for classification). The decoder is
  not run: generating the label text T5-style would score the decoder's language modelling too, and the
  same head, loss and metric on every family keeps the comparison about the representations.

The backbone keeps its LM head (unused here), so a pre-trained checkpoint's parameters load unchanged.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from archlab.nn.heads import ClassificationHead, SpanHead, TaggingHead, pool
from archlab.objectives.losses import cross_entropy_and_accuracy

Array = jax.Array


def classification_pooling(task_pooling: str, family: str) -> str:
    """The pooling a classification run uses (``task.pooling=auto``: the family's recipe)."""
    if task_pooling != "auto":
        return task_pooling
    return "last" if family == "decoder_only" else "mean"


class TaskModel(nnx.Module):
    """``backbone`` (any family's ``LanguageModel``) and a task ``head`` on its states."""

    def __init__(self, backbone: Any, task: str, n_outputs: int, *, pooling: str, max_answer_tokens: int, seed: int):
        self.backbone = backbone
        self.task = task
        self.family = backbone.cfg.family
        self.pooling = classification_pooling(pooling, self.family)
        self.max_answer_tokens = max_answer_tokens
        rngs = nnx.Rngs(params=seed + 1)  # a stream of the run seed apart from the backbone's
        cfg = backbone.cfg
        if task == "classification":
            self.head = ClassificationHead(cfg, n_outputs, rngs=rngs)
        elif task == "tagging":
            self.head = TaggingHead(cfg, n_outputs, rngs=rngs)
        else:
            self.head = SpanHead(cfg, rngs=rngs)

    def states(self, batch: Mapping[str, Array], dropout_key: Array | None = None) -> Array:
        """``[B, T, D]``: the encoder's states, or the decoder-only model's causal ones."""
        inputs = dict(segment_ids_BT=batch["segment_ids"], positions_BT=batch["positions"], dropout_key=dropout_key)
        if self.family == "encoder_decoder":
            return self.backbone.encode(batch["tokens"], segment_ids_BS=batch["segment_ids"],
                                        positions_BS=batch["positions"], dropout_key=dropout_key)
        return self.backbone.hidden(batch["tokens"], **inputs)[0]

    def outputs(self, batch: Mapping[str, Array], dropout_key: Array | None = None):
        """Class logits ``[B, C]``, tag logits ``[B, T, C]``, or span (start, end) logits ``[B, T]`` each."""
        hidden_BTD = self.states(batch, dropout_key)
        segment_ids_BT = batch["segment_ids"]
        if self.task == "classification":
            pooled_BD = pool(hidden_BTD, segment_ids_BT, self.pooling)
            pooler = getattr(self.backbone, "pooler", None)
            if pooler is not None and self.pooling == "cls":  # BERT's tanh pooler, trained by its NSP head
                pooled_BD = jnp.tanh(pooler(pooled_BD))
            return self.head(hidden_BTD, segment_ids_BT, pooled_BD)
        if self.task == "tagging":
            return self.head(hidden_BTD)
        # Only context tokens can start or end an answer.
        return self.head(hidden_BTD, (batch["context_mask"] > 0).astype(jnp.int32))

    def loss_and_metrics(self, batch: Mapping[str, Array], dropout_key: Array | None = None
                         ) -> tuple[Array, dict[str, Array]]:
        """Mean cross-entropy over the weighted targets, and the sums ``loss_and_metrics`` returns."""
        return self._loss(self.outputs(batch, dropout_key), batch)

    def _loss(self, out, batch: Mapping[str, Array]) -> tuple[Array, dict[str, Array]]:
        if self.task == "classification":
            loss_sum, correct_sum, weight_sum = cross_entropy_and_accuracy(
                out[:, None, :], batch["labels"][:, None], batch["weights"][:, None])
        elif self.task == "tagging":
            weights_BT = batch["tag_weights"] * batch["weights"][:, None]
            loss_sum, correct_sum, weight_sum = cross_entropy_and_accuracy(out, batch["tags"], weights_BT)
        else:
            weights_B1 = batch["weights"][:, None]
            start = cross_entropy_and_accuracy(out[0][:, None, :], batch["starts"][:, None], weights_B1)
            end = cross_entropy_and_accuracy(out[1][:, None, :], batch["ends"][:, None], weights_B1)
            # The mean of the two ends' losses (as BERT's SQuAD recipe); "correct" is the mean of the two hits.
            loss_sum, correct_sum, weight_sum = (start[0] + end[0]) / 2, (start[1] + end[1]) / 2, start[2]
        loss = loss_sum / jnp.maximum(weight_sum, 1.0)
        return loss, {"loss_sum": loss_sum, "weight_sum": weight_sum, "correct_sum": correct_sum}

    def predict(self, batch: Mapping[str, Array]) -> Array:
        """Labels ``[B]``, tags ``[B, T]``, or the best span's (start, end) ``[B, 2]`` (start <= end,
        at most ``max_answer_tokens`` long, inside the context)."""
        return self._predict(self.outputs(batch))

    def scores(self, batch: Mapping[str, Array]) -> tuple[dict[str, Array], Array]:
        """Evaluation in one forward pass: the loss sums (``loss_and_metrics``) and the predictions (``predict``)."""
        out = self.outputs(batch)
        return self._loss(out, batch)[1], self._predict(out)

    def _predict(self, out) -> Array:
        if self.task != "qa":
            return jnp.argmax(out, axis=-1).astype(jnp.int32)
        start_BT, end_BT = out
        length = start_BT.shape[1]
        offset_TT = jnp.arange(length)[None, :] - jnp.arange(length)[:, None]  # end - start
        allowed_TT = (offset_TT >= 0) & (offset_TT < self.max_answer_tokens)
        score_BTT = jnp.where(allowed_TT, start_BT[:, :, None] + end_BT[:, None, :], -jnp.inf)
        best_B = jnp.argmax(score_BTT.reshape(score_BTT.shape[0], -1), axis=-1)
        return jnp.stack([best_B // length, best_B % length], axis=-1).astype(jnp.int32)
