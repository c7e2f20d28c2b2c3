"""Decoding with the KV cache: cached logits equal full recomputation, left padding is
invisible, the decode step compiles once, EOS stops rows, sampling draws from the right
distribution, and bad requests are refused with one sentence."""

from functools import lru_cache

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from archlab.config import ModelConfig
from archlab.errors import ConfigError
from archlab.generate import TRACE_COUNTS, generate, sample_logits
from archlab.nn.models import build_model
from archlab.tokens import SPECIAL

# Untied head and a wide init: greedy tokens vary instead of repeating the last input.
TINY = dict(d_model=32, n_layers=2, n_heads=4, d_ff=48, vocab_size=150, max_seq_len=40, init_std=0.5,
            tie_embeddings=False)
VARIANTS = {
    "learned": dict(position="learned"),
    "rope_gqa": dict(position="rope", n_kv_heads=2),
    "relative": dict(position="relative", use_bias=False, norm="rmsnorm"),
}
ENC_DEC = dict(family="encoder_decoder", position="relative", n_kv_heads=2, use_bias=False, norm="rmsnorm")
PROMPTS = [[7, 8, 9, 10, 11, 12, 13], [20, 21, 22], [30, 31, 32, 33, 34]]
NEW = 8
CACHE_LEN = max(map(len, PROMPTS)) + NEW
ATOL = 2e-5  # float32 round-off: these logits reach ~11 (init_std=0.5), so about 2e-6 relative


@lru_cache(maxsize=None)
def model(name: str):
    overrides = ENC_DEC if name == "enc_dec" else VARIANTS[name]
    return build_model(ModelConfig(**{**TINY, **overrides}), seed=1)


@lru_cache(maxsize=None)
def batched(name: str):
    return generate(model(name), PROMPTS, max_new_tokens=NEW, eos_id=None, return_logits=True)


def full_logits(name: str, new_tokens: list[list[int]]) -> np.ndarray:
    """``[B, NEW, V]``: the uncached model's logits at the steps that chose ``new_tokens``.

    One right-padded forward pass over every row (segment id 0 on padding): padding after a
    causal sequence never changes its logits.
    """
    net = model(name)
    if name == "enc_dec":
        encoder_BS, encoder_segments_BS = right_pad(PROMPTS)
        decoder_BT = jnp.asarray([[SPECIAL.pad, *row[:-1]] for row in new_tokens], jnp.int32)
        return np.asarray(net(encoder_BS, decoder_BT, encoder_segment_ids_BS=encoder_segments_BS))
    tokens_BT, segments_BT = right_pad([prompt + row[:-1] for prompt, row in zip(PROMPTS, new_tokens)])
    logits_BTV = np.asarray(net(tokens_BT, segment_ids_BT=segments_BT))
    return np.stack([logits_BTV[b, len(p) - 1:len(p) - 1 + NEW] for b, p in enumerate(PROMPTS)])


def right_pad(rows: list[list[int]]) -> tuple[jax.Array, jax.Array]:
    length = max(map(len, rows))
    tokens = [row + [SPECIAL.pad] * (length - len(row)) for row in rows]
    segments = [[1] * len(row) + [0] * (length - len(row)) for row in rows]
    return jnp.asarray(tokens, jnp.int32), jnp.asarray(segments, jnp.int32)


@pytest.mark.parametrize("name", [*VARIANTS, "enc_dec"])
def test_cached_logits_equal_full_recomputation(name):
    result = batched(name)
    assert result.logits.shape == (len(PROMPTS), NEW, TINY["vocab_size"])
    assert all(len(row) == NEW for row in result.tokens)
    diff = np.abs(result.logits - full_logits(name, result.tokens)).max()
    print(f"{name}: max |cached - full| = {diff:.2e}")
    assert diff <= ATOL, f"{name}: cached logits differ from full recomputation by {diff:.2e}"


