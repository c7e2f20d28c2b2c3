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
from archlab.nn.layers import Dense, compute_dtype, dropout, fused_dense, rope
from archlab.nn.masks import check_mask

Array = jax.Array
log = logging.getLogger(__name__)


INT8_MAX = 127
KV_SCALE_DTYPE = jnp.float32


def quantize_int8(x_BSKH: Array) -> tuple[Array, Array]:
    """Symmetric int8 with one scale per token and head: ``x ~= q * scale``.

    ``scale = max|x| / 127`` over ``head_dim``, so every element's error is at most
    ``scale / 2`` (round to nearest). Returns ``(q_BSKH int8, scale_BSK1 float32)``.
    """
    x_BSKH = x_BSKH.astype(jnp.float32)
    scale_BSK1 = jnp.max(jnp.abs(x_BSKH), axis=-1, keepdims=True) / INT8_MAX
    safe_BSK1 = jnp.where(scale_BSK1 > 0, scale_BSK1, 1.0)  # an all-zero row quantizes to zeros
    q_BSKH = jnp.clip(jnp.round(x_BSKH / safe_BSK1), -INT8_MAX, INT8_MAX).astype(jnp.int8)
    return q_BSKH, scale_BSK1.astype(KV_SCALE_DTYPE)


def dequantize_int8(q_BSKH: Array, scale_BSK1: Array, dtype) -> Array:
    return (q_BSKH.astype(jnp.float32) * scale_BSK1.astype(jnp.float32)).astype(dtype)


class KVCache(NamedTuple):
    """Fixed-shape key/value cache of one attention layer: ``[B, S_max, K, H]`` each.

    The storage dtype is ``model.kv_cache_dtype`` (``auto`` = the compute dtype). An int8
    cache also holds one float32 scale per token and head for keys and for values
    (``[B, S_max, K, 1]``; None for float caches): entries are quantized when written and
    dequantized to the compute dtype when read, so attention itself never sees int8.

    Keys use per-token scales like values, not per-channel ones (KIVI): the cache is written
    one token at a time and never revisited, so a token's scale is final when it is written,
    while a per-channel scale spans tokens and would need calibration or a float window of
    not-yet-quantized tokens that a fixed-shape, write-once cache does not have.
    """

    k_BSKH: Array
    v_BSKH: Array
    k_scale_BSK1: Array | None = None
    v_scale_BSK1: Array | None = None

    @classmethod
    def zeros(cls, cfg: ModelConfig, batch: int, max_len: int) -> "KVCache":
        shape = (batch, max_len, cfg.kv_heads, cfg.dim_per_head)
        if cfg.cache_dtype == "int8":
            scale_shape = (batch, max_len, cfg.kv_heads, 1)
            return cls(
                jnp.zeros(shape, jnp.int8), jnp.zeros(shape, jnp.int8),
                jnp.zeros(scale_shape, KV_SCALE_DTYPE), jnp.zeros(scale_shape, KV_SCALE_DTYPE),
            )
        dtype = jnp.dtype(cfg.cache_dtype)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    @property
    def quantized(self) -> bool:
        return self.k_scale_BSK1 is not None

    def write(self, k_BSKH: Array, v_BSKH: Array, index: Array | int) -> "KVCache":
        """The cache with ``k``/``v`` (``[B, T, K, H]``) stored at slots ``index .. index + T - 1``."""
        start = (0, index, 0, 0)

        def put(buffer: Array, new: Array) -> Array:
            return jax.lax.dynamic_update_slice(buffer, new.astype(buffer.dtype), start)

        if not self.quantized:
            return KVCache(put(self.k_BSKH, k_BSKH), put(self.v_BSKH, v_BSKH))
        (k_q, k_scale), (v_q, v_scale) = quantize_int8(k_BSKH), quantize_int8(v_BSKH)
        return KVCache(
            put(self.k_BSKH, k_q), put(self.v_BSKH, v_q),
            put(self.k_scale_BSK1, k_scale), put(self.v_scale_BSK1, v_scale),
        )

    def read(self, dtype) -> tuple[Array, Array]:
        """Every slot's keys and values in ``dtype`` (dequantized for an int8 cache)."""
        if not self.quantized:
            return self.k_BSKH.astype(dtype), self.v_BSKH.astype(dtype)
        return (
            dequantize_int8(self.k_BSKH, self.k_scale_BSK1, dtype),
            dequantize_int8(self.v_BSKH, self.v_scale_BSK1, dtype),
        )


