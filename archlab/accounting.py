"""Parameter and FLOP counts per family, KV-cache bytes, and MFU against a per-device peak table.

Counts come from the config alone (so a sweep can be planned before anything is built)
and are tested against the real parameter tree and XLA's own cost analysis.

Conventions:
- *Embedding* parameters are the vocabulary and position tables (token, learned position,
  token type, T5 relative buckets) and an untied output matrix; everything else is
  *non-embedding* (Kaplan et al. 2020's N).
- FLOPs count a multiply-add as 2. Attention scores and values cost ``2 * 2 * context *
  n_heads * head_dim`` per query over the full context (Kaplan's Table 1; causal masking
  is not discounted, as masked einsums compute every entry). Training = 3 x forward.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field

from archlab.config import ModelConfig
from archlab.errors import ConfigError


@dataclass(frozen=True)
class ParamCounts:
    total: int
    embedding: int
    by_component: dict[str, int] = field(default_factory=dict)

    @property
    def non_embedding(self) -> int:
        return self.total - self.embedding


def _norm_params(cfg: ModelConfig) -> int:
    has_bias = cfg.use_bias and cfg.norm == "layernorm"
    return cfg.d_model * (2 if has_bias else 1)


def _attention_params(cfg: ModelConfig) -> int:
    q_width, kv_width = cfg.n_heads * cfg.dim_per_head, cfg.kv_heads * cfg.dim_per_head
    weights = cfg.d_model * q_width + 2 * cfg.d_model * kv_width + q_width * cfg.d_model
    biases = (q_width + 2 * kv_width + cfg.d_model) if cfg.use_bias else 0
    return weights + biases


def _mlp_params(cfg: ModelConfig) -> int:
    n_in = 2 if cfg.is_gated else 1
    weights = n_in * cfg.d_model * cfg.d_ff + cfg.d_ff * cfg.d_model
    biases = (n_in * cfg.d_ff + cfg.d_model) if cfg.use_bias else 0
    return weights + biases


def block_params(cfg: ModelConfig, *, cross_attention: bool) -> int:
    per_block = _attention_params(cfg) + _mlp_params(cfg) + 2 * _norm_params(cfg)
    if cross_attention:
        per_block += _attention_params(cfg) + _norm_params(cfg)
    return per_block


def count_params(cfg: ModelConfig) -> ParamCounts:
    """Total and embedding parameter counts of ``build_model(cfg)``, from the config alone."""
    d, v = cfg.d_model, cfg.vocab_size
    parts: dict[str, int] = {"token_embedding": v * d}
    if cfg.position == "learned":
        parts["position_embedding"] = cfg.max_seq_len * d
    if cfg.type_vocab_size:
        parts["token_type_embedding"] = cfg.type_vocab_size * d
    if cfg.embedding_norm:
        parts["embedding_norm"] = _norm_params(cfg)
    n_stacks = 2 if cfg.family == "encoder_decoder" else 1
    if cfg.position == "relative":
        parts["relative_bias"] = n_stacks * cfg.relative_buckets * cfg.n_heads
    if cfg.family == "encoder_decoder":
        parts["encoder_blocks"] = cfg.n_layers * block_params(cfg, cross_attention=False)
        parts["decoder_blocks"] = cfg.decoder_layers * block_params(cfg, cross_attention=True)
    else:
        parts["blocks"] = cfg.n_layers * block_params(cfg, cross_attention=False)
    if cfg.norm_position == "pre":
        parts["final_norms"] = n_stacks * _norm_params(cfg)
    if cfg.mlm_transform:
        parts["head_transform"] = d * d + (d if cfg.use_bias else 0) + _norm_params(cfg)
    if not cfg.tie_embeddings:
        parts["output_matrix"] = d * v
    if cfg.head_bias:
        parts["head_bias"] = v
    if cfg.pooler:
        parts["pooler"] = d * d + d
    embedding_keys = ("token_embedding", "position_embedding", "token_type_embedding", "relative_bias", "output_matrix")
    embedding = sum(parts.get(k, 0) for k in embedding_keys)
    return ParamCounts(total=sum(parts.values()), embedding=embedding, by_component=parts)


def count_tree_params(model) -> int:
    """Parameters actually present in an NNX model."""
    import jax
    from flax import nnx

    return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@dataclass(frozen=True)
class FlopCounts:
    """Forward FLOPs of one sequence (or encoder+decoder pair), split by source."""

    dense: int  # projections and MLPs (2 x non-embedding matmul parameters x tokens)
    attention: int  # scores and weighted values
    head: int  # output projection to the vocabulary (+ BERT's head transform)
    tokens: int  # tokens the counts are spread over (encoder + decoder for encoder_decoder)

    @property
    def forward(self) -> int:
        return self.dense + self.attention + self.head

    @property
    def train(self) -> int:
        return 3 * self.forward

    def per_token(self, *, include_head: bool = True, training: bool = True) -> float:
        total = self.forward if include_head else self.dense + self.attention
        return (3 if training else 1) * total / self.tokens


def _layer_dense_flops(cfg: ModelConfig) -> int:
    q_width, kv_width = cfg.n_heads * cfg.dim_per_head, cfg.kv_heads * cfg.dim_per_head
    attention = cfg.d_model * (q_width + 2 * kv_width) + q_width * cfg.d_model
    mlp = (2 if cfg.is_gated else 1) * cfg.d_model * cfg.d_ff + cfg.d_ff * cfg.d_model
    return 2 * (attention + mlp)


def _scores_flops(cfg: ModelConfig, context: int) -> int:
    """Per query: q.k over ``context`` keys and the weighted sum of values."""
    return 2 * 2 * context * cfg.n_heads * cfg.dim_per_head


def forward_flops(cfg: ModelConfig, seq_len: int, decoder_len: int | None = None) -> FlopCounts:
    """Forward FLOPs for one sequence of ``seq_len`` tokens (encoder input for encoder_decoder,
    with ``decoder_len`` decoder tokens; the head runs on decoder tokens only)."""
    head_per_token = _head_flops_per_token(cfg)
    if cfg.family != "encoder_decoder":
        dense = seq_len * cfg.n_layers * _layer_dense_flops(cfg)
        attention = seq_len * cfg.n_layers * _scores_flops(cfg, seq_len)
        return FlopCounts(dense, attention, seq_len * head_per_token, seq_len)
    dec_len = decoder_len if decoder_len is not None else seq_len
    q_width, kv_width = cfg.n_heads * cfg.dim_per_head, cfg.kv_heads * cfg.dim_per_head
    encoder_dense = seq_len * cfg.n_layers * _layer_dense_flops(cfg)
    # Cross-attention: q and o projections per decoder token, k and v per encoder token.
    cross_dense = 2 * (dec_len * 2 * cfg.d_model * q_width + seq_len * 2 * cfg.d_model * kv_width)
    decoder_dense = cfg.decoder_layers * (dec_len * _layer_dense_flops(cfg) + cross_dense)
    attention = (
        seq_len * cfg.n_layers * _scores_flops(cfg, seq_len)
        + dec_len * cfg.decoder_layers * (_scores_flops(cfg, dec_len) + _scores_flops(cfg, seq_len))
    )
    return FlopCounts(encoder_dense + decoder_dense, attention, dec_len * head_per_token, seq_len + dec_len)


def _head_flops_per_token(cfg: ModelConfig) -> int:
    return 2 * cfg.d_model * cfg.vocab_size + (2 * cfg.d_model * cfg.d_model if cfg.mlm_transform else 0)


def _cross_kv_flops(cfg: ModelConfig, input_len: int) -> int:
    """One decoder layer's cross-attention key and value projections of ``input_len`` encoder states."""
    return input_len * 2 * 2 * cfg.d_model * cfg.kv_heads * cfg.dim_per_head


