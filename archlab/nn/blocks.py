"""One TransformerBlock for every family, and the scanned stack of them."""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
from flax import nnx

from archlab.config import ModelConfig
from archlab.nn.attention import Attention, KVCache
from archlab.nn.layers import MLP, Norm, dropout

Array = jax.Array


class BlockContext(NamedTuple):
    """What every layer of a stack shares: built once at the top of the model."""

    self_mask_BQK: Array
    positions_BT: Array
    self_bias_BNQK: Array | None = None
    encoded_BSD: Array | None = None
    cross_mask_BQK: Array | None = None
    # True when self_mask_BQK hides every later key (causal decoding of a whole sequence).
    causal: bool = False
    # Training's dropout draws (model.*_dropout); None in evaluation and generation. The stack gives
    # each layer its own key.
    dropout_key: Array | None = None


class TransformerBlock(nnx.Module):
    """Self-attention, optional cross-attention, MLP; pre-LN or post-LN residuals."""

    def __init__(self, cfg: ModelConfig, *, cross_attention: bool, depth: int, rngs: nnx.Rngs):
        # GPT-2's scaled init of the projections that write into the residual stream.
        out_std = cfg.init_std / math.sqrt(2 * depth)
        self.pre_norm = cfg.norm_position == "pre"
        self.self_attn = Attention(cfg, rngs=rngs, out_std=out_std)
        self.self_attn_norm = Norm(cfg)
        self.cross_attn = Attention(cfg, rngs=rngs, out_std=out_std) if cross_attention else None
        self.cross_attn_norm = Norm(cfg) if cross_attention else None
        self.mlp = MLP(cfg, rngs=rngs, out_std=out_std)
        self.mlp_norm = Norm(cfg)
        self.residual_dropout = cfg.residual_dropout

    def _residual(self, norm: Norm, sublayer, x_BTD: Array, dropout_key: Array | None) -> Array:
        if self.pre_norm:
            return x_BTD + dropout(sublayer(norm(x_BTD)), self.residual_dropout, dropout_key)
        return norm(x_BTD + dropout(sublayer(x_BTD), self.residual_dropout, dropout_key))

    def __call__(
        self, x_BTD: Array, ctx: BlockContext, cache: KVCache | None = None, cache_index=None,
        cross_kv: tuple[Array, Array] | None = None,
    ):
        """``(x_BTD, cache)``: the updated cache, or None without one.

        ``cross_kv``: this layer's encoder keys and values, projected once (else from ``ctx.encoded_BSD``).
        """
        new_cache = None
        keys = [None] * 5 if ctx.dropout_key is None else list(jax.random.split(ctx.dropout_key, 5))

        def self_attention(h_BTD: Array) -> Array:
            nonlocal new_cache
            out_BTD, new_cache = self.self_attn(
                h_BTD, mask_BQK=ctx.self_mask_BQK, bias_BNQK=ctx.self_bias_BNQK,
                q_positions_BT=ctx.positions_BT, cache=cache, cache_index=cache_index, causal=ctx.causal,
                dropout_key=keys[0],
            )
            return out_BTD

        x_BTD = self._residual(self.self_attn_norm, self_attention, x_BTD, keys[1])
        if self.cross_attn is not None:
            cross = lambda h_BTD: self.cross_attn(  # noqa: E731
                h_BTD, ctx.encoded_BSD, kv=cross_kv, mask_BQK=ctx.cross_mask_BQK, dropout_key=keys[2])[0]
            x_BTD = self._residual(self.cross_attn_norm, cross, x_BTD, keys[3])
        x_BTD = self._residual(self.mlp_norm, self.mlp, x_BTD, keys[4])
        return x_BTD, new_cache


_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class LayerStack(nnx.Module):
    """``n_layers`` blocks with parameters stacked on a leading axis (``nnx.vmap``).

    The forward pass runs them with ``lax.scan`` (compile time flat in depth) or unrolled
    (``scan_layers=False``: ~10% faster on the CPU at 4 layers, NOTES.md).
    """

    def __init__(self, cfg: ModelConfig, n_layers: int, *, cross_attention: bool, depth: int, rngs: nnx.Rngs):
        @nnx.split_rngs(splits=n_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_blocks(rngs: nnx.Rngs) -> TransformerBlock:
            return TransformerBlock(cfg, cross_attention=cross_attention, depth=depth, rngs=rngs)

        self.blocks = make_blocks(rngs)
        self.n_layers = n_layers
        self.scan = cfg.scan_layers
        self.remat = cfg.remat  # resolved by the model (config.resolve_auto)

    def cross_kv(self, encoded_BSD: Array) -> tuple[Array, Array]:
        """Every layer's cross-attention keys and values of ``encoded``: ``[L, B, S, K, H]`` each."""
        graphdef, stacked = nnx.split(self.blocks)

        def one_layer(layer_params) -> tuple[Array, Array]:
            return nnx.merge(graphdef, layer_params).cross_attn.project_kv(encoded_BSD)

        return jax.lax.map(one_layer, stacked)

    def __call__(
        self, x_BTD: Array, ctx: BlockContext, caches: KVCache | None = None, cache_index=None,
        cross_kv: tuple[Array, Array] | None = None,
    ):
        """``(x, caches)``: with ``caches`` (each array with a leading layer axis) the updated ones, else None.

        ``cross_kv`` (from ``cross_kv()``, leading layer axis) replaces ``ctx.encoded_BSD`` for
        cross-attention.
        """
        graphdef, stacked = nnx.split(self.blocks)
        keys_L = None if ctx.dropout_key is None else jax.random.split(ctx.dropout_key, self.n_layers)

        def one_layer(x_BTD, layer_inputs):
            layer_params, cache, layer_cross_kv, layer_key = layer_inputs
            layer_ctx = ctx if layer_key is None else ctx._replace(dropout_key=layer_key)
            return nnx.merge(graphdef, layer_params)(x_BTD, layer_ctx, cache, cache_index, layer_cross_kv)

        if self.remat != "none":
            one_layer = jax.checkpoint(one_layer, policy=_REMAT_POLICIES[self.remat])
        if self.scan:
            x_BTD, new_caches = jax.lax.scan(one_layer, x_BTD, (stacked, caches, cross_kv, keys_L))
        else:
            outputs = []
            for i in range(self.n_layers):
                layer_i = jax.tree.map(lambda a: a[i], (stacked, caches, cross_kv, keys_L))
                x_BTD, cache_i = one_layer(x_BTD, layer_i)
                outputs.append(cache_i)
            new_caches = None if caches is None else jax.tree.map(lambda *a: jax.numpy.stack(a), *outputs)
        return x_BTD, new_caches