def _xla_attention(q_BTNH, k_BSKH, v_BSKH, mask_BQK, bias_BNQK, scale: float, causal_blocks: int = 1,
                   dropout_rate: float = 0.0, dropout_key: Array | None = None) -> Array:
    """Reference kernel: plain einsums, scores and normalisation in float32.

    Two choices make it ~11% faster per layer on the CPU (fwd+bwd, experiments/throughput/):
    q, k and v are put heads-major once (``[B,K,G,T,H]``, ``[B,K,S,H]``), so each product is a
    plain batched matmul, and the softmax is normalised *after* the value product,
    ``(exp(s - max) @ v) / sum(exp(s - max))``, which divides ``[.., T, H]`` instead of the
    ``[.., T, S]`` weights in both directions. The max is a constant shift (stop_gradient):
    the result and its gradient do not depend on it.

    ``causal_blocks > 1`` promises a mask that hides every key after its query (causal
    self-attention, packed or not): the queries are cut into that many blocks and block ``i``
    reads only the keys up to its own end, skipping the score blocks the mask zeroes anyway
    (a quarter of the work with 2 blocks; ~6% of the CPU training step, experiments/throughput/).
    Same values and gradients for every query that sees a key; a fully masked (padding) query
    gets uniform weights over its block's keys instead of all keys. Ignored when the length
    does not divide.

    ``dropout_rate`` with a ``dropout_key`` drops attention weights (each query block its own draws).
    """
    batch, q_len, n_heads, head_dim = q_BTNH.shape
    kv_heads = k_BSKH.shape[2]
    group = n_heads // kv_heads
    q_BKGTH = jnp.transpose(q_BTNH.reshape(batch, q_len, kv_heads, group, head_dim), (0, 2, 3, 1, 4))
    k_BKSH = jnp.transpose(k_BSKH, (0, 2, 1, 3))
    v_BKSH = jnp.transpose(v_BSKH, (0, 2, 1, 3))
    if causal_blocks < 2 or q_len != k_BSKH.shape[1] or q_len % causal_blocks:
        causal_blocks = 1
    size = q_len // causal_blocks
    outs = []
    for i in range(causal_blocks):
        last = i == causal_blocks - 1
        rows, keys = slice(i * size, (i + 1) * size), slice(0, k_BKSH.shape[2] if last else (i + 1) * size)
        bias = None if bias_BNQK is None else bias_BNQK[:, :, rows, keys]
        block_key = None if dropout_key is None else jax.random.fold_in(dropout_key, i)
        outs.append(_attention_block(
            q_BKGTH[:, :, :, rows], k_BKSH[:, :, keys], v_BKSH[:, :, keys], mask_BQK[:, rows, keys], bias, scale,
            dropout_rate, block_key,
        ))
    out_BKGTH = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)
    out_BTKGH = jnp.transpose(out_BKGTH, (0, 3, 1, 2, 4)).astype(v_BSKH.dtype)
    return out_BTKGH.reshape(batch, q_len, n_heads, head_dim)


