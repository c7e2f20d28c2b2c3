"""The model schema: one dataclass describes every family, validated on construction.

Hydra composes YAML into this schema (registered in ``archlab/schema.py``); model
constructors receive only this sub-config. Derived numbers (head_dim, parameter and
FLOP counts) are computed from it, never typed twice.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional

from archlab.errors import ConfigError

FAMILIES = ("encoder_only", "decoder_only", "encoder_decoder")
POSITIONS = ("learned", "rope", "relative", "none")
NORMS = ("layernorm", "rmsnorm")
NORM_POSITIONS = ("pre", "post")
ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "geglu", "swiglu", "reglu")
GATED_ACTIVATIONS = ("geglu", "swiglu", "reglu")
ATTENTION_KERNELS = ("xla", "dot_product_attention", "cudnn")
DTYPES = ("float32", "bfloat16")
KV_CACHE_DTYPES = ("auto", "bfloat16", "float32", "int8")
POOLINGS = ("cls", "mean", "last")
REMAT_POLICIES = ("auto", "none", "full", "dots", "dots_no_batch")


def _help(default: Any, text: str) -> Any:
    return field(default=default, metadata={"help": text})


@dataclass(frozen=True)
class Interval:
    """The numbers a field accepts; ``str`` gives the phrase its refusal uses."""

    low: float
    high: float = math.inf
    low_open: bool = False
    high_open: bool = True

    def __contains__(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        if self.high == math.inf:
            if self.low_open:
                return "positive" if self.low == 0 else f"greater than {self.low}"
            return f"at least {self.low}"
        return f"in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"


POSITIVE = Interval(0, low_open=True)
NON_NEGATIVE = Interval(0)
AT_LEAST_ONE = Interval(1)
FRACTION = Interval(0, 1, high_open=False)
BETA = Interval(0, 1)  # Adam's betas: 1 would never forget, above 1 the moments blow up


def check_fields(section: str, config: Any, **allowed: Interval) -> None:
    """Refuse a non-finite float or a number outside its interval, naming ``section.field``.

    None passes: an optional field left unset. Every float field is listed by its schema,
    so NaN and infinity never reach a run.
    """
    for name, interval in allowed.items():
        value = getattr(config, name)
        key = f"{section}.{name}" if section else name
        if value is None:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key} must be finite, got {value}")
        if value not in interval:
            raise ConfigError(f"{key} must be {interval}, got {value}")


@dataclass
class ModelConfig:
    family: str = _help("decoder_only", "encoder_only (BERT), decoder_only (GPT) or encoder_decoder (T5)")
    vocab_size: int = _help(8192, "vocabulary size; set from the tokenizer by the app")
    d_model: int = _help(256, "residual stream width")
    n_layers: int = _help(4, "layers (the encoder's, for encoder_decoder)")
    n_decoder_layers: Optional[int] = _help(None, "decoder layers of encoder_decoder; None = n_layers")
    n_heads: int = _help(4, "query heads")
    n_kv_heads: Optional[int] = _help(None, "key/value heads (GQA/MQA); None = n_heads")
    head_dim: Optional[int] = _help(None, "per-head width; None = d_model // n_heads")
    d_ff: int = _help(1024, "MLP hidden width (per branch for gated MLPs)")
    max_seq_len: int = _help(256, "longest sequence; size of the learned position table")
    position: str = _help("learned", "learned | rope | relative (T5 buckets) | none")
    rope_theta: float = _help(10000.0, "RoPE base frequency")
    relative_buckets: int = _help(32, "T5 relative-position buckets")
    relative_max_distance: int = _help(128, "T5 relative-position max distance")
    norm: str = _help("layernorm", "layernorm | rmsnorm")
    norm_position: str = _help("pre", "pre-LN (GPT-2, T5) or post-LN (BERT)")
    norm_eps: float = _help(1e-5, "norm epsilon")
    activation: str = _help("gelu", "gelu | gelu_tanh | relu | geglu | swiglu | reglu")
    use_bias: bool = _help(True, "biases on projections and norms (False for T5)")
    tie_embeddings: bool = _help(True, "LM head shares the token embedding")
    scale_tied_logits: bool = _help(False, "multiply the tied head's input by d_model**-0.5 (T5 v1.0)")
    scale_attention: bool = _help(True, "divide scores by sqrt(head_dim); T5 folds this into its init")
    type_vocab_size: int = _help(0, "token-type (segment A/B) embeddings; 2 for BERT, 0 = none")
    embedding_norm: bool = _help(False, "norm right after the embeddings (BERT)")
    mlm_transform: bool = _help(False, "dense+activation+norm before the MLM output (BERT)")
    head_bias: bool = _help(False, "bias on the LM/MLM output layer (BERT)")
    logits_pad_multiple: int = _help(
        128, "compute the output projection over the vocabulary rounded up to this multiple (tensor-core "
        "friendly; the extra columns are dropped, parameters keep their shape); 1 = off")
    pooler: bool = _help(False, "dense+tanh pooler on the first token (BERT)")
    pooling: str = _help("cls", "sequence pooling for classification heads: cls | mean | last")
    attention_kernel: str = _help("xla", "xla (einsum reference) | dot_product_attention | cudnn")
    dtype: str = _help("float32", "compute dtype; parameters stay float32")
    kv_cache_dtype: str = _help(
        "auto",
        "KV-cache storage: auto (= dtype) | bfloat16 | float32 | int8 (symmetric, one float32 scale per "
        "token and head, dequantized on read)",
    )
    scan_layers: bool = _help(True, "stack layers with scan (flat compile time) instead of unrolling")
    remat: str = _help(
        "auto",
        "rematerialisation policy: auto | none | full | dots | dots_no_batch; auto = dots_no_batch on the CPU and "
        "GPUs (less memory traffic: faster on both, experiments/throughput/), none elsewhere",
    )
    fuse_qkv: bool = _help(True, "self-attention projects q, k and v with one matrix product (faster on the CPU)")
    causal_blocks: int = _help(
        2, "query blocks of the XLA attention kernel under a causal mask; blocks above the diagonal are skipped "
        "(1 = one dense block)")
    init_std: float = _help(0.02, "std of the normal initialiser")
    embedding_dropout: float = _help(0.0, "dropout on the embeddings' sum, in training only (0 = off)")
    attention_dropout: float = _help(0.0, "dropout on the attention weights, in training only (xla kernel)")
    residual_dropout: float = _help(0.0, "dropout on each sublayer's output before the residual add, in training only")
    init_from: Optional[str] = _help(None, (
        "start from these weights instead of random ones: a Hugging Face directory (archlab-export's, or a "
        "transformers GPT-2/BERT/T5) or an archlab run / checkpoints / step directory; the run must build the "
        "same architecture and reads text with the source's tokenizer"))
    head_chunk: int = _help(
        -1,
        "tokens per chunk of the fused output head + cross-entropy in the training loss (the [tokens, vocab] "
        "logits are never held whole); 0 = materialise the logits, then the loss; -1 = auto: 512 on the CPU "
        "(faster there), 0 on accelerators (measured there without chunking)",
    )

    def __post_init__(self) -> None:
        validate_model_config(self)

    # ---- derived values -------------------------------------------------
    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def decoder_layers(self) -> int:
        return self.n_decoder_layers if self.n_decoder_layers is not None else self.n_layers

    @property
    def cache_dtype(self) -> str:
        """The KV cache's storage dtype with ``auto`` resolved to the compute dtype."""
        return self.dtype if self.kv_cache_dtype == "auto" else self.kv_cache_dtype

    @property
    def is_gated(self) -> bool:
        return self.activation in GATED_ACTIVATIONS

    @property
    def has_dropout(self) -> bool:
        return bool(self.embedding_dropout or self.attention_dropout or self.residual_dropout)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def _default_backend() -> str:
    """JAX's default backend, imported late: configs are validated before JAX loads (cli.py)."""
    import jax

    return jax.default_backend()


