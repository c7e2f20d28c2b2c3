"""cuDNN attention against the XLA kernel on a GPU, in bfloat16, for every mask the families use.

Skipped where JAX sees no GPU (CI); run on a GPU machine with ``python -m pytest tests/test_gpu_attention.py``.
Both kernels get the same bfloat16 projections; the XLA kernel's scores and softmax run in float32,
cuDNN's flash attention accumulates in float32 too, so they agree to bfloat16 rounding (~2^-8 of
the output's scale). The gradient is compared the same way, since training uses it.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from archlab.nn import masks
from archlab.nn.attention import attend

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs a GPU")

B, T, S, N, K, H = 2, 128, 192, 8, 2, 64  # cuDNN trains on lengths that are multiples of 64
SEGMENTS_BT = jnp.asarray(np.repeat([[1, 2, 3, 0], [1, 1, 1, 1]], T // 4, axis=1), jnp.int32)
PREFIX_BT = jnp.arange(T)[None, :] < jnp.asarray([[40], [70]])
ENC_SEGMENTS_BS = jnp.asarray(np.repeat([[1, 1, 0], [1, 1, 1]], S // 3, axis=1), jnp.int32)
MASKS = {
    "causal (GPT)": jnp.broadcast_to(masks.causal_mask(T), (B, T, T)),
    "causal, packed (GPT)": masks.decoder_mask(SEGMENTS_BT),
    "bidirectional, padded (BERT)": masks.padding_mask(jnp.asarray([[1] * 100 + [0] * 28, [1] * T]), T),
    "bidirectional, packed (BERT, T5 encoder)": masks.bidirectional_mask(SEGMENTS_BT),
    "prefix-LM": masks.prefix_lm_mask(SEGMENTS_BT, PREFIX_BT),
}


def qkv(kv_len: int, seed: int = 0):
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (B, T, N, H), jnp.bfloat16)
    k = jax.random.normal(keys[1], (B, kv_len, K, H), jnp.bfloat16)
    v = jax.random.normal(keys[2], (B, kv_len, K, H), jnp.bfloat16)
    return q, k, v


def outputs_and_grads(kernel: str, q, k, v, mask_BQK, bias_BNQK=None):
    """Output and (dq, dk, dv) of a weighted sum of the outputs, padding queries zeroed.

    A query that attends nothing (padding) is a don't-care: training gives its position weight
    0, so neither its output nor anything that flows back from it is compared (the XLA kernel
    returns uniform weights there, cuDNN zeros).
    """
    live_BT11 = jnp.any(mask_BQK, axis=-1)[:, :, None, None]

    def loss(q, k, v):
        out = attend(q, k, v, mask_BQK=mask_BQK, bias_BNQK=bias_BNQK, scale=H**-0.5, kernel=kernel)
        out = jnp.where(live_BT11, out.astype(jnp.float32), 0.0)
        return jnp.sum(out * jnp.linspace(-1, 1, out.size).reshape(out.shape)), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    dq = jnp.where(live_BT11, grads[0].astype(jnp.float32), 0.0)
    return [np.asarray(x, np.float32) for x in (out, dq, *grads[1:])]


def assert_bf16_close(got, want):
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=3e-2 * max(1.0, float(np.abs(w).max())), rtol=2e-2)


@pytest.mark.parametrize("name", list(MASKS))
def test_cudnn_self_attention_agrees_with_xla_in_bf16(name):
    q, k, v = qkv(T)
    mask = MASKS[name]
    assert_bf16_close(outputs_and_grads("cudnn", q, k, v, mask), outputs_and_grads("xla", q, k, v, mask))


def test_cudnn_cross_attention_with_encoder_padding_agrees_with_xla():
    q, k, v = qkv(S, seed=1)
    mask = masks.cross_mask(jnp.ones((B, T), jnp.int32), ENC_SEGMENTS_BS)
    assert_bf16_close(outputs_and_grads("cudnn", q, k, v, mask), outputs_and_grads("xla", q, k, v, mask))


def test_cudnn_with_t5_relative_bias_agrees_with_xla():
    q, k, v = qkv(T, seed=2)
    bias = jax.random.normal(jax.random.key(3), (1, N, T, T), jnp.float32)
    mask = MASKS["causal (GPT)"]
    assert_bf16_close(outputs_and_grads("cudnn", q, k, v, mask, bias), outputs_and_grads("xla", q, k, v, mask, bias))


def test_cudnn_refused_shape_falls_back_to_xla():
    """A length cuDNN cannot train on (not a multiple of 64) goes through the XLA kernel instead."""
    q, k, v = (x[:, :100] for x in qkv(T, seed=4))
    mask = jnp.broadcast_to(masks.causal_mask(100), (B, 100, 100))
    assert_bf16_close(outputs_and_grads("cudnn", q, k, v, mask), outputs_and_grads("xla", q, k, v, mask))
