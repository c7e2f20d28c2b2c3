"""The one attention against a float64 numpy reference, for every mask type and both kernels."""

import numpy as np
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from archlab.config import ModelConfig
from archlab.errors import ConfigError
from archlab.nn import masks
from archlab.nn.attention import Attention, KVCache
from archlab.nn.layers import RelativePositionBias

B, T, S, D = 2, 7, 5, 24
KERNELS = ["xla", "dot_product_attention"]


def make_attention(kernel: str, **overrides) -> tuple[Attention, ModelConfig]:
    cfg = ModelConfig(
        family="decoder_only", vocab_size=50, d_model=D, n_layers=1, n_heads=6, d_ff=32, max_seq_len=16,
        attention_kernel=kernel, init_std=0.3, **overrides,
    )
    return Attention(cfg, rngs=nnx.Rngs(params=3)), cfg


def weights64(dense) -> tuple[np.ndarray, np.ndarray]:
    bias = np.zeros(dense.kernel.shape[1]) if dense.bias is None else np.asarray(dense.bias[...], np.float64)
    return np.asarray(dense.kernel[...], np.float64), bias


def rope64(x_BTNH: np.ndarray, positions_BT: np.ndarray, theta: float) -> np.ndarray:
    half = x_BTNH.shape[-1] // 2
    freq = 1.0 / theta ** (np.arange(half) / half)
    ang = positions_BT[..., None] * freq
    cos, sin = np.cos(ang)[:, :, None], np.sin(ang)[:, :, None]
    x1, x2 = x_BTNH[..., :half], x_BTNH[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def reference(attn: Attention, cfg: ModelConfig, x_q, x_kv, mask, bias=None, positions=None) -> np.ndarray:
    """softmax(q k^T / sqrt(H) + bias) v in float64, heads repeated for GQA."""
    x_q = np.asarray(x_q, np.float64)
    x_kv = x_q if x_kv is None else np.asarray(x_kv, np.float64)
    n, k_heads, h = cfg.n_heads, cfg.kv_heads, cfg.dim_per_head
    (wq, bq), (wk, bk), (wv, bv), (wo, bo) = (weights64(m) for m in (attn.q, attn.k, attn.v, attn.o))
    q = (x_q @ wq + bq).reshape(x_q.shape[0], x_q.shape[1], n, h)
    k = (x_kv @ wk + bk).reshape(x_kv.shape[0], x_kv.shape[1], k_heads, h)
    v = (x_kv @ wv + bv).reshape(x_kv.shape[0], x_kv.shape[1], k_heads, h)
    if positions is not None:
        q, k = rope64(q, positions, cfg.rope_theta), rope64(k, positions, cfg.rope_theta)
    k, v = np.repeat(k, n // k_heads, axis=2), np.repeat(v, n // k_heads, axis=2)
    scores = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(h)
    if bias is not None:
        scores = scores + np.asarray(bias, np.float64)
    scores = np.where(np.asarray(mask)[:, None], scores, -1e300)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    out = np.einsum("bnts,bsnh->btnh", weights, v).reshape(x_q.shape[0], x_q.shape[1], n * h)
    return out @ wo + bo


def inputs(seed: int = 0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32), jnp.asarray(rng.normal(size=(B, S, D)), jnp.float32)


SEGMENTS = jnp.array([[1, 1, 1, 2, 2, 3, 0], [1, 1, 1, 1, 1, 1, 1]], jnp.int32)
PREFIX = jnp.array([[1, 1, 0, 1, 0, 1, 0], [1, 1, 1, 0, 0, 0, 0]], bool)
SELF_MASKS = {
    "causal": jnp.broadcast_to(masks.causal_mask(T), (B, T, T)),
    "padding": masks.padding_mask(jnp.array([[1] * 5 + [0] * 2, [1] * 7]), T),
    "segment": masks.bidirectional_mask(SEGMENTS),
    "causal_segment": masks.decoder_mask(SEGMENTS),
    "prefix_lm": masks.prefix_lm_mask(SEGMENTS, PREFIX),
}


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("mask_name", list(SELF_MASKS))
@pytest.mark.parametrize("kv_heads", [6, 2, 1])
def test_self_attention_matches_float64(kernel, mask_name, kv_heads):
    attn, cfg = make_attention(kernel, n_kv_heads=kv_heads)
    x, _ = inputs()
    mask = SELF_MASKS[mask_name]
    out = attn(x, mask_BQK=mask)[0]
    valid = np.asarray(mask).any(-1)  # rows with no visible key (padding queries) are undefined
    np.testing.assert_allclose(np.asarray(out)[valid], reference(attn, cfg, x, None, mask)[valid], atol=2e-5)


@pytest.mark.parametrize("kernel", KERNELS)
def test_cross_attention_with_encoder_padding(kernel):
    attn, cfg = make_attention(kernel, n_kv_heads=3)
    x_q, x_kv = inputs(1)
    enc_segments = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    mask = masks.cross_mask(jnp.ones((B, T), jnp.int32), enc_segments)
    out = attn(x_q, x_kv, mask_BQK=mask)[0]
    np.testing.assert_allclose(np.asarray(out), reference(attn, cfg, x_q, x_kv, mask), atol=2e-5)
    # Encoder padding must not matter: change the padded encoder states and nothing moves.
    x_kv_changed = x_kv.at[0, 3:].set(100.0)
    np.testing.assert_allclose(np.asarray(attn(x_q, x_kv_changed, mask_BQK=mask)[0]), np.asarray(out), atol=1e-6)


@pytest.mark.parametrize("kernel", KERNELS)
def test_relative_bias_and_rope_match_float64(kernel):
    attn, cfg = make_attention(kernel, position="rope", n_kv_heads=2)
    x, _ = inputs(2)
    positions = jnp.array([[0, 1, 2, 0, 1, 0, 0], list(range(T))], jnp.int32)
    rel = RelativePositionBias(cfg.replace(position="relative"), bidirectional=False, rngs=nnx.Rngs(params=0))
    bias = rel(positions, positions)
    mask = SELF_MASKS["causal_segment"]
    out = attn(x, mask_BQK=mask, bias_BNQK=bias, q_positions_BT=positions)[0]
    expected = reference(attn, cfg, x, None, mask, bias=bias, positions=np.asarray(positions))
    valid = np.asarray(mask).any(-1)
    np.testing.assert_allclose(np.asarray(out)[valid], expected[valid], atol=2e-5)


def test_t5_relative_buckets_match_published_rule():
    from archlab.nn.layers import relative_position_bucket

    rel = jnp.arange(-200, 201)
    bidir = np.asarray(relative_position_bucket(rel, bidirectional=True, n_buckets=32, max_distance=128))
    # Exact buckets near zero, positive offsets in the upper half, saturation far away.
    assert bidir[200] == 0 and bidir[201] == 17 and bidir[199] == 1
    assert bidir[0] == 15 and bidir[-1] == 31
    causal = np.asarray(relative_position_bucket(rel, bidirectional=False, n_buckets=32, max_distance=128))
    assert (causal[201:] == 0).all() and causal[199] == 1 and causal[0] == 31
    assert (np.diff(causal[:201]) <= 0).all()


@pytest.mark.parametrize("kernel", KERNELS)
def test_decoder_self_attention_is_causal_by_gradient(kernel):
    attn, _ = make_attention(kernel, n_kv_heads=2)
    x, _ = inputs(3)
    mask = SELF_MASKS["causal"]
    for t in range(T):
        grad = jax.grad(lambda x_: attn(x_, mask_BQK=mask)[0][:, t].sum())(x)
        later = np.abs(np.asarray(grad[:, t + 1:])).max() if t + 1 < T else 0.0
        earlier = np.abs(np.asarray(grad[:, : t + 1])).max()
        assert later == 0.0, f"output {t} depends on a later input"
        assert earlier > 0.0


def test_encoder_self_attention_is_fully_bidirectional():
    attn, _ = make_attention("xla")
    x, _ = inputs(4)
    mask = masks.bidirectional_mask(jnp.ones((B, T), jnp.int32))
    jacobian = jax.jacobian(lambda x_: attn(x_, mask_BQK=mask)[0].sum(-1))(x)  # [B, T, B, T, D]
    per_pair = np.abs(np.asarray(jacobian)).sum(-1)
    for b in range(B):
        assert (per_pair[b, :, b, :] > 0).all(), "some output position ignores some input position"


def test_kernels_agree():
    outputs = []
    for kernel in KERNELS:
        attn, _ = make_attention(kernel, n_kv_heads=2)
        outputs.append(np.asarray(attn(inputs(5)[0], mask_BQK=SELF_MASKS["prefix_lm"])[0]))
    np.testing.assert_allclose(outputs[0], outputs[1], atol=1e-5)


def test_cached_attention_matches_full():
    attn, cfg = make_attention("xla", n_kv_heads=2)
    x, _ = inputs(6)
    full, _ = attn(x, mask_BQK=SELF_MASKS["causal"])
    cache = KVCache.zeros(cfg, B, 10)
    prefill_mask = masks.causal_mask(4, 10)
    out_prefix, cache = attn(x[:, :4], mask_BQK=jnp.broadcast_to(prefill_mask, (B, 4, 10)), cache=cache, cache_index=0)
    steps = [out_prefix]
    for t in range(4, T):
        step_mask = jnp.broadcast_to(masks.causal_mask(1, 10, t), (B, 1, 10))
        out_t, cache = attn(x[:, t:t + 1], mask_BQK=step_mask, cache=cache, cache_index=t)
        steps.append(out_t)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(steps, 1)), np.asarray(full), atol=1e-5)


