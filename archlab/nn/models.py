"""The three families: EncoderOnly (BERT), DecoderOnly (GPT), EncoderDecoder (T5).

One contract for all three (``LanguageModel``): ``hidden(...)`` returns ``(hidden_BTD, caches)``
(the final hidden states the head reads, and the updated KV caches or None), ``logits(hidden_BTD)``
applies the LM head, and ``batch_hidden(batch)`` reads a batch of named inputs (the keys the
objectives produce: ``inputs``, ``segment_ids``, ...; ``encoder_inputs``, ``decoder_inputs``, ...)
so that losses and scores never branch on the family. Each model builds its masks once at the top
and passes them down; networks never see a loss. Segment ids (0 = padding) default to "one
document, no padding" and positions to ``arange``; packed batches pass both.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from archlab.config import ModelConfig, resolve_auto
from archlab.errors import ConfigError
from archlab.nn import masks
from archlab.nn.attention import KVCache
from archlab.nn.blocks import BlockContext, LayerStack
from archlab.nn.heads import LMHead, pool
from archlab.nn.layers import Dense, Embedding, Norm, RelativePositionBias, compute_dtype, dropout

Array = jax.Array


class Embedder(nnx.Module):
    """Token + (learned position) + (token type) embeddings, optionally normed (BERT)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        dtype = compute_dtype(cfg)
        self.max_seq_len = cfg.max_seq_len
        self.tokens = Embedding(cfg.vocab_size, cfg.d_model, std=cfg.init_std, dtype=dtype, rngs=rngs)
        self.positions = (
            Embedding(cfg.max_seq_len, cfg.d_model, std=cfg.init_std, dtype=dtype, rngs=rngs)
            if cfg.position == "learned" else None
        )
        self.token_types = (
            Embedding(cfg.type_vocab_size, cfg.d_model, std=cfg.init_std, dtype=dtype, rngs=rngs)
            if cfg.type_vocab_size else None
        )
        self.norm = Norm(cfg) if cfg.embedding_norm else None

    def __call__(self, tokens_BT: Array, positions_BT: Array, token_types_BT: Array | None = None) -> Array:
        x_BTD = self.tokens(tokens_BT)
        if self.positions is not None:
            x_BTD = x_BTD + self.positions(positions_BT)
        if self.token_types is not None:
            types_BT = jnp.zeros_like(tokens_BT) if token_types_BT is None else token_types_BT
            x_BTD = x_BTD + self.token_types(types_BT)
        return x_BTD if self.norm is None else self.norm(x_BTD)


def _check_tokens(cfg: ModelConfig, tokens_BT: Array, what: str, max_len: int | None = None) -> None:
    """Static checks that run at trace time, before anything is compiled."""
    if tokens_BT.ndim != 2:
        raise ConfigError(f"{what} must be a [batch, length] array of token ids, got shape {tokens_BT.shape}")
    limit = cfg.max_seq_len if max_len is None else max_len
    if tokens_BT.shape[1] > limit:
        raise ConfigError(
            f"{what} has length {tokens_BT.shape[1]}, longer than the position table "
            f"(model.max_seq_len={cfg.max_seq_len})"
        )


def _defaults(tokens_BT: Array, segment_ids_BT: Array | None, positions_BT: Array | None):
    segment_ids_BT = masks.default_segment_ids(tokens_BT) if segment_ids_BT is None else segment_ids_BT
    positions_BT = masks.default_positions(tokens_BT) if positions_BT is None else positions_BT
    return segment_ids_BT, positions_BT


def _require_family(cfg: ModelConfig, family: str) -> None:
    if cfg.family != family:
        raise ConfigError(f"model.family is {cfg.family!r} but this model class builds {family!r}")