def prefill_flops(cfg: ModelConfig, length: int, cache_len: int | None = None, *, cross_kv_cached: bool = False) -> int:
    """Forward FLOPs that turn a ``length``-token input into the state decoding starts from.

    decoder_only: the prompt through every layer into a KV cache of ``cache_len`` slots
    (default ``length``; masked einsums score every slot) plus the head on the last position,
    which gives the first new token (as ``archlab.generate`` does). encoder_decoder: the encoder
    over the input; with ``cross_kv_cached`` also every decoder layer's cross-attention keys and
    values (archlab recomputes those at every decode step instead, see ``decode_flops_per_token``).
    encoder_only: the encoder's hidden states (no head).
    """
    cache_len = length if cache_len is None else cache_len
    encoder = length * cfg.n_layers * (_layer_dense_flops(cfg) + _scores_flops(cfg, length))
    if cfg.family == "encoder_only":
        return encoder
    if cfg.family == "encoder_decoder":
        return encoder + (cfg.decoder_layers * _cross_kv_flops(cfg, length) if cross_kv_cached else 0)
    layers = length * cfg.n_layers * (_layer_dense_flops(cfg) + _scores_flops(cfg, cache_len))
    return layers + _head_flops_per_token(cfg)


def decode_flops_per_token(
    cfg: ModelConfig, context: int, input_len: int | None = None, *, cross_kv_cached: bool = False
) -> int:
    """Forward FLOPs of one decode step: one new token against a KV cache of ``context`` slots.

    ``context`` is the fixed cache length the step attends (masked slots cost the same). For
    encoder_decoder, ``input_len`` is the encoder length: each decoder layer adds cross-attention
    q/o projections and scores over ``input_len`` keys, and, unless ``cross_kv_cached``, the
    cross-attention key/value projections of all ``input_len`` encoder states (``archlab.generate``
    projects them once per generation, ``cross_kv_cached=True``; a decoder that keeps only the
    encoder output recomputes them at every step).
    """
    if cfg.family == "encoder_only":
        raise ConfigError("encoder_only models have no decoder, so no decode step")
    if cfg.family == "decoder_only":
        layer = _layer_dense_flops(cfg) + _scores_flops(cfg, context)
        return cfg.n_layers * layer + _head_flops_per_token(cfg)
    if input_len is None:
        raise ConfigError("decode_flops_per_token of an encoder_decoder model needs input_len (the encoder length)")
    q_width = cfg.n_heads * cfg.dim_per_head
    cross = 2 * 2 * cfg.d_model * q_width + _scores_flops(cfg, input_len)
    cross += 0 if cross_kv_cached else _cross_kv_flops(cfg, input_len)
    layer = _layer_dense_flops(cfg) + _scores_flops(cfg, context) + cross
    return cfg.decoder_layers * layer + _head_flops_per_token(cfg)