def resolve_auto(cfg: ModelConfig, backend: str | None = None) -> ModelConfig:
    """``cfg`` with its backend-dependent ``auto`` values replaced by what will run.

    ``remat=auto`` becomes ``dots_no_batch`` on a CPU or GPU (faster on both,
    experiments/throughput/) and ``none`` elsewhere; ``head_chunk=-1`` becomes 512 on the CPU
    and 0 on accelerators. Idempotent; the run assembly calls it once, so the recorded config
    says what ran.
    """
    remat, head_chunk = resolve_auto_values(cfg.remat, cfg.head_chunk, backend)
    if (remat, head_chunk) == (cfg.remat, cfg.head_chunk):
        return cfg
    return dataclasses.replace(cfg, remat=remat, head_chunk=head_chunk)


def resolve_auto_values(remat: str, head_chunk: int, backend: str | None = None) -> tuple[str, int]:
    """``(remat, head_chunk)`` with ``auto`` / -1 resolved for ``backend`` (default: JAX's)."""
    if remat != "auto" and head_chunk != -1:
        return remat, head_chunk
    backend = backend or _default_backend()
    if remat == "auto":
        remat = "dots_no_batch" if backend in ("cpu", "gpu") else "none"
    if head_chunk == -1:
        head_chunk = 512 if backend == "cpu" else 0
    return remat, head_chunk


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"model.{name}={value!r} is not one of {', '.join(allowed)}")