class LanguageModel(nnx.Module):
    """What the three families share: the token table, the LM head, caches, and one stack pass."""

    FAMILY: str
    TARGETS = "targets"  # the batch key of the targets the LM head is scored against

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        _require_family(cfg, self.FAMILY)
        self.cfg = cfg = resolve_auto(cfg)
        # Each family creates its modules in a fixed order (the embeddings first, the head where it
        # always stood): the order of draws from ``rngs``, so a seed gives the same parameters.
        self.embed = Embedder(cfg, rngs=rngs)

    def logits(self, hidden_BTD: Array) -> Array:
        """Vocabulary logits ``[B, T, V]`` of final hidden states."""
        return self.lm_head(hidden_BTD, self.embed.tokens)

    def head_weights(self) -> tuple[Array, Array | None]:
        """``(table_VD, bias_V)`` of the output projection, for the fused head-and-loss."""
        return self.lm_head.output_weights(self.embed.tokens)

    def init_caches(self, batch: int, max_len: int) -> KVCache:
        """Zeroed caches for every cached (self-attention decoding) layer, on a leading layer axis."""
        one = KVCache.zeros(self.cfg, batch, max_len)
        return jax.tree.map(lambda a: jnp.broadcast_to(a, (self.cached_layers, *a.shape)), one)

    @property
    def cached_layers(self) -> int:
        return self.cfg.n_layers

    def batch_hidden(self, batch, dropout_key: Array | None = None) -> Array:
        """Final hidden states ``[B, T, D]`` of a batch of named inputs (see the module docstring);
        ``dropout_key`` switches on the model's dropout (training)."""
        raise NotImplementedError

    def _stack(
        self, stack: LayerStack, norm: Norm | None, tokens_BT: Array, positions_BT: Array, ctx: BlockContext,
        token_types_BT: Array | None = None, caches: KVCache | None = None, cache_index=None, cross_kv=None,
    ) -> tuple[Array, KVCache | None]:
        """Embed, run a layer stack, apply its final norm (pre-LN models)."""
        x_BTD = self.embed(tokens_BT, positions_BT, token_types_BT)
        if ctx.dropout_key is not None:
            embed_key, layers_key = jax.random.split(ctx.dropout_key)
            x_BTD = dropout(x_BTD, self.cfg.embedding_dropout, embed_key)
            ctx = ctx._replace(dropout_key=layers_key)
        hidden_BTD, caches = stack(x_BTD, ctx, caches, cache_index, cross_kv)
        return (hidden_BTD if norm is None else norm(hidden_BTD)), caches


def _final_norm(cfg: ModelConfig) -> Norm | None:
    return Norm(cfg) if cfg.norm_position == "pre" else None


class _OneStack(LanguageModel):
    """A family with one layer stack: embeddings, (relative bias), layers, final norm, head."""

    BIDIRECTIONAL: bool
    EXTRA_INPUT: tuple[str, str]  # (hidden()'s keyword, the batch key): token types, or the prefix-LM mask

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        cfg = self.cfg
        self.relative_bias = (
            RelativePositionBias(cfg, bidirectional=self.BIDIRECTIONAL, rngs=rngs) if cfg.position == "relative"
            else None
        )
        self.layers = LayerStack(cfg, cfg.n_layers, cross_attention=False, depth=cfg.n_layers, rngs=rngs)
        self.final_norm = _final_norm(cfg)
        self.lm_head = LMHead(cfg, rngs=rngs)

    def batch_hidden(self, batch, dropout_key: Array | None = None) -> Array:
        keyword, key = self.EXTRA_INPUT
        return self.hidden(
            batch["inputs"], segment_ids_BT=batch.get("segment_ids"), positions_BT=batch.get("positions"),
            dropout_key=dropout_key, **{keyword: batch.get(key)},
        )[0]

    def __call__(self, tokens_BT: Array, **inputs) -> Array:
        """Logits ``[B, T, V]`` of whole sequences (decoding goes through ``hidden``)."""
        return self.logits(self.hidden(tokens_BT, **inputs)[0])


class EncoderOnly(_OneStack):
    """BERT: bidirectional encoder, MLM head, first-token pooler."""

    FAMILY = "encoder_only"
    BIDIRECTIONAL = True
    EXTRA_INPUT = ("token_types_BT", "token_types")

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        cfg = self.cfg
        self.pooler = (
            Dense(cfg.d_model, cfg.d_model, use_bias=True, std=cfg.init_std, dtype=compute_dtype(cfg), rngs=rngs)
            if cfg.pooler else None
        )

    def hidden(
        self, tokens_BT: Array, *, segment_ids_BT=None, positions_BT=None, token_types_BT=None, dropout_key=None,
    ) -> tuple[Array, None]:
        """``(hidden_BTD, None)``: an encoder keeps no cache."""
        _check_tokens(self.cfg, tokens_BT, "encoder input")
        segment_ids_BT, positions_BT = _defaults(tokens_BT, segment_ids_BT, positions_BT)
        bias = None if self.relative_bias is None else self.relative_bias(positions_BT, positions_BT)
        ctx = BlockContext(masks.bidirectional_mask(segment_ids_BT), positions_BT, bias, dropout_key=dropout_key)
        return self._stack(self.layers, self.final_norm, tokens_BT, positions_BT, ctx, token_types_BT)

    def pool(self, hidden_BTD: Array, segment_ids_BT: Array | None = None) -> Array:
        """Sequence vector ``[B, D]``: the configured pooling, through BERT's tanh pooler if present."""
        segment_ids_BT = jnp.ones(hidden_BTD.shape[:2], jnp.int32) if segment_ids_BT is None else segment_ids_BT
        pooled_BD = pool(hidden_BTD, segment_ids_BT, self.cfg.pooling)
        return pooled_BD if self.pooler is None else jnp.tanh(self.pooler(pooled_BD))