def test_wrong_mask_shape_is_refused():
    attn, _ = make_attention("xla")
    x, _ = inputs()
    with pytest.raises(ConfigError, match="attention mask has shape"):
        attn(x, mask_BQK=jnp.ones((B, T + 1, T), bool))


BF16_TOLERANCE = 2**-6  # of the output scale: a few bfloat16 ulps (eps 2**-8) after several roundings


@pytest.mark.parametrize("case", [*SELF_MASKS, "cross", "relative_bias"])
@pytest.mark.parametrize("kv_heads", [6, 2, 1])
def test_kernels_agree_in_bfloat16(case, kv_heads):
    """The library kernel (cuDNN's path on a GPU) and the XLA einsums, both in bfloat16 compute,
    agree with each other and with the float64 reference, for every mask the families build."""
    x_q, x_kv = inputs(7)
    rel = RelativePositionBias(
        make_attention("xla")[1].replace(position="relative"), bidirectional=False, rngs=nnx.Rngs(params=0)
    )
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    bias = rel(positions, positions) if case == "relative_bias" else None
    if case == "cross":
        mask = masks.cross_mask(jnp.ones((B, T), jnp.int32), jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]))
    else:
        mask = SELF_MASKS["causal_segment" if case == "relative_bias" else case]
    kv_input = x_kv if case == "cross" else None
    outputs = {}
    for kernel in KERNELS:
        attn, cfg = make_attention(kernel, n_kv_heads=kv_heads, dtype="bfloat16")
        out, _ = attn(x_q, kv_input, mask_BQK=mask, bias_BNQK=bias)
        assert out.dtype == jnp.bfloat16
        outputs[kernel] = np.asarray(out.astype(jnp.float32))
    expected = reference(attn, cfg, x_q, kv_input, mask, bias=bias)
    valid = np.asarray(mask).any(-1)  # rows with no visible key are undefined
    tolerance = BF16_TOLERANCE * np.abs(expected[valid]).max()
    for kernel, out in outputs.items():
        np.testing.assert_allclose(out[valid], expected[valid], atol=tolerance, err_msg=kernel)
    np.testing.assert_allclose(outputs["xla"][valid], outputs["dot_product_attention"][valid], atol=tolerance)


