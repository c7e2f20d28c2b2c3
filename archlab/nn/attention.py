"""THE attention: one module for encoder self-, decoder self- and cross-attention.

Shape letters used in names across archlab:
  B batch, T query length (also Q), S key/value length (also K in mask names),
  D d_model, N query heads, K key/value heads (GQA/MQA: N % K == 0), G = N // K
  query heads per key/value head, H head_dim, V vocabulary, F d_ff.

No other module computes attention weights. Masks arrive ready-made (``masks.py``);
the T5 relative bias arrives as an additive ``bias_BNQK``; RoPE is applied here.
"""

from __future__ import annotations

import logging
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from archlab.config import ModelConfig
from archlab.nn.layers import Dense, compute_dtype, rope
from archlab.nn.masks import check_mask

Array = jax.Array
log = logging.getLogger(__name__)


class KVCache(NamedTuple):
    """Fixed-shape key/value cache of one attention layer: ``[B, S_max, K, H]`` each."""

    k_BSKH: Array
    v_BSKH: Array

    @classmethod
    def zeros(cls, cfg: ModelConfig, batch: int, max_len: int) -> "KVCache":
        shape = (batch, max_len, cfg.kv_heads, cfg.dim_per_head)
        dtype = compute_dtype(cfg)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def _xla_attention(q_BTNH, k_BSKH, v_BSKH, mask_BQK, bias_BNQK, scale: float) -> Array:
    """Reference kernel: plain einsums, scores and normalisation in float32."""
    batch, q_len, n_heads, head_dim = q_BTNH.shape
    kv_heads = k_BSKH.shape[2]
    group = n_heads // kv_heads
    q_BTKGH = q_BTNH.reshape(batch, q_len, kv_heads, group, head_dim)
    scores_BKGTS = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH, preferred_element_type=jnp.float32)
    scores_BKGTS = scores_BKGTS * scale
    if bias_BNQK is not None:
        bias_BKGTS = bias_BNQK.reshape(bias_BNQK.shape[0], kv_heads, group, *bias_BNQK.shape[2:])
        scores_BKGTS = scores_BKGTS + bias_BKGTS.astype(jnp.float32)
    # A fully masked row (a padding query) gets uniform weights instead of NaN.
    scores_BKGTS = jnp.where(mask_BQK[:, None, None], scores_BKGTS, jnp.finfo(jnp.float32).min)
    weights_BKGTS = jax.nn.softmax(scores_BKGTS, axis=-1).astype(v_BSKH.dtype)
    out_BTKGH = jnp.einsum("bkgts,bskh->btkgh", weights_BKGTS, v_BSKH)
    return out_BTKGH.reshape(batch, q_len, n_heads, head_dim)


def _library_attention(q_BTNH, k_BSKH, v_BSKH, mask_BQK, bias_BNQK, scale: float, implementation) -> Array:
    """``jax.nn.dot_product_attention``: cuDNN flash attention on a GPU where it applies."""
    bias = None if bias_BNQK is None else bias_BNQK.astype(q_BTNH.dtype)
    return jax.nn.dot_product_attention(
        q_BTNH, k_BSKH, v_BSKH, bias=bias, mask=mask_BQK[:, None], scale=scale, implementation=implementation
    )


def attend(q_BTNH, k_BSKH, v_BSKH, *, mask_BQK, bias_BNQK=None, scale: float, kernel: str = "xla") -> Array:
    """softmax(q k^T * scale + bias, masked) v with the configured kernel."""
    if kernel == "xla":
        return _xla_attention(q_BTNH, k_BSKH, v_BSKH, mask_BQK, bias_BNQK, scale)
    if kernel == "dot_product_attention":
        return _library_attention(q_BTNH, k_BSKH, v_BSKH, mask_BQK, bias_BNQK, scale, None)
    try:
        return _library_attention(q_BTNH, k_BSKH, v_BSKH, mask_BQK, bias_BNQK, scale, "cudnn")
    except (ValueError, NotImplementedError, RuntimeError) as refusal:
        log.warning("cuDNN attention refused (%s); falling back to the XLA kernel", str(refusal).splitlines()[0])
        return _xla_attention(q_BTNH, k_BSKH, v_BSKH, mask_BQK, bias_BNQK, scale)


class Attention(nnx.Module):
    """Multi-head / grouped-query / multi-query attention.

    Self-attention when ``x_kv_BSD is None``, cross-attention otherwise. With ``cache``,
    the new keys/values are written at ``cache_index`` and the queries attend the whole
    fixed-shape cache (the caller's mask hides unwritten slots); returns ``(y, cache)``.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, out_std: float | None = None):
        self.n_heads, self.kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.dim_per_head
        self.scale = 1.0 / math.sqrt(self.head_dim) if cfg.scale_attention else 1.0
        self.kernel = cfg.attention_kernel
        self.use_rope = cfg.position == "rope"
        self.rope_theta = cfg.rope_theta
        dense = dict(use_bias=cfg.use_bias, dtype=compute_dtype(cfg), rngs=rngs)
        q_width, kv_width = self.n_heads * self.head_dim, self.kv_heads * self.head_dim
        self.q = Dense(cfg.d_model, q_width, std=cfg.init_std, **dense)
        self.k = Dense(cfg.d_model, kv_width, std=cfg.init_std, **dense)
        self.v = Dense(cfg.d_model, kv_width, std=cfg.init_std, **dense)
        self.o = Dense(q_width, cfg.d_model, std=out_std or cfg.init_std, **dense)

    def __call__(
        self,
        x_q_BTD: Array,
        x_kv_BSD: Array | None = None,
        *,
        mask_BQK: Array,
        bias_BNQK: Array | None = None,
        q_positions_BT: Array | None = None,
        kv_positions_BS: Array | None = None,
        cache: KVCache | None = None,
        cache_index: Array | int | None = None,
    ):
        is_self = x_kv_BSD is None
        x_kv_BSD = x_q_BTD if is_self else x_kv_BSD
        batch, q_len, _ = x_q_BTD.shape
        kv_len = x_kv_BSD.shape[1]
        q_BTNH = self.q(x_q_BTD).reshape(batch, q_len, self.n_heads, self.head_dim)
        k_BSKH = self.k(x_kv_BSD).reshape(batch, kv_len, self.kv_heads, self.head_dim)
        v_BSKH = self.v(x_kv_BSD).reshape(batch, kv_len, self.kv_heads, self.head_dim)
        if self.use_rope and is_self:
            q_BTNH = rope(q_BTNH, q_positions_BT, self.rope_theta)
            k_BSKH = rope(k_BSKH, q_positions_BT if kv_positions_BS is None else kv_positions_BS, self.rope_theta)
        if cache is not None:
            start = (0, cache_index, 0, 0)
            cache = KVCache(
                jax.lax.dynamic_update_slice(cache.k_BSKH, k_BSKH.astype(cache.k_BSKH.dtype), start),
                jax.lax.dynamic_update_slice(cache.v_BSKH, v_BSKH.astype(cache.v_BSKH.dtype), start),
            )
            k_BSKH, v_BSKH = cache.k_BSKH.astype(q_BTNH.dtype), cache.v_BSKH.astype(q_BTNH.dtype)
        check_mask(mask_BQK, batch, q_len, k_BSKH.shape[1])
        out_BTNH = attend(
            q_BTNH, k_BSKH, v_BSKH, mask_BQK=mask_BQK, bias_BNQK=bias_BNQK, scale=self.scale, kernel=self.kernel
        )
        y_BTD = self.o(out_BTNH.reshape(batch, q_len, self.n_heads * self.head_dim))
        return y_BTD if cache is None else (y_BTD, cache)
