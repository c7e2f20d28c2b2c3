"""Output heads: the (masked) LM head, and task heads for the families' classic uses.

Task heads take hidden states from any family's ``hidden()``/``encode()``:
sequence classification (sentiment), token tagging (NER, chunking) and extractive
span QA (start/end logits).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from archlab.config import ModelConfig
from archlab.errors import ConfigError
from archlab.nn.layers import Dense, Embedding, Norm, activation_fn, compute_dtype, project_padded

Array = jax.Array


class LMHead(nnx.Module):
    """Hidden states to vocabulary logits: tied to the token table or its own matrix.

    BERT adds a dense+activation+norm transform and an output bias; T5 v1.0 scales
    the input of its tied head by ``d_model ** -0.5``.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        dtype = compute_dtype(cfg)
        self.tied = cfg.tie_embeddings
        self.input_scale = cfg.d_model**-0.5 if (cfg.tie_embeddings and cfg.scale_tied_logits) else None
        self.act = activation_fn(cfg.activation)
        self.transform = (
            Dense(cfg.d_model, cfg.d_model, use_bias=cfg.use_bias, std=cfg.init_std, dtype=dtype, rngs=rngs)
            if cfg.mlm_transform else None
        )
        self.transform_norm = Norm(cfg) if cfg.mlm_transform else None
        self.output = (
            None if self.tied
            else Dense(cfg.d_model, cfg.vocab_size, use_bias=False, std=cfg.init_std, dtype=dtype, rngs=rngs)
        )
        self.bias = nnx.Param(jnp.zeros((cfg.vocab_size,), jnp.float32)) if cfg.head_bias else None
        self.pad_multiple = cfg.logits_pad_multiple

    def __call__(self, hidden_BTD: Array, token_table: Embedding) -> Array:
        features_BTD = self.features(hidden_BTD)
        table_VD, bias_V = self.output_weights(token_table)
        x_MD = features_BTD.reshape(-1, features_BTD.shape[-1]).astype(table_VD.dtype)
        logits_MV = project_padded(x_MD, table_VD.T, self.pad_multiple)
        if bias_V is not None:
            logits_MV = logits_MV + bias_V
        return logits_MV.reshape(*features_BTD.shape[:-1], logits_MV.shape[-1])

    def features(self, hidden_BTD: Array) -> Array:
        """What the output matrix multiplies: the hidden states after the MLM transform / T5 scale."""
        if self.transform is not None:
            hidden_BTD = self.transform_norm(self.act(self.transform(hidden_BTD)))
        if self.input_scale is not None:
            hidden_BTD = hidden_BTD * self.input_scale
        return hidden_BTD

    def output_weights(self, token_table: Embedding) -> tuple[Array, Array | None]:
        """``(table_VD, bias_V or None)`` in the compute dtype: ``logits = features @ table_VD.T + bias``.

        ``__call__`` multiplies by them; the fused head-and-loss
        (``objectives.losses.head_cross_entropy_and_accuracy``) reads them without materialising the logits.
        """
        if self.tied:
            table_VD = token_table.embedding[...].astype(token_table.dtype)
        else:
            table_VD = self.output.kernel[...].astype(self.output.dtype).T
        bias_V = None if self.bias is None else self.bias[...].astype(table_VD.dtype)
        return table_VD, bias_V


def pool(hidden_BTD: Array, segment_ids_BT: Array, how: str) -> Array:
    """One vector per sequence: first token (``cls``), mean over non-padding, or last non-padding."""
    valid_BT = (segment_ids_BT != 0).astype(hidden_BTD.dtype)
    if how == "cls":
        return hidden_BTD[:, 0]
    if how == "mean":
        total_BD = jnp.einsum("btd,bt->bd", hidden_BTD, valid_BT)
        return total_BD / jnp.maximum(valid_BT.sum(axis=1, keepdims=True), 1.0)
    if how == "last":
        last_B = jnp.maximum(valid_BT.sum(axis=1).astype(jnp.int32) - 1, 0)
        return jnp.take_along_axis(hidden_BTD, last_B[:, None, None], axis=1)[:, 0]
    raise ConfigError(f"pooling {how!r} is not one of cls, mean, last")


class ClassificationHead(nnx.Module):
    """Pooled sequence vector to class logits ``[B, C]`` (e.g. sentiment)."""

    def __init__(self, cfg: ModelConfig, n_classes: int, *, rngs: nnx.Rngs):
        if n_classes < 2:
            raise ConfigError(f"a classification head needs at least 2 classes, got {n_classes}")
        self.how = cfg.pooling
        self.classifier = Dense(cfg.d_model, n_classes, use_bias=True, std=cfg.init_std, dtype=compute_dtype(cfg), rngs=rngs)

    def __call__(self, hidden_BTD: Array, segment_ids_BT: Array, pooled_BD: Array | None = None) -> Array:
        pooled_BD = pool(hidden_BTD, segment_ids_BT, self.how) if pooled_BD is None else pooled_BD
        return self.classifier(pooled_BD)


class TaggingHead(nnx.Module):
    """Per-token tag logits ``[B, T, C]`` (named entities, chunks)."""

    def __init__(self, cfg: ModelConfig, n_tags: int, *, rngs: nnx.Rngs):
        if n_tags < 2:
            raise ConfigError(f"a tagging head needs at least 2 tags, got {n_tags}")
        self.classifier = Dense(cfg.d_model, n_tags, use_bias=True, std=cfg.init_std, dtype=compute_dtype(cfg), rngs=rngs)

    def __call__(self, hidden_BTD: Array) -> Array:
        return self.classifier(hidden_BTD)


class SpanHead(nnx.Module):
    """Extractive QA: start and end logits ``[B, T]`` each; padding positions get -inf-like logits."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.classifier = Dense(cfg.d_model, 2, use_bias=True, std=cfg.init_std, dtype=compute_dtype(cfg), rngs=rngs)

    def __call__(self, hidden_BTD: Array, segment_ids_BT: Array) -> tuple[Array, Array]:
        logits_BT2 = self.classifier(hidden_BTD).astype(jnp.float32)
        logits_BT2 = jnp.where((segment_ids_BT != 0)[..., None], logits_BT2, -1e9)
        return logits_BT2[..., 0], logits_BT2[..., 1]