class DecoderOnly(_OneStack):
    """GPT: causal decoder (or prefix-LM with ``prefix_BT``), LM head tied or not."""

    FAMILY = "decoder_only"
    BIDIRECTIONAL = False
    EXTRA_INPUT = ("prefix_BT", "prefix_mask")

    def hidden(
        self, tokens_BT: Array, *, segment_ids_BT=None, positions_BT=None, prefix_BT=None,
        caches: KVCache | None = None, cache_index=None, cache_segment_ids_BS=None, dropout_key=None,
    ) -> tuple[Array, KVCache | None]:
        """With ``caches``, ``tokens_BT`` are new tokens written at ``cache_index``.

        ``prefix_BT`` marks prefix-LM prefix tokens among ``tokens_BT``: every query may attend to
        them (with caches: to their slots ``cache_index ..``, e.g. a prefill of the whole prompt).
        """
        max_len = None if caches is None else caches.k_BSKH.shape[2]
        _check_tokens(self.cfg, tokens_BT, "decoder input", max_len)
        segment_ids_BT, positions_BT = _defaults(tokens_BT, segment_ids_BT, positions_BT)
        if caches is None:
            self_mask = (
                masks.decoder_mask(segment_ids_BT) if prefix_BT is None
                else masks.prefix_lm_mask(segment_ids_BT, prefix_BT)
            )
            key_positions_BS = positions_BT
        else:
            cache_len = caches.k_BSKH.shape[2]
            if cache_segment_ids_BS is None:
                cache_segment_ids_BS = jnp.ones((tokens_BT.shape[0], cache_len), jnp.int32)
            visible_BQS = masks.causal_mask(tokens_BT.shape[1], cache_len, cache_index)
            if prefix_BT is not None:
                visible_BQS = visible_BQS | masks.cache_prefix_mask(prefix_BT, cache_len, cache_index)
            self_mask = masks.padding_mask(cache_segment_ids_BS, tokens_BT.shape[1]) & visible_BQS
            # A slot's position counts the real (non-padding) slots before it, so a left-padded
            # row, whose positions restart at its first real token, gets the right relative bias.
            # Equals arange when nothing is padded.
            real_BS = (cache_segment_ids_BS != 0).astype(jnp.int32)
            key_positions_BS = jnp.maximum(jnp.cumsum(real_BS, axis=1) - 1, 0)
        bias = None if self.relative_bias is None else self.relative_bias(positions_BT, key_positions_BS)
        ctx = BlockContext(self_mask, positions_BT, bias, causal=caches is None and prefix_BT is None,
                           dropout_key=dropout_key)
        return self._stack(self.layers, self.final_norm, tokens_BT, positions_BT, ctx, None, caches, cache_index)