@pytest.mark.parametrize("length", [8, 7])  # 7: not divisible by the blocks, the dense path
def test_causal_blocks_equal_the_dense_kernel_with_gradients(length):
    """``causal=True`` skips the score blocks above the diagonal: same values and gradients on every
    query that sees a key (padding queries, which see none, only have to stay finite)."""
    from archlab.nn.attention import attend

    rng = np.random.default_rng(5)
    segments = jnp.asarray([[1, 1, 1, 2, 2, 2, 2, 0][:length], [1, 1, 1, 1, 1, 1, 0, 0][:length]], jnp.int32)
    mask = masks.decoder_mask(segments)
    real = np.asarray(segments != 0)[:, :, None, None]
    q, k, v = (jnp.asarray(rng.normal(size=(2, length, n, 4)), jnp.float32) for n in (4, 2, 2))
    bias = jnp.asarray(rng.normal(size=(2, 4, length, length)), jnp.float32)
    d_out = jnp.asarray(rng.normal(size=(2, length, 4, 4)) * real, jnp.float32)

    def run(causal):
        f = lambda q_, k_, v_, b_: attend(q_, k_, v_, mask_BQK=mask, bias_BNQK=b_, scale=0.5, causal=causal)
        out, vjp = jax.vjp(f, q, k, v, bias)
        return out, vjp(d_out)

    (dense, dense_grads), (blocked, blocked_grads) = run(False), run(True)
    assert bool(jnp.isfinite(blocked).all())
    np.testing.assert_allclose(np.asarray(blocked) * real, np.asarray(dense) * real, atol=1e-6)
    for got, want in zip(blocked_grads, dense_grads):
        np.testing.assert_allclose(got, want, atol=1e-6)