def validate_model_config(cfg: ModelConfig) -> None:
    """Raise ConfigError with one sentence for any value that cannot build a model."""
    _one_of("family", cfg.family, FAMILIES)
    _one_of("position", cfg.position, POSITIONS)
    _one_of("norm", cfg.norm, NORMS)
    _one_of("norm_position", cfg.norm_position, NORM_POSITIONS)
    _one_of("activation", cfg.activation, ACTIVATIONS)
    _one_of("attention_kernel", cfg.attention_kernel, ATTENTION_KERNELS)
    _one_of("dtype", cfg.dtype, DTYPES)
    _one_of("kv_cache_dtype", cfg.kv_cache_dtype, KV_CACHE_DTYPES)
    _one_of("pooling", cfg.pooling, POOLINGS)
    _one_of("remat", cfg.remat, REMAT_POLICIES)
    check_fields(
        "model", cfg, vocab_size=POSITIVE, d_model=POSITIVE, n_layers=POSITIVE, n_decoder_layers=POSITIVE,
        n_heads=POSITIVE, n_kv_heads=POSITIVE, head_dim=POSITIVE, d_ff=POSITIVE, max_seq_len=POSITIVE,
        rope_theta=POSITIVE, relative_buckets=POSITIVE, relative_max_distance=POSITIVE, norm_eps=POSITIVE,
        type_vocab_size=NON_NEGATIVE, logits_pad_multiple=POSITIVE, init_std=POSITIVE, causal_blocks=POSITIVE,
    )
    for name in ("embedding_dropout", "attention_dropout", "residual_dropout"):
        rate = getattr(cfg, name)
        if not 0 <= rate < 1:
            raise ConfigError(f"model.{name} must be in [0, 1), got {rate}")
    if cfg.attention_dropout and cfg.attention_kernel != "xla":
        raise ConfigError(f"model.attention_dropout needs the xla attention kernel; {cfg.attention_kernel} has no "
                          "dropout of its weights")
    if cfg.head_chunk < -1:
        raise ConfigError(f"model.head_chunk must be >= 0 (0 = no chunking) or -1 (auto), got {cfg.head_chunk}")
    if cfg.head_dim is None and cfg.d_model % cfg.n_heads:
        raise ConfigError(f"d_model {cfg.d_model} is not divisible by n_heads {cfg.n_heads}")
    if cfg.n_heads % cfg.kv_heads:
        raise ConfigError(f"n_heads {cfg.n_heads} is not divisible by n_kv_heads {cfg.kv_heads}")
    if cfg.position == "rope" and cfg.dim_per_head % 2:
        raise ConfigError(f"RoPE needs an even head_dim, got {cfg.dim_per_head}")
    if cfg.position == "relative":
        _check_relative_buckets(cfg)
    if cfg.n_decoder_layers is not None and cfg.family != "encoder_decoder":
        raise ConfigError(f"model.n_decoder_layers applies to encoder_decoder only, not {cfg.family}")
    if cfg.family == "encoder_decoder" and cfg.type_vocab_size:
        raise ConfigError("token-type embeddings (type_vocab_size) are for encoder_only models")


