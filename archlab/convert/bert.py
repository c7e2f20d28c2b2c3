"""BERT (``BertForMaskedLM``, also ``BertForPreTraining`` checkpoints) <-> archlab ``EncoderOnly``.

Post-LN blocks: ``attention.output.LayerNorm`` is archlab's ``self_attn_norm`` and
``output.LayerNorm`` its ``mlp_norm``. The pooler is kept when the checkpoint has one
(``BertForMaskedLM`` drops it); the next-sentence head has no archlab counterpart.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from archlab.config import ModelConfig
from archlab.convert.common import (
    ACTIVATION_FROM_HF, ACTIVATION_TO_HF, Params, Rule, add_prefix, dense, hf_to_params, norm, params_to_hf,
    refuse_inexpressible, rule, stacked, strip_prefix, warn_unused,
)
from archlab.errors import ConversionError

MODEL_TYPE = "bert"
ARCHITECTURE = "BertForMaskedLM"
FAMILY = "encoder_only"
PREFIX = "bert."
HEADS = ("cls.",)
IGNORED = ("position_ids", "cls.seq_relationship.")

HF_DEFAULTS = dict(
    vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
    hidden_act="gelu", max_position_embeddings=512, type_vocab_size=2, initializer_range=0.02,
    layer_norm_eps=1e-12, position_embedding_type="absolute", is_decoder=False, add_cross_attention=False,
    tie_word_embeddings=True,
)


def rules(cfg: ModelConfig) -> list[Rule]:
    """The whole mapping, names relative to ``bert.`` (the ``cls.`` head names are absolute)."""
    block = [
        *dense("self_attn.q", "attention.self.query"),
        *dense("self_attn.k", "attention.self.key"),
        *dense("self_attn.v", "attention.self.value"),
        *dense("self_attn.o", "attention.output.dense"),
        *norm("self_attn_norm", "attention.output.LayerNorm"),
        *dense("mlp.wi", "intermediate.dense"),
        *dense("mlp.wo", "output.dense"),
        *norm("mlp_norm", "output.LayerNorm"),
    ]
    tied_copy = ("cls.predictions.decoder.weight",) if cfg.tie_embeddings else ()
    token_types = [rule("embed.token_types.embedding", "embeddings.token_type_embeddings.weight")]
    untied = [rule("lm_head.output.kernel", "cls.predictions.decoder.weight", transpose=True)]
    head_bias = [rule("lm_head.bias", "cls.predictions.bias", "cls.predictions.decoder.bias")]
    return [
        rule("embed.tokens.embedding", "embeddings.word_embeddings.weight", *tied_copy),
        rule("embed.positions.embedding", "embeddings.position_embeddings.weight"),
        *(token_types if cfg.type_vocab_size else []),
        *norm("embed.norm", "embeddings.LayerNorm"),
        *stacked(cfg.n_layers, "layers.blocks", "encoder.layer.{i}", block),
        *dense("lm_head.transform", "cls.predictions.transform.dense"),
        *norm("lm_head.transform_norm", "cls.predictions.transform.LayerNorm"),
        *([] if cfg.tie_embeddings else untied),
        *(head_bias if cfg.head_bias else []),
        *(dense("pooler", "pooler.dense") if cfg.pooler else []),
    ]


def _normalise(tensors: Mapping[str, np.ndarray]) -> Params:
    """Drop the ``bert.`` prefix and rename the original checkpoints' LayerNorm ``gamma``/``beta``."""
    out = {}
    for name, value in strip_prefix(tensors, PREFIX).items():
        if name.endswith(".gamma"):
            name = name.removesuffix(".gamma") + ".weight"
        elif name.endswith(".beta"):
            name = name.removesuffix(".beta") + ".bias"
        out[name] = value
    return out


def from_hf(tensors: Mapping[str, np.ndarray], cfg: ModelConfig, where: str = "the checkpoint") -> Params:
    """Hugging Face BERT state dict -> archlab flat params."""
    tensors = _normalise(tensors)
    params, used = hf_to_params(tensors, rules(cfg), where)
    warn_unused(tensors, used, IGNORED, where)
    return params