def _attention_block(q_BKGTH, k_BKSH, v_BKSH, mask_BQK, bias_BNQK, scale: float, dropout_rate: float = 0.0,
                     dropout_key: Array | None = None) -> Array:
    kv_heads, group = q_BKGTH.shape[1], q_BKGTH.shape[2]
    scores_BKGTS = jnp.einsum("bkgth,bksh->bkgts", q_BKGTH, k_BKSH, preferred_element_type=jnp.float32)
    scores_BKGTS = scores_BKGTS * scale
    if bias_BNQK is not None:
        bias_BKGTS = bias_BNQK.reshape(bias_BNQK.shape[0], kv_heads, group, *bias_BNQK.shape[2:])
        scores_BKGTS = scores_BKGTS + bias_BKGTS.astype(jnp.float32)
    # A fully masked row (a padding query) gets uniform weights instead of NaN.
    scores_BKGTS = jnp.where(mask_BQK[:, None, None], scores_BKGTS, jnp.finfo(jnp.float32).min)
    max_BKGT1 = jax.lax.stop_gradient(jnp.max(scores_BKGTS, axis=-1, keepdims=True))
    unnormalized_BKGTS = jnp.exp(scores_BKGTS - max_BKGT1)
    total_BKGT1 = jnp.sum(unnormalized_BKGTS, axis=-1, keepdims=True)
    # Dropping the unnormalised weights and dividing by the undropped total is dropout of the softmax.
    unnormalized_BKGTS = dropout(unnormalized_BKGTS, dropout_rate, dropout_key)
    out_BKGTH = jnp.einsum(
        "bkgts,bksh->bkgth", unnormalized_BKGTS.astype(v_BKSH.dtype), v_BKSH, preferred_element_type=jnp.float32
    )
    return out_BKGTH / total_BKGT1


def _library_attention(q_BTNH, k_BSKH, v_BSKH, mask_BQK, bias_BNQK, scale: float, implementation) -> Array:
    """``jax.nn.dot_product_attention``: cuDNN flash attention on a GPU where it applies."""
    bias = None if bias_BNQK is None else bias_BNQK.astype(q_BTNH.dtype)
    return jax.nn.dot_product_attention(
        q_BTNH, k_BSKH, v_BSKH, bias=bias, mask=mask_BQK[:, None], scale=scale, implementation=implementation
    )


def attend(
    q_BTNH, k_BSKH, v_BSKH, *, mask_BQK, bias_BNQK=None, scale: float, kernel: str = "xla", causal: bool = False,
    causal_blocks: int = 2, dropout_rate: float = 0.0, dropout_key: Array | None = None,
) -> Array:
    """softmax(q k^T * scale + bias, masked) v with the configured kernel.

    ``causal`` promises that the mask hides every key after its query; the XLA kernel then splits
    the queries into ``causal_blocks`` blocks and skips the score blocks above the diagonal.
    """
    if kernel == "xla":
        return _xla_attention(q_BTNH, k_BSKH, v_BSKH, mask_BQK, bias_BNQK, scale, causal_blocks if causal else 1,
                              dropout_rate, dropout_key)
    if kernel == "dot_product_attention":
        return _library_attention(q_BTNH, k_BSKH, v_BSKH, mask_BQK, bias_BNQK, scale, None)
    reason = cudnn_refusal(q_BTNH.shape[1], k_BSKH.shape[1], q_BTNH.shape[-1])
    if reason is None:
        try:
            return _library_attention(q_BTNH, k_BSKH, v_BSKH, mask_BQK, bias_BNQK, scale, "cudnn")
        except (ValueError, NotImplementedError, RuntimeError) as refusal:
            reason = str(refusal).splitlines()[0]
    log.warning("cuDNN attention refused (%s); falling back to the XLA kernel", reason)
    return _xla_attention(q_BTNH, k_BSKH, v_BSKH, mask_BQK, bias_BNQK, scale)


def cudnn_refusal(q_len: int, kv_len: int, head_dim: int) -> str | None:
    """Why cuDNN flash attention would refuse this shape in training, or None.

    Checked before the call because cuDNN's backward pass checks its shapes only when the
    gradient is built, which for scanned layers happens after ``attend`` has returned: a refusal
    there cannot fall back any more (seen: T5 span corruption's 229-token decoder on an H100).
    """
    if q_len % 64 or kv_len % 64:
        return f"sequence lengths must be multiples of 64 for its backward pass, got Q {q_len}, KV {kv_len}"
    if head_dim % 8:
        return f"head dimension {head_dim} is not a multiple of 8"
    return None