# Storage bytes per cached element, and the int8 cache's float32 scale per token and head
# (``archlab.nn.attention.KVCache``; tests check both against allocated arrays).
KV_ELEMENT_BYTES: dict[str, int] = {"float32": 4, "bfloat16": 2, "int8": 1}
KV_SCALE_BYTES = 4


def kv_cache_bytes(
    cfg: ModelConfig, context: int, batch: int = 1, bytes_per_element: float | None = None, *, dtype: str | None = None
) -> int:
    """``2 * layers * kv_heads * head_dim * context * batch * bytes`` (decoder layers for T5).

    Give either ``dtype`` (``float32``, ``bfloat16``, ``int8``, ``auto`` = compute dtype;
    default: ``cfg.kv_cache_dtype``, i.e. exactly what ``init_caches`` allocates) or a bare
    ``bytes_per_element``. An int8 cache adds its scales, ``2 * layers * kv_heads * context *
    batch * 4`` bytes (one float32 per token and head for keys and for values): ``4 / head_dim``
    of the int8 data, 6.25% at head_dim 64.
    """
    layers = cfg.decoder_layers if cfg.family == "encoder_decoder" else cfg.n_layers
    slots = 2 * layers * cfg.kv_heads * context * batch
    if bytes_per_element is not None:
        if dtype is not None:
            raise ConfigError("give kv_cache_bytes either dtype or bytes_per_element, not both")
        return int(slots * cfg.dim_per_head * bytes_per_element)
    name = cfg.replace(kv_cache_dtype=dtype).cache_dtype if dtype is not None else cfg.cache_dtype  # validated
    scales = slots * KV_SCALE_BYTES if name == "int8" else 0
    return slots * cfg.dim_per_head * KV_ELEMENT_BYTES[name] + scales


def cross_kv_bytes(cfg: ModelConfig, input_len: int, batch: int = 1) -> int:
    """Bytes of an encoder_decoder's cross-attention keys and values of ``input_len`` encoder states.

    ``2 * decoder layers * kv_heads * head_dim * input_len * batch`` elements in the compute dtype:
    what generation projects once from the encoder output (``EncoderDecoder.cross_kv``) and reads
    at every step; they are not quantized with the self-attention cache.
    """
    if cfg.family != "encoder_decoder":
        raise ConfigError(f"{cfg.family} models have no cross-attention")
    return 2 * cfg.decoder_layers * cfg.kv_heads * cfg.dim_per_head * input_len * batch * KV_ELEMENT_BYTES[cfg.dtype]


# Dense peak FLOP/s per device (bf16 unless noted); the CPU's rate is measured, not assumed.
PEAK_FLOPS: dict[str, float] = {
    "h100": 989e12,
    "h200": 989e12,
    "a100": 312e12,
    "tpu v4": 275e12,
    "tpu v5 lite": 197e12,
    "tpu v5": 459e12,
    "tpu v6 lite": 918e12,
}


@functools.lru_cache(maxsize=None)
def measured_cpu_flops(size: int = 1024, repeats: int = 5) -> float:
    """The float32 matmul rate JAX reaches on this host (FLOP/s), best of ``repeats``."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((size, size), jnp.float32)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def device_peak_flops(device=None) -> float:
    """Peak FLOP/s of ``device`` (default: the first JAX device) from the table, or measured on CPU."""
    import jax

    device = device or jax.devices()[0]
    if device.platform == "cpu":
        return measured_cpu_flops()
    kind = device.device_kind.lower()
    for name, peak in sorted(PEAK_FLOPS.items(), key=lambda item: -len(item[0])):
        if name in kind:
            return peak
    return measured_cpu_flops()  # unknown accelerator: no honest peak, fall back to a measurement


def mfu(flops_per_second: float, n_devices: int = 1, peak_per_device: float | None = None) -> float:
    """Model FLOPs utilisation: achieved over peak."""
    peak = device_peak_flops() if peak_per_device is None else peak_per_device
    return flops_per_second / (peak * n_devices)
