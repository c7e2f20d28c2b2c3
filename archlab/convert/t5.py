"""T5 (``T5ForConditionalGeneration``, v1.0 and v1.1) <-> archlab ``EncoderDecoder``.

Encoder blocks hold ``layer.0`` self-attention and ``layer.1`` MLP; decoder blocks add
``layer.1`` cross-attention (``EncDecAttention``) and move the MLP to ``layer.2``. The
relative-position table lives in block 0 of each stack and is shared by all its layers
(archlab's ``encoder_bias`` / ``decoder_bias``). v1.0 ties its head and scales the head's
input by ``d_model**-0.5``; v1.1 has a gated-GELU MLP and its own ``lm_head``.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from archlab.config import ModelConfig
from archlab.convert.common import (
    ACTIVATION_FROM_HF, ACTIVATION_TO_HF, Params, Rule, dense, hf_to_params, norm, params_to_hf,
    refuse_inexpressible, rule, stacked, warn_unused,
)
from archlab.errors import ConversionError

MODEL_TYPE = "t5"
ARCHITECTURE = "T5ForConditionalGeneration"
FAMILY = "encoder_decoder"
IGNORED = ("EncDecAttention.relative_attention_bias",)  # unused copy in old checkpoints

# The gate's activation of the gated MLP (``gated-<act>``); transformers reads ``gated-gelu`` as gelu_new.
GATED_FROM_HF = {"gelu": "geglu", "gelu_new": "geglu", "relu": "reglu", "silu": "swiglu"}
GATED_TO_HF = {"geglu": "gelu", "reglu": "relu", "swiglu": "silu"}

HF_DEFAULTS = dict(
    vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_decoder_layers=None, num_heads=8,
    relative_attention_num_buckets=32, relative_attention_max_distance=128, layer_norm_epsilon=1e-6,
    feed_forward_proj="relu", tie_word_embeddings=True, n_positions=512,
)


def rules(cfg: ModelConfig) -> list[Rule]:
    """The whole mapping; T5 has no biases, and its ``Linear`` weights are ``[out, in]``."""
    linear = dict(bias=False)

    def attention(archlab: str, hf: str) -> list[Rule]:
        return [r for p in "qkvo" for r in dense(f"{archlab}.{p}", f"{hf}.{p}", **linear)]

    def mlp(layer: int) -> list[Rule]:
        ff = f"layer.{layer}.DenseReluDense"
        # Gated: wi_0 is the gate (activation applied), wi_1 the linear branch.
        gated = [*dense("mlp.wi", f"{ff}.wi_0", **linear), *dense("mlp.wi_up", f"{ff}.wi_1", **linear)]
        wi = gated if cfg.is_gated else dense("mlp.wi", f"{ff}.wi", **linear)
        return [*wi, *dense("mlp.wo", f"{ff}.wo", **linear), *norm("mlp_norm", f"layer.{layer}.layer_norm", bias=False)]

    self_attention = [
        *attention("self_attn", "layer.0.SelfAttention"), *norm("self_attn_norm", "layer.0.layer_norm", bias=False),
    ]
    cross_attention = [
        *attention("cross_attn", "layer.1.EncDecAttention"), *norm("cross_attn_norm", "layer.1.layer_norm", bias=False),
    ]
    tied_copy = ("lm_head.weight",) if cfg.tie_embeddings else ()
    bias = "block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    return [
        rule("embed.tokens.embedding", "shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
             *tied_copy),
        rule("encoder_bias.embedding", f"encoder.{bias}"),
        rule("decoder_bias.embedding", f"decoder.{bias}"),
        *stacked(cfg.n_layers, "encoder.blocks", "encoder.block.{i}", [*self_attention, *mlp(1)]),
        *stacked(cfg.decoder_layers, "decoder.blocks", "decoder.block.{i}",
                 [*self_attention, *cross_attention, *mlp(2)]),
        *norm("encoder_norm", "encoder.final_layer_norm", bias=False),
        *norm("decoder_norm", "decoder.final_layer_norm", bias=False),
        *([] if cfg.tie_embeddings else [rule("lm_head.output.kernel", "lm_head.weight", transpose=True)]),
    ]


def from_hf(tensors: Mapping[str, np.ndarray], cfg: ModelConfig, where: str = "the checkpoint") -> Params:
    """Hugging Face T5 state dict -> archlab flat params."""
    params, used = hf_to_params(tensors, rules(cfg), where)
    warn_unused(tensors, used, IGNORED, where)
    return params


def to_hf(params: Mapping[str, np.ndarray], cfg: ModelConfig) -> Params:
    """Archlab flat params -> ``T5ForConditionalGeneration`` state dict."""
    return params_to_hf(params, rules(cfg))


def _activation(feed_forward_proj: str, where: str) -> str:
    gated, _, act = feed_forward_proj.rpartition("-")
    table = GATED_FROM_HF if gated == "gated" else ACTIVATION_FROM_HF if not gated else {}
    if act not in table:
        raise ConversionError(f"{where} uses feed_forward_proj={feed_forward_proj!r}, which archlab does not implement")
    return table[act]


def config_from_hf(hf_config: Mapping, tensors: Mapping[str, np.ndarray], where: str) -> dict:
    hf = {**HF_DEFAULTS, **hf_config}
    d_model, n_heads, head_dim = hf["d_model"], hf["num_heads"], hf["d_kv"]
    n_decoder = hf["num_decoder_layers"]
    tied = hf["tie_word_embeddings"]
    return dict(
        family=FAMILY, vocab_size=hf["vocab_size"], d_model=d_model, n_layers=hf["num_layers"],
        n_decoder_layers=None if n_decoder in (None, hf["num_layers"]) else n_decoder, n_heads=n_heads,
        head_dim=None if head_dim * n_heads == d_model else head_dim, d_ff=hf["d_ff"],
        max_seq_len=hf["n_positions"], position="relative", relative_buckets=hf["relative_attention_num_buckets"],
        relative_max_distance=hf["relative_attention_max_distance"], norm="rmsnorm", norm_position="pre",
        norm_eps=hf["layer_norm_epsilon"], activation=_activation(hf["feed_forward_proj"], where), use_bias=False,
        tie_embeddings=tied, scale_tied_logits=tied, scale_attention=False,
    )


def config_to_hf(cfg: ModelConfig) -> dict:
    refuse_inexpressible(ARCHITECTURE, [
        (cfg.family != FAMILY, f"it is {cfg.family}, not encoder_decoder"),
        (cfg.position != "relative", f"T5 has relative position buckets, not {cfg.position} positions"),
        (cfg.norm != "rmsnorm" or cfg.norm_position != "pre", "T5 uses pre-norm RMSNorm"),
        (cfg.use_bias, "T5 has no biases"),
        (cfg.activation not in ACTIVATION_TO_HF and not cfg.is_gated, f"T5 has no {cfg.activation} MLP"),
        (cfg.kv_heads != cfg.n_heads, "T5 has no grouped-query attention (n_kv_heads)"),
        (cfg.scale_attention, "T5 never scales scores by 1/sqrt(head_dim)"),
        (cfg.embedding_norm or cfg.mlm_transform or cfg.head_bias, "T5 has no embedding norm or MLM head"),
        (cfg.tie_embeddings and not cfg.scale_tied_logits, "T5's tied head always scales its input by d_model**-0.5"),
    ])
    proj = f"gated-{GATED_TO_HF[cfg.activation]}" if cfg.is_gated else ACTIVATION_TO_HF[cfg.activation]
    return dict(
        model_type=MODEL_TYPE, architectures=[ARCHITECTURE], vocab_size=cfg.vocab_size, d_model=cfg.d_model,
        d_kv=cfg.dim_per_head, d_ff=cfg.d_ff, num_layers=cfg.n_layers, num_decoder_layers=cfg.decoder_layers,
        num_heads=cfg.n_heads, relative_attention_num_buckets=cfg.relative_buckets,
        relative_attention_max_distance=cfg.relative_max_distance, layer_norm_epsilon=cfg.norm_eps,
        feed_forward_proj=proj, tie_word_embeddings=cfg.tie_embeddings, is_encoder_decoder=True,
        n_positions=cfg.max_seq_len, pad_token_id=0, decoder_start_token_id=0, torch_dtype="float32",
    )
