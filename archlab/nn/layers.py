"""Building blocks: projections, embeddings, positions, norms and MLPs.

Shape letters (as in attention.py): B batch, T/Q query length, S/K key length, D d_model,
F d_ff, V vocabulary, N query heads, H head_dim.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from archlab.config import ModelConfig

Array = jax.Array


def compute_dtype(cfg: ModelConfig) -> jnp.dtype:
    return jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32


def normal_init(std: float):
    return jax.nn.initializers.normal(stddev=std)


class Dense(nnx.Module):
    """``y = x @ kernel + bias`` over the last axis, kernel stored ``[in, out]``.

    Activations are flattened to 2-D around the matmul: on the CPU the backward pass of a
    3-D ``[B,T,D] @ [D,F]`` ran ~1.8x slower than the same product on ``[B*T, D]``
    (NOTES.md), and the reshape is free.
    """

    def __init__(self, d_in: int, d_out: int, *, use_bias: bool, std: float, dtype, rngs: nnx.Rngs):
        self.kernel = nnx.Param(normal_init(std)(rngs.params(), (d_in, d_out), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((d_out,), jnp.float32)) if use_bias else None
        self.dtype = dtype

    def __call__(self, x: Array) -> Array:
        lead_shape = x.shape[:-1]
        x_MI = x.reshape(-1, x.shape[-1]).astype(self.dtype)
        y_MO = x_MI @ self.kernel[...].astype(self.dtype)
        if self.bias is not None:
            y_MO = y_MO + self.bias[...].astype(self.dtype)
        return y_MO.reshape(*lead_shape, y_MO.shape[-1])


def fused_dense(denses: tuple[Dense, ...], x: Array) -> tuple[Array, ...]:
    """``tuple(d(x) for d in denses)`` as one matmul against the kernels concatenated on their
    output axis (built per call; the parameters stay separate).

    Used for the q/k/v projections of self-attention: one ``[B*T, D] @ [D, 3D]`` product, and in
    the backward pass one input-gradient product instead of three plus two additions.
    """
    first = denses[0]
    x_MI = x.reshape(-1, x.shape[-1]).astype(first.dtype)
    kernel = jnp.concatenate([d.kernel[...] for d in denses], axis=1).astype(first.dtype)
    y_MO = x_MI @ kernel
    if first.bias is not None:
        y_MO = y_MO + jnp.concatenate([d.bias[...] for d in denses]).astype(first.dtype)
    widths = [d.kernel.shape[1] for d in denses]
    splits = [sum(widths[: i + 1]) for i in range(len(widths) - 1)]
    return tuple(y.reshape(*x.shape[:-1], y.shape[-1]) for y in jnp.split(y_MO, splits, axis=1))


class Embedding(nnx.Module):
    """Token (or position / token-type) table; a tied LM head reuses it as its output matrix."""

    def __init__(self, n_rows: int, d_model: int, *, std: float, dtype, rngs: nnx.Rngs):
        self.embedding = nnx.Param(normal_init(std)(rngs.params(), (n_rows, d_model), jnp.float32))
        self.dtype = dtype

    def __call__(self, ids: Array) -> Array:
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)


def project_padded(x_MD: Array, w_DV: Array, pad_multiple: int) -> Array:
    """``x @ w`` with ``w``'s columns zero-padded to a multiple of ``pad_multiple``, padding dropped.

    GPT-2's 50,257 columns make the largest matmul of the step a shape tensor cores tile badly;
    computed over 50,304 columns the step ran ~12% faster on an H100 (experiments/throughput/).
    The values are exactly those of ``x @ w``: the extra columns are computed, then sliced away.
    """
    vocab = w_DV.shape[1]
    padded = -(-vocab // pad_multiple) * pad_multiple
    if padded == vocab:
        return x_MD @ w_DV
    return (x_MD @ jnp.pad(w_DV, ((0, 0), (0, padded - vocab))))[:, :vocab]


class Norm(nnx.Module):
    """LayerNorm or RMSNorm (T5's: no mean subtraction, no bias), computed in float32."""

    def __init__(self, cfg: ModelConfig, d: int | None = None):
        d = cfg.d_model if d is None else d
        self.rms = cfg.norm == "rmsnorm"
        self.eps = cfg.norm_eps
        self.dtype = compute_dtype(cfg)
        self.scale = nnx.Param(jnp.ones((d,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((d,), jnp.float32)) if (cfg.use_bias and not self.rms) else None

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        if self.rms:
            y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        else:
            mean = jnp.mean(x32, axis=-1, keepdims=True)
            var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
            y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...]
        if self.bias is not None:
            y = y + self.bias[...]
        return y.astype(self.dtype)


def activation_fn(name: str):
    """The nonlinearity; for gated MLPs, the one applied to the gate branch."""
    return {
        "gelu": lambda x: jax.nn.gelu(x, approximate=False),
        "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
        "relu": jax.nn.relu,
        "geglu": lambda x: jax.nn.gelu(x, approximate=True),
        "swiglu": jax.nn.silu,
        "reglu": jax.nn.relu,
    }[name]


class MLP(nnx.Module):
    """``wo(act(wi x))`` or, gated (GEGLU/SwiGLU), ``wo(act(wi_gate x) * wi_up x)``."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, out_std: float):
        dtype = compute_dtype(cfg)
        dense = dict(use_bias=cfg.use_bias, dtype=dtype, rngs=rngs)
        self.gated = cfg.is_gated
        self.act = activation_fn(cfg.activation)
        self.wi = Dense(cfg.d_model, cfg.d_ff, std=cfg.init_std, **dense)
        self.wi_up = Dense(cfg.d_model, cfg.d_ff, std=cfg.init_std, **dense) if self.gated else None
        self.wo = Dense(cfg.d_ff, cfg.d_model, std=out_std, **dense)

    def __call__(self, x_BTD: Array) -> Array:
        h_BTF = self.act(self.wi(x_BTD))
        if self.wi_up is not None:
            h_BTF = h_BTF * self.wi_up(x_BTD)
        return self.wo(h_BTF)


def rope(x_BTNH: Array, positions_BT: Array, theta: float) -> Array:
    """Rotary position embedding, rotate-half convention (GPT-NeoX, LLaMA)."""
    half = x_BTNH.shape[-1] // 2
    inv_freq_H = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) / half))
    angles_BTH = positions_BT[..., None].astype(jnp.float32) * inv_freq_H
    cos_BT1H = jnp.cos(angles_BTH)[:, :, None, :]
    sin_BT1H = jnp.sin(angles_BTH)[:, :, None, :]
    x1, x2 = x_BTNH[..., :half].astype(jnp.float32), x_BTNH[..., half:].astype(jnp.float32)
    rotated = jnp.concatenate([x1 * cos_BT1H - x2 * sin_BT1H, x2 * cos_BT1H + x1 * sin_BT1H], axis=-1)
    return rotated.astype(x_BTNH.dtype)


def relative_position_bucket(relative_QK: Array, *, bidirectional: bool, n_buckets: int, max_distance: int) -> Array:
    """T5's bucketing of ``key_position - query_position``: exact near, logarithmic far."""
    bucket = jnp.zeros_like(relative_QK)
    if bidirectional:
        n_buckets //= 2
        bucket = bucket + (relative_QK > 0).astype(relative_QK.dtype) * n_buckets
        distance = jnp.abs(relative_QK)
    else:
        distance = -jnp.minimum(relative_QK, 0)
    max_exact = n_buckets // 2
    is_small = distance < max_exact
    safe = jnp.maximum(distance, 1).astype(jnp.float32)
    log_ratio = jnp.log(safe / max_exact) / math.log(max_distance / max_exact)
    large = max_exact + (log_ratio * (n_buckets - max_exact)).astype(relative_QK.dtype)
    large = jnp.minimum(large, n_buckets - 1)
    return bucket + jnp.where(is_small, distance, large)


class RelativePositionBias(nnx.Module):
    """T5 relative attention bias: one learned scalar per (bucket, head), shared by all layers."""

    def __init__(self, cfg: ModelConfig, *, bidirectional: bool, rngs: nnx.Rngs):
        self.bidirectional = bidirectional
        self.n_buckets = cfg.relative_buckets
        self.max_distance = cfg.relative_max_distance
        self.embedding = nnx.Param(
            normal_init(cfg.init_std)(rngs.params(), (cfg.relative_buckets, cfg.n_heads), jnp.float32)
        )

    def __call__(self, q_positions_BQ: Array, k_positions_BK: Array) -> Array:
        relative_BQK = k_positions_BK[:, None, :] - q_positions_BQ[:, :, None]
        bucket_BQK = relative_position_bucket(
            relative_BQK, bidirectional=self.bidirectional, n_buckets=self.n_buckets, max_distance=self.max_distance
        )
        bias_BQKN = jnp.take(self.embedding[...], bucket_BQK, axis=0)
        return jnp.transpose(bias_BQKN, (0, 3, 1, 2))


def dropout(x: Array, rate: float, key: Array | None) -> Array:
    """Inverted dropout: each element zeroed with probability ``rate``, the rest scaled by 1/(1-rate);
    ``x`` itself (not a copy) when ``rate`` is 0 or there is no key (evaluation, generation)."""
    if not rate or key is None:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)
