"""GPT-2 (``GPT2LMHeadModel``) <-> archlab ``DecoderOnly``.

GPT-2's ``Conv1D`` stores weights ``[in, out]`` like archlab, so nothing is transposed;
``c_attn`` is q|k|v fused along its output axis.
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

MODEL_TYPE = "gpt2"
ARCHITECTURE = "GPT2LMHeadModel"
FAMILY = "decoder_only"
PREFIX = "transformer."
HEADS = ("lm_head.",)
IGNORED = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers in old checkpoints

# transformers' GPT2Config defaults, for config.json files that leave keys out.
HF_DEFAULTS = dict(
    vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12, n_inner=None,
    activation_function="gelu_new", layer_norm_epsilon=1e-5, initializer_range=0.02, scale_attn_weights=True,
    scale_attn_by_inverse_layer_idx=False, add_cross_attention=False, tie_word_embeddings=True,
)


def rules(cfg: ModelConfig) -> list[Rule]:
    """The whole mapping, names relative to ``transformer.``."""
    conv1d = dict(transpose=False)
    qkv = [
        rule(f"self_attn.{name}.{leaf}", f"attn.c_attn.{hf_leaf}", part=(index, 3))
        for leaf, hf_leaf in (("kernel", "weight"), ("bias", "bias"))
        for index, name in enumerate("qkv")
    ]
    block = [
        *norm("self_attn_norm", "ln_1"),
        *qkv,
        *dense("self_attn.o", "attn.c_proj", **conv1d),
        *norm("mlp_norm", "ln_2"),
        *dense("mlp.wi", "mlp.c_fc", **conv1d),
        *dense("mlp.wo", "mlp.c_proj", **conv1d),
    ]
    tied_copy = ("lm_head.weight",) if cfg.tie_embeddings else ()
    head = [] if cfg.tie_embeddings else [rule("lm_head.output.kernel", "lm_head.weight", transpose=True)]
    return [
        rule("embed.tokens.embedding", "wte.weight", *tied_copy),
        rule("embed.positions.embedding", "wpe.weight"),
        *stacked(cfg.n_layers, "layers.blocks", "h.{i}", block),
        *norm("final_norm", "ln_f"),
        *head,
    ]


def from_hf(tensors: Mapping[str, np.ndarray], cfg: ModelConfig, where: str = "the checkpoint") -> Params:
    """Hugging Face GPT-2 state dict (with or without ``transformer.``) -> archlab flat params."""
    tensors = strip_prefix(tensors, PREFIX)
    params, used = hf_to_params(tensors, rules(cfg), where)
    warn_unused(tensors, used, IGNORED, where)
    return params


def to_hf(params: Mapping[str, np.ndarray], cfg: ModelConfig) -> Params:
    """Archlab flat params -> ``GPT2LMHeadModel`` state dict."""
    return add_prefix(params_to_hf(params, rules(cfg)), PREFIX, HEADS)


def config_from_hf(hf_config: Mapping, tensors: Mapping[str, np.ndarray], where: str) -> dict:
    hf = {**HF_DEFAULTS, **hf_config}
    if hf["scale_attn_by_inverse_layer_idx"] or not hf["scale_attn_weights"] or hf["add_cross_attention"]:
        raise ConversionError(
            f"{where} uses a GPT-2 attention variant (scale_attn_by_inverse_layer_idx, unscaled scores or "
            "cross-attention) that archlab does not implement"
        )
    if hf["activation_function"] not in ACTIVATION_FROM_HF:
        raise ConversionError(f"{where} uses activation_function={hf['activation_function']!r}, "
                              f"not one of {', '.join(ACTIVATION_FROM_HF)}")
    return dict(
        family=FAMILY, vocab_size=hf["vocab_size"], d_model=hf["n_embd"], n_layers=hf["n_layer"],
        n_heads=hf["n_head"], d_ff=hf["n_inner"] or 4 * hf["n_embd"], max_seq_len=hf["n_positions"],
        position="learned", norm="layernorm", norm_position="pre", norm_eps=hf["layer_norm_epsilon"],
        activation=ACTIVATION_FROM_HF[hf["activation_function"]], use_bias=True,
        tie_embeddings=hf["tie_word_embeddings"], init_std=hf["initializer_range"],
    )


def config_to_hf(cfg: ModelConfig) -> dict:
    refuse_inexpressible(ARCHITECTURE, [
        (cfg.family != FAMILY, f"it is {cfg.family}, not decoder_only"),
        (cfg.position != "learned", f"GPT-2 has learned positions, not {cfg.position}"),
        (cfg.norm != "layernorm" or cfg.norm_position != "pre", "GPT-2 uses pre-LN LayerNorm"),
        (not cfg.use_bias, "GPT-2 has biases on every projection and norm"),
        (cfg.activation not in ACTIVATION_TO_HF, f"GPT-2 has no {cfg.activation} MLP"),
        (cfg.kv_heads != cfg.n_heads, "GPT-2 has no grouped-query attention (n_kv_heads)"),
        (cfg.dim_per_head * cfg.n_heads != cfg.d_model, "GPT-2 needs head_dim * n_heads == d_model"),
        (not cfg.scale_attention, "GPT-2 always scales scores by 1/sqrt(head_dim)"),
        (cfg.type_vocab_size > 0, "GPT-2 has no token-type embeddings"),
        (cfg.embedding_norm or cfg.mlm_transform or cfg.head_bias, "GPT-2 has no embedding norm or MLM head"),
        (cfg.tie_embeddings and cfg.scale_tied_logits, "GPT-2's tied head does not scale its input"),
    ])
    return dict(
        model_type=MODEL_TYPE, architectures=[ARCHITECTURE], vocab_size=cfg.vocab_size,
        n_positions=cfg.max_seq_len, n_embd=cfg.d_model, n_layer=cfg.n_layers, n_head=cfg.n_heads,
        n_inner=cfg.d_ff, activation_function=ACTIVATION_TO_HF[cfg.activation],
        layer_norm_epsilon=cfg.norm_eps, initializer_range=cfg.init_std,
        tie_word_embeddings=cfg.tie_embeddings, torch_dtype="float32",
    )