def test_decoding_from_projected_encoder_keys_and_values_equals_decoding_from_the_encoder():
    """Generation projects the encoder output once per layer (``cross_kv``); the decoder must
    read it exactly as it reads ``encoded_BSD``."""
    net = model("enc_dec")
    encoder_BS, encoder_segments_BS = right_pad(PROMPTS)
    encoded_BSD = net.encode(encoder_BS, segment_ids_BS=encoder_segments_BS)
    cross_kv = net.cross_kv(encoded_BSD)
    assert cross_kv[0].shape == (TINY["n_layers"], *encoder_BS.shape, ENC_DEC["n_kv_heads"], 32 // 4)
    decoder_BT = jnp.asarray([[SPECIAL.pad, 5, 6, 7], [SPECIAL.pad, 8, 9, 10], [SPECIAL.pad, 11, 12, 13]], jnp.int32)
    from_encoded, _ = net.hidden(decoder_BT, encoded_BSD, encoder_segment_ids_BS=encoder_segments_BS)
    from_projected, _ = net.hidden(decoder_BT, encoder_segment_ids_BS=encoder_segments_BS, cross_kv=cross_kv)
    np.testing.assert_allclose(np.asarray(from_projected), np.asarray(from_encoded), atol=1e-6)
    with pytest.raises(ValueError, match="exactly one"):
        net.hidden(decoder_BT, encoded_BSD, cross_kv=cross_kv)
    with pytest.raises(ValueError, match="exactly one"):
        net.hidden(decoder_BT)


@pytest.mark.parametrize("name", [*VARIANTS, "enc_dec"])
def test_batched_prompts_match_one_at_a_time(name):
    result = batched(name)
    for b, prompt in enumerate(PROMPTS):
        # A common cache length lets the decoder-only runs share one compiled step.
        alone = generate(model(name), [prompt], max_new_tokens=NEW, eos_id=None, max_len=CACHE_LEN,
                         return_logits=True)
        assert alone.tokens[0] == result.tokens[b]
        # Only the summation order differs (longer cache, masked slots): float32 round-off.
        np.testing.assert_allclose(alone.logits[0], result.logits[b], atol=1e-4)
        np.testing.assert_allclose(alone.logprobs[0], result.logprobs[b], atol=1e-4)


def test_generated_tokens_vary():
    """Guard against a degenerate fixture that would make the equality tests vacuous."""
    assert all(len(set(row)) > 2 for row in batched("learned").tokens)


@pytest.mark.parametrize("name", ["learned", "enc_dec"])
def test_decode_step_compiles_once(name):
    step_key = "encoder_decoder_step" if name == "enc_dec" else "decoder_only_step"
    prompts = [[40 + i, 41, 42, 43][: 2 + i] for i in range(4)]  # a batch shape no other test uses
    before = TRACE_COUNTS[step_key]
    first = generate(model(name), prompts, max_new_tokens=13, eos_id=None)
    assert all(len(row) == 13 for row in first.tokens)
    assert TRACE_COUNTS[step_key] - before == 1, "the decode step was traced more than once"
    # New prompt values, seed and EOS-free rows of the same shapes reuse the compiled step.
    generate(model(name), [[p + 1 for p in row] for row in prompts], max_new_tokens=13, eos_id=None, seed=3)
    assert TRACE_COUNTS[step_key] - before == 1


@pytest.mark.parametrize("name", ["learned", "enc_dec"])
def test_rows_stop_at_eos_and_the_loop_ends_when_all_have(name):
    reference = batched(name)
    row0 = reference.tokens[0]
    cut = next(i for i in range(1, NEW) if row0[i] not in row0[:i])
    eos = row0[cut]
    result = generate(model(name), PROMPTS, max_new_tokens=NEW, eos_id=eos, return_logits=True)
    assert result.tokens[0] == row0[:cut] and result.finished[0]
    for b in range(1, len(PROMPTS)):
        expected = reference.tokens[b]
        stop = expected.index(eos) if eos in expected else NEW
        assert result.tokens[b] == expected[:stop] and result.finished[b] == (eos in expected)
        assert len(result.logprobs[b]) == len(result.tokens[b])
    alone = generate(model(name), [PROMPTS[0]], max_new_tokens=NEW, eos_id=eos, max_len=CACHE_LEN,
                     return_logits=True)
    assert alone.tokens[0] == row0[:cut]
    assert alone.logits.shape[1] == cut + 1, "the loop must end once every row produced EOS"


# ---- sampling ---------------------------------------------------------------------------


def random_logits(batch: int = 64, vocab: int = 50, seed: int = 0) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).normal(scale=3.0, size=(batch, vocab)), jnp.float32)


def draws(logits_V: jax.Array, n: int, seed: int = 0, **sampling) -> np.ndarray:
    """``n`` independent samples from one row of logits."""
    logits_NV = jnp.broadcast_to(logits_V, (n, logits_V.shape[-1]))
    return np.asarray(sample_logits(logits_NV, jax.random.key(seed), **sampling))