def _check_relative_buckets(cfg: ModelConfig) -> None:
    """T5's bucketing (nn/layers.py) halves the buckets per direction for bidirectional attention,
    keeps half of those for exact distances and spaces the rest logarithmically up to
    relative_max_distance: with no exact bucket, or a max distance inside the exact range, it
    divides by log(1) = 0 or indexes negative buckets."""
    bidirectional = cfg.family != "decoder_only"  # encoders; decoders attend causally
    causal = cfg.family != "encoder_only"
    least = 4 if bidirectional else 2
    if cfg.relative_buckets < least:
        attention = "bidirectional" if bidirectional else "causal"
        raise ConfigError(f"model.relative_buckets must be at least {least} for {attention} attention, "
                          f"got {cfg.relative_buckets}")
    exact = cfg.relative_buckets // 2 if causal else cfg.relative_buckets // 4
    if cfg.relative_max_distance <= exact:
        raise ConfigError(f"model.relative_max_distance must exceed the {exact} distances bucketed exactly "
                          f"(relative_buckets={cfg.relative_buckets}), got {cfg.relative_max_distance}")


# Presets are pure configuration: the reference architectures come out of the same code.
PRESETS: dict[str, dict[str, Any]] = {
    "gpt2": dict(
        family="decoder_only", vocab_size=50257, d_model=768, n_layers=12, n_heads=12, d_ff=3072,
        max_seq_len=1024, position="learned", norm="layernorm", norm_position="pre", norm_eps=1e-5,
        activation="gelu_tanh", use_bias=True, tie_embeddings=True,
    ),
    "bert": dict(
        family="encoder_only", vocab_size=30522, d_model=768, n_layers=12, n_heads=12, d_ff=3072,
        max_seq_len=512, position="learned", norm="layernorm", norm_position="post", norm_eps=1e-12,
        activation="gelu", use_bias=True, tie_embeddings=True, type_vocab_size=2, embedding_norm=True,
        mlm_transform=True, head_bias=True, pooler=True, pooling="cls",
    ),
    "t5": dict(
        family="encoder_decoder", vocab_size=32128, d_model=512, n_layers=6, n_heads=8, d_ff=2048,
        max_seq_len=512, position="relative", norm="rmsnorm", norm_position="pre", norm_eps=1e-6,
        activation="relu", use_bias=False, tie_embeddings=True, scale_tied_logits=True,
        scale_attention=False,
    ),
    "t5_v1_1": dict(
        family="encoder_decoder", vocab_size=32128, d_model=512, n_layers=8, n_heads=6, head_dim=64,
        d_ff=1024, max_seq_len=512, position="relative", norm="rmsnorm", norm_position="pre",
        norm_eps=1e-6, activation="geglu", use_bias=False, tie_embeddings=False, scale_attention=False,
    ),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A reference architecture by name (``gpt2``, ``bert``, ``t5``, ``t5_v1_1``), with overrides."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})