def to_hf(params: Mapping[str, np.ndarray], cfg: ModelConfig) -> Params:
    """Archlab flat params -> ``BertForMaskedLM`` state dict (plus ``bert.pooler`` when archlab has one).

    Without token types archlab writes one all-zero token-type row, and without a head bias
    a zero bias: both add nothing, so the exported model computes the same logits.
    """
    tensors = params_to_hf(params, rules(cfg))
    if not cfg.type_vocab_size:
        tensors["embeddings.token_type_embeddings.weight"] = np.zeros((1, cfg.d_model), np.float32)
    if not cfg.head_bias:
        tensors["cls.predictions.bias"] = np.zeros((cfg.vocab_size,), np.float32)
    return add_prefix(tensors, PREFIX, HEADS)


def config_from_hf(hf_config: Mapping, tensors: Mapping[str, np.ndarray], where: str) -> dict:
    hf = {**HF_DEFAULTS, **hf_config}
    names = _normalise(tensors)
    if hf["position_embedding_type"] != "absolute" or hf["is_decoder"] or hf["add_cross_attention"]:
        raise ConversionError(
            f"{where} is a BERT variant (relative positions, decoder or cross-attention) archlab does not implement"
        )
    if hf["hidden_act"] not in ACTIVATION_FROM_HF:
        raise ConversionError(
            f"{where} uses hidden_act={hf['hidden_act']!r}, not one of {', '.join(ACTIVATION_FROM_HF)}"
        )
    if "cls.predictions.transform.dense.weight" not in names:
        raise ConversionError(
            f"{where} has no masked-LM head (cls.predictions.*), which archlab's EncoderOnly needs; "
            "export it as BertForMaskedLM or BertForPreTraining"
        )
    return dict(
        family=FAMILY, vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"], d_ff=hf["intermediate_size"], max_seq_len=hf["max_position_embeddings"],
        position="learned", norm="layernorm", norm_position="post", norm_eps=hf["layer_norm_eps"],
        activation=ACTIVATION_FROM_HF[hf["hidden_act"]], use_bias=True, tie_embeddings=hf["tie_word_embeddings"],
        type_vocab_size=hf["type_vocab_size"], embedding_norm=True, mlm_transform=True, head_bias=True,
        pooler="pooler.dense.weight" in names, pooling="cls", init_std=hf["initializer_range"],
    )


def config_to_hf(cfg: ModelConfig) -> dict:
    refuse_inexpressible(ARCHITECTURE, [
        (cfg.family != FAMILY, f"it is {cfg.family}, not encoder_only"),
        (cfg.position != "learned", f"BERT has learned positions, not {cfg.position}"),
        (cfg.norm != "layernorm" or cfg.norm_position != "post", "BERT uses post-LN LayerNorm"),
        (not cfg.use_bias, "BERT has biases on every projection and norm"),
        (cfg.activation not in ACTIVATION_TO_HF, f"BERT has no {cfg.activation} MLP"),
        (cfg.kv_heads != cfg.n_heads, "BERT has no grouped-query attention (n_kv_heads)"),
        (cfg.dim_per_head * cfg.n_heads != cfg.d_model, "BERT needs head_dim * n_heads == d_model"),
        (not cfg.scale_attention, "BERT always scales scores by 1/sqrt(head_dim)"),
        (not cfg.embedding_norm, "BERT always norms its embeddings (embedding_norm)"),
        (not cfg.mlm_transform, "BERT's MLM head always has its dense+norm transform (mlm_transform)"),
        (cfg.tie_embeddings and cfg.scale_tied_logits, "BERT's tied head does not scale its input"),
        (cfg.pooler and cfg.pooling != "cls", f"BERT's pooler reads the first token, not {cfg.pooling} pooling"),
    ])
    return dict(
        model_type=MODEL_TYPE, architectures=[ARCHITECTURE], vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, intermediate_size=cfg.d_ff,
        hidden_act=ACTIVATION_TO_HF[cfg.activation], max_position_embeddings=cfg.max_seq_len,
        type_vocab_size=max(cfg.type_vocab_size, 1), layer_norm_eps=cfg.norm_eps,
        initializer_range=cfg.init_std, position_embedding_type="absolute",
        tie_word_embeddings=cfg.tie_embeddings, torch_dtype="float32",
    )