class Attention(nnx.Module):
    """Multi-head / grouped-query / multi-query attention.

    Self-attention when ``x_kv_BSD is None``, cross-attention otherwise; cross-attention can
    also take its keys and values already projected (``kv``, from ``project_kv``), which is how
    decoding reads the encoder once instead of once per generated token. With ``cache``,
    the new keys/values are written at ``cache_index`` and the queries attend the whole
    fixed-shape cache (the caller's mask hides unwritten slots). Always returns ``(y, cache)``:
    the updated cache, or None when called without one.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, out_std: float | None = None):
        self.n_heads, self.kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.dim_per_head
        self.scale = 1.0 / math.sqrt(self.head_dim) if cfg.scale_attention else 1.0
        self.kernel = cfg.attention_kernel
        self.fuse_qkv = cfg.fuse_qkv
        self.causal_blocks = cfg.causal_blocks
        self.dropout_rate = cfg.attention_dropout
        self.use_rope = cfg.position == "rope"
        self.rope_theta = cfg.rope_theta
        dense = dict(use_bias=cfg.use_bias, dtype=compute_dtype(cfg), rngs=rngs)
        q_width, kv_width = self.n_heads * self.head_dim, self.kv_heads * self.head_dim
        self.q = Dense(cfg.d_model, q_width, std=cfg.init_std, **dense)
        self.k = Dense(cfg.d_model, kv_width, std=cfg.init_std, **dense)
        self.v = Dense(cfg.d_model, kv_width, std=cfg.init_std, **dense)
        self.o = Dense(q_width, cfg.d_model, std=out_std or cfg.init_std, **dense)

    def project_kv(self, x_kv_BSD: Array) -> tuple[Array, Array]:
        """Keys and values ``[B, S, K, H]`` of a cross-attention memory (no RoPE: it has no query positions)."""
        return self._split_kv_heads(*fused_dense((self.k, self.v), x_kv_BSD))

    def _split_kv_heads(self, k_BSF: Array, v_BSF: Array) -> tuple[Array, Array]:
        shape = (*k_BSF.shape[:2], self.kv_heads, self.head_dim)
        return k_BSF.reshape(shape), v_BSF.reshape(shape)

    def __call__(
        self,
        x_q_BTD: Array,
        x_kv_BSD: Array | None = None,
        *,
        kv: tuple[Array, Array] | None = None,
        mask_BQK: Array,
        bias_BNQK: Array | None = None,
        q_positions_BT: Array | None = None,
        kv_positions_BS: Array | None = None,
        cache: KVCache | None = None,
        cache_index: Array | int | None = None,
        causal: bool = False,
        dropout_key: Array | None = None,
    ):
        is_self = x_kv_BSD is None and kv is None
        batch, q_len, _ = x_q_BTD.shape
        if is_self and self.fuse_qkv:
            q_BTF, k_BSF, v_BSF = fused_dense((self.q, self.k, self.v), x_q_BTD)
            k_BSKH, v_BSKH = self._split_kv_heads(k_BSF, v_BSF)
        else:
            q_BTF = self.q(x_q_BTD)
            k_BSKH, v_BSKH = kv if kv is not None else self.project_kv(x_q_BTD if is_self else x_kv_BSD)
        q_BTNH = q_BTF.reshape(batch, q_len, self.n_heads, self.head_dim)
        if self.use_rope and is_self:
            q_BTNH = rope(q_BTNH, q_positions_BT, self.rope_theta)
            k_BSKH = rope(k_BSKH, q_positions_BT if kv_positions_BS is None else kv_positions_BS, self.rope_theta)
        if cache is not None:
            cache = cache.write(k_BSKH, v_BSKH, cache_index)
            k_BSKH, v_BSKH = cache.read(q_BTNH.dtype)
        check_mask(mask_BQK, batch, q_len, k_BSKH.shape[1])
        out_BTNH = attend(
            q_BTNH, k_BSKH, v_BSKH, mask_BQK=mask_BQK, bias_BNQK=bias_BNQK, scale=self.scale, kernel=self.kernel,
            causal=causal and cache is None, causal_blocks=self.causal_blocks,
            dropout_rate=self.dropout_rate, dropout_key=dropout_key,
        )
        return self.o(out_BTNH.reshape(batch, q_len, self.n_heads * self.head_dim)), cache