class EncoderDecoder(LanguageModel):
    """T5: encoder and decoder stacks sharing one token table; ``encode()`` then ``hidden()``."""

    FAMILY = "encoder_decoder"
    TARGETS = "decoder_targets"

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        cfg = self.cfg
        depth = cfg.n_layers + cfg.decoder_layers
        relative = cfg.position == "relative"
        self.encoder_bias = RelativePositionBias(cfg, bidirectional=True, rngs=rngs) if relative else None
        self.decoder_bias = RelativePositionBias(cfg, bidirectional=False, rngs=rngs) if relative else None
        self.encoder = LayerStack(cfg, cfg.n_layers, cross_attention=False, depth=depth, rngs=rngs)
        self.decoder = LayerStack(cfg, cfg.decoder_layers, cross_attention=True, depth=depth, rngs=rngs)
        self.encoder_norm = _final_norm(cfg)
        self.decoder_norm = _final_norm(cfg)
        self.lm_head = LMHead(cfg, rngs=rngs)

    @property
    def cached_layers(self) -> int:
        return self.cfg.decoder_layers

    def encode(self, tokens_BS: Array, *, segment_ids_BS=None, positions_BS=None, dropout_key=None) -> Array:
        """Encoder hidden states ``[B, S, D]``."""
        _check_tokens(self.cfg, tokens_BS, "encoder input")
        segment_ids_BS, positions_BS = _defaults(tokens_BS, segment_ids_BS, positions_BS)
        bias = None if self.encoder_bias is None else self.encoder_bias(positions_BS, positions_BS)
        ctx = BlockContext(masks.bidirectional_mask(segment_ids_BS), positions_BS, bias, dropout_key=dropout_key)
        return self._stack(self.encoder, self.encoder_norm, tokens_BS, positions_BS, ctx)[0]

    def cross_kv(self, encoded_BSD: Array) -> tuple[Array, Array]:
        """The decoder layers' cross-attention keys and values of ``encoded`` (``[L, B, S, K, H]`` each).

        Generation computes them once and passes them to every decode step (``hidden(..., cross_kv=)``)
        instead of projecting the whole encoder output again for each new token.
        """
        return self.decoder.cross_kv(encoded_BSD)

    def hidden(
        self, tokens_BT: Array, encoded_BSD: Array | None = None, *, encoder_segment_ids_BS=None, segment_ids_BT=None,
        positions_BT=None, caches: KVCache | None = None, cache_index=None, cross_kv: tuple[Array, Array] | None = None,
        dropout_key=None,
    ) -> tuple[Array, KVCache | None]:
        """Final decoder hidden states ``[B, T, D]`` and the updated caches (None without).

        The encoder memory is ``encoded_BSD`` or, already projected, ``cross_kv`` (``cross_kv()``).
        """
        if (encoded_BSD is None) == (cross_kv is None):
            raise ValueError("the decoder needs the encoder memory as exactly one of encoded_BSD and cross_kv")
        max_len = None if caches is None else caches.k_BSKH.shape[2]
        _check_tokens(self.cfg, tokens_BT, "decoder input", max_len)
        segment_ids_BT, positions_BT = _defaults(tokens_BT, segment_ids_BT, positions_BT)
        if encoder_segment_ids_BS is None:
            memory_BS = encoded_BSD.shape[:2] if cross_kv is None else cross_kv[0].shape[1:3]
            encoder_segment_ids_BS = jnp.ones(memory_BS, jnp.int32)
        if caches is None:
            self_mask = masks.decoder_mask(segment_ids_BT)
            key_positions = positions_BT
        else:
            cache_len = caches.k_BSKH.shape[2]
            self_mask = masks.causal_mask(tokens_BT.shape[1], cache_len, cache_index)
            self_mask = jnp.broadcast_to(self_mask, (tokens_BT.shape[0], *self_mask.shape[1:]))
            key_positions = jnp.broadcast_to(jnp.arange(cache_len, dtype=jnp.int32), (tokens_BT.shape[0], cache_len))
        bias = None if self.decoder_bias is None else self.decoder_bias(positions_BT, key_positions)
        cross = masks.cross_mask(segment_ids_BT, encoder_segment_ids_BS)
        ctx = BlockContext(self_mask, positions_BT, bias, encoded_BSD, cross, causal=caches is None,
                           dropout_key=dropout_key)
        return self._stack(
            self.decoder, self.decoder_norm, tokens_BT, positions_BT, ctx, None, caches, cache_index, cross_kv
        )

    def batch_hidden(self, batch, dropout_key: Array | None = None) -> Array:
        encoder_key, decoder_key = (None, None) if dropout_key is None else jax.random.split(dropout_key)
        encoder_segment_ids_BS = batch.get("encoder_segment_ids")
        encoded_BSD = self.encode(
            batch["encoder_inputs"], segment_ids_BS=encoder_segment_ids_BS, positions_BS=batch.get("encoder_positions"),
            dropout_key=encoder_key,
        )
        return self.hidden(
            batch["decoder_inputs"], encoded_BSD, encoder_segment_ids_BS=encoder_segment_ids_BS,
            segment_ids_BT=batch.get("decoder_segment_ids"), positions_BT=batch.get("decoder_positions"),
            dropout_key=decoder_key,
        )[0]

    def __call__(
        self, encoder_tokens_BS: Array, decoder_tokens_BT: Array, *, encoder_segment_ids_BS=None,
        encoder_positions_BS=None, decoder_segment_ids_BT=None, decoder_positions_BT=None,
    ) -> Array:
        """Decoder logits ``[B, T, V]`` of whole sequences (decoding goes through ``hidden``)."""
        return self.logits(self.batch_hidden({
            "encoder_inputs": encoder_tokens_BS, "encoder_segment_ids": encoder_segment_ids_BS,
            "encoder_positions": encoder_positions_BS, "decoder_inputs": decoder_tokens_BT,
            "decoder_segment_ids": decoder_segment_ids_BT, "decoder_positions": decoder_positions_BT,
        }))


MODEL_CLASSES: dict[str, type[LanguageModel]] = {
    cls.FAMILY: cls for cls in (EncoderOnly, DecoderOnly, EncoderDecoder)
}


def build_model(cfg: ModelConfig, seed: int = 0) -> LanguageModel:
    """The model of ``cfg.family`` with parameters drawn from ``seed``."""
    return MODEL_CLASSES[cfg.family](cfg, rngs=nnx.Rngs(params=seed))