def test_greedy_is_argmax():
    logits = random_logits()
    np.testing.assert_array_equal(sample_logits(logits, jax.random.key(0)), jnp.argmax(logits, -1))


@pytest.mark.parametrize("sampling", [dict(top_k=1), dict(top_p=1e-6), dict(top_k=1, top_p=0.9)])
def test_degenerate_filters_are_greedy(sampling):
    logits = random_logits()
    for seed in range(5):
        tokens = sample_logits(logits, jax.random.key(seed), temperature=1.5, **sampling)
        np.testing.assert_array_equal(tokens, jnp.argmax(logits, -1))


def test_top_k_restricts_support():
    logits_V = random_logits(1, 30, seed=1)[0] / 3.0  # gentle: every top-5 token is likely
    samples = draws(logits_V, 4000, temperature=1.0, top_k=5)
    top5 = set(np.argsort(-np.asarray(logits_V))[:5].tolist())
    assert set(samples.tolist()) == top5


def test_top_p_keeps_the_smallest_nucleus():
    logits_V = jnp.log(jnp.asarray([0.05, 0.5, 0.15, 0.3]))
    assert set(draws(logits_V, 4000, temperature=1.0, top_p=0.7).tolist()) == {1, 3}
    assert set(draws(logits_V, 4000, temperature=1.0, top_p=0.85).tolist()) == {1, 2, 3}
    assert set(draws(logits_V, 4000, temperature=1.0, top_p=1.0).tolist()) == {0, 1, 2, 3}


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_draws_follow_softmax(temperature):
    logits_V = jnp.asarray([1.0, 0.0, -0.5, 0.5, -1.0])
    n = 20000
    freq = np.bincount(draws(logits_V, n, seed=7, temperature=temperature), minlength=5) / n
    expected = np.asarray(jax.nn.softmax(logits_V / temperature))
    assert np.abs(freq - expected).max() < 0.015, (freq, expected)


def test_sampling_is_reproducible_from_the_seed():
    kwargs = dict(max_new_tokens=6, temperature=1.0, top_k=20, eos_id=None)
    one = generate(model("learned"), PROMPTS[:2], seed=11, **kwargs).tokens
    assert one == generate(model("learned"), PROMPTS[:2], seed=11, **kwargs).tokens
    assert one != generate(model("learned"), PROMPTS[:2], seed=12, **kwargs).tokens


# ---- refusals ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompts=[[7, 8], []]), "prompt 1 is empty"),
        (dict(prompts=[]), "prompts is empty"),
        (dict(prompts=[[7, 800]]), "outside"),
        (dict(max_len=10), "max_len=10 is smaller than"),
        (dict(max_new_tokens=36), "exceeds the learned position table"),
        (dict(max_new_tokens=0), "max_new_tokens must be at least 1"),
        (dict(temperature=-0.1), "temperature must be >= 0"),
        (dict(top_p=0.0), "top_p must lie in"),
        (dict(top_p=1.5), "top_p must lie in"),
        (dict(top_k=0), "top_k must be at least 1"),
    ],
)
def test_bad_requests_are_refused(kwargs, message):
    kwargs = {"prompts": [[7, 8, 9, 10, 11]], "max_new_tokens": 8, **kwargs}
    with pytest.raises(ConfigError, match=message):
        generate(model("learned"), kwargs.pop("prompts"), **kwargs)


def test_rope_models_may_generate_past_max_seq_len():
    result = generate(model("rope_gqa"), [[7, 8, 9]], max_new_tokens=TINY["max_seq_len"], eos_id=None)
    assert len(result.tokens[0]) == TINY["max_seq_len"]


def test_encoder_only_models_cannot_generate():
    bert = build_model(ModelConfig(**{**TINY, "family": "encoder_only"}))
    with pytest.raises(ConfigError, match="encoder_only models have no decoder to generate with"):
        generate(bert, [[7, 8]], max_new_tokens=3)


def test_sample_logits_refuses_bad_settings():
    with pytest.raises(ConfigError, match="top_k must be at least 1"):
        sample_logits(random_logits(), jax.random.key(0), temperature=1.0, top_k=0)


def test_validation_prompts_are_document_openings():
    import numpy as np

    from archlab.data.packing import PackedRows
    from archlab.samples import validation_prompts
    from archlab.tokens import SPECIAL

    eos = SPECIAL.eos
    # Row 0: document 1 (starts here: 10 11 12 eos), then document 2's first two tokens.
    # Row 1: document 2 continues (no start), then padding. Row 2: document 3 starts after a tail.
    tokens = np.array([[10, 11, 12, eos, 20, 21], [22, 23, eos, 0, 0, 0], [30, eos, 40, 41, 42, 43]])
    segment_ids = np.array([[1, 1, 1, 1, 2, 2], [1, 1, 1, 0, 0, 0], [1, 1, 2, 2, 2, 2]])
    positions = np.array([[0, 1, 2, 3, 0, 1], [2, 3, 4, 0, 0, 0], [5, 6, 0, 1, 2, 3]])
    rows = PackedRows(tokens, segment_ids, positions, n_bytes=0)
    # One opening per row; the end-of-document token is not part of a prompt; rows without a start skipped.
    assert validation_prompts(rows, 5, 8) == [[10, 11, 12], [40, 41, 42, 43]]
    assert validation_prompts(rows, 1, 2) == [[10, 11]]


# ---- prefix LM and barred ids -----------------------------------------------------------------


@pytest.mark.parametrize("name", [*VARIANTS])
def test_prefix_lm_generation_equals_the_uncached_model_with_the_prompt_as_prefix(name):
    """A prefix-LM model's cached generation (left-padded rows of different lengths) reads each prompt
    bidirectionally, exactly as ``model(..., prefix_BT=prompt)``; and that differs from causal reading."""
    result = generate(model(name), PROMPTS, max_new_tokens=NEW, eos_id=None, return_logits=True, prefix=True)
    rows = [prompt + row[:-1] for prompt, row in zip(PROMPTS, result.tokens)]
    tokens_BT, segments_BT = right_pad(rows)
    prefix_BT = jnp.asarray([[t < len(p) for t in range(tokens_BT.shape[1])] for p in PROMPTS])
    full_BTV = np.asarray(model(name)(tokens_BT, segment_ids_BT=segments_BT, prefix_BT=prefix_BT))
    expected = np.stack([full_BTV[b, len(p) - 1:len(p) - 1 + NEW] for b, p in enumerate(PROMPTS)])
    diff = np.abs(result.logits - expected).max()
    assert diff <= ATOL, f"{name}: cached prefix-LM logits differ from the uncached prefix-LM model by {diff:.2e}"
    causal = np.asarray(model(name)(tokens_BT, segment_ids_BT=segments_BT))
    causal = np.stack([causal[b, len(p) - 1:len(p) - 1 + NEW] for b, p in enumerate(PROMPTS)])
    assert np.abs(causal - expected).max() > 1e-2, "the prefix made no difference: the test would be vacuous"


def test_prefix_needs_a_decoder_only_model():
    with pytest.raises(ConfigError, match="prefix=True conditions a decoder_only"):
        generate(model("enc_dec"), PROMPTS, max_new_tokens=2, prefix=True)


@pytest.mark.parametrize("temperature", [0.0, 5.0])
def test_decoder_only_never_draws_special_ids_or_sentinels(temperature):
    """Bias the head toward [PAD], [MASK] and a sentinel: a decoder-only model still writes only text or EOS."""
    from flax import nnx

    net = build_model(ModelConfig(**{**TINY, "vocab_size": 160, "head_bias": True}), seed=1)
    graphdef, state = nnx.split(net)
    bias = np.zeros(160, np.float32)
    barred = [SPECIAL.pad, SPECIAL.cls, SPECIAL.mask, SPECIAL.bos, SPECIAL.sentinel_id(0, 160), SPECIAL.sentinel_id(7, 160)]
    bias[barred] = 50.0
    state["lm_head"]["bias"].value = jnp.asarray(bias)
    net = nnx.merge(graphdef, state)
    result = generate(net, PROMPTS, max_new_tokens=NEW, eos_id=None, temperature=temperature, return_logits=True)
    drawn = np.asarray([t for row in result.tokens for t in row])
    assert not SPECIAL.is_special(drawn, 160)[drawn != SPECIAL.eos].any(), drawn
    assert np.isin(result.logits.argmax(-1), barred).all(), "the bias did not make barred ids the model's choice"
    free = generate(net, PROMPTS, max_new_tokens=2, eos_id=None, suppress_special=False)
    assert all(t in barred for row in free.tokens for t in row)
