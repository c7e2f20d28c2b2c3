"""Objectives: MLM / CLM / prefix-LM / T5 span corruption transforms, losses and the registry."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from archlab.errors import ConfigError, DataError, IncompatibleObjectiveError
from archlab.objectives import (
    check_compatible,
    compute_input_and_target_lengths,
    corrupt_spans,
    make_transform,
    mask_tokens,
    next_token_targets,
    random_spans_noise_mask,
    raw_row_length,
    split_prefix,
    weighted_accuracy,
    weighted_cross_entropy,
)
from archlab.tokens import SPECIAL

VOCAB = 1000


def packed_batch(seed: int, B: int = 16, T: int = 128, vocab_size: int = VOCAB) -> dict[str, np.ndarray]:
    """Rows of several documents (each [CLS] ... [SEP] with ordinary tokens) and trailing padding."""
    rng = np.random.default_rng(seed)
    tokens = np.zeros((B, T), np.int32)
    segs = np.zeros((B, T), np.int32)
    pos = np.zeros((B, T), np.int32)
    for b in range(B):
        t, seg = 0, 1
        fill = T - int(rng.integers(0, T // 4))  # leave some padding in most rows
        while t < fill:
            n = min(int(rng.integers(1, 40)), fill - t)
            doc = rng.integers(SPECIAL.n_reserved_low, SPECIAL.first_sentinel_id(vocab_size), size=n)
            doc[0] = SPECIAL.cls
            doc[-1] = SPECIAL.sep if n > 1 else doc[-1]
            tokens[b, t : t + n] = doc
            segs[b, t : t + n] = seg
            pos[b, t : t + n] = np.arange(n)
            t, seg = t + n, seg + 1
    return {"tokens": tokens, "segment_ids": segs, "positions": pos}


def documents(segment_ids_T: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) column ranges of the documents in one row."""
    out, t, T = [], 0, len(segment_ids_T)
    while t < T:
        if segment_ids_T[t] == 0:
            t += 1
            continue
        s = t
        while t < T and segment_ids_T[t] == segment_ids_T[s]:
            t += 1
        out.append((s, t))
    return out


# --------------------------------------------------------------------------- MLM


def test_mlm_selection_counts_and_split():
    chosen_total = eligible_total = n_mask = n_random = n_same = 0
    for seed in range(20):
        batch = packed_batch(seed)
        out = mask_tokens(batch, np.random.default_rng(seed), vocab_size=VOCAB)
        tokens, segs = batch["tokens"], batch["segment_ids"]
        chosen = out["weights"] == 1.0
        assert out["weights"].dtype == np.float32 and set(np.unique(out["weights"])) <= {0.0, 1.0}
        eligible = (segs != 0) & ~SPECIAL.is_special(tokens, VOCAB)
        assert not (chosen & ~eligible).any(), "a special or padding token was chosen"
        n_el = eligible.sum(1)
        expected = np.where(n_el > 0, np.maximum(np.rint(0.15 * n_el), 1), 0)
        np.testing.assert_array_equal(chosen.sum(1), expected)
        np.testing.assert_array_equal(out["targets"], tokens)
        np.testing.assert_array_equal(out["inputs"][~chosen], tokens[~chosen])
        np.testing.assert_array_equal(out["segment_ids"], segs)
        np.testing.assert_array_equal(out["positions"], batch["positions"])
        inp = out["inputs"][chosen]
        masked = inp == SPECIAL.mask
        same = inp == tokens[chosen]
        replaced = ~masked & ~same
        assert not SPECIAL.is_special(inp[replaced], VOCAB).any(), "random replacement was a special id"
        chosen_total += chosen.sum()
        eligible_total += eligible.sum()
        n_mask, n_random, n_same = n_mask + masked.sum(), n_random + replaced.sum(), n_same + same.sum()
    assert abs(chosen_total / eligible_total - 0.15) < 0.005
    assert abs(n_mask / chosen_total - 0.8) < 0.02
    # A random draw equal to the original counts as "same"; that is rare at this vocab size.
    assert abs(n_random / chosen_total - 0.1) < 0.015
    assert abs(n_same / chosen_total - 0.1) < 0.015


def test_mlm_prediction_positions_hold_every_chosen_position_first():
    for seed in range(5):
        batch = packed_batch(seed)
        out = mask_tokens(batch, np.random.default_rng(seed), vocab_size=VOCAB)
        positions_BK = out["prediction_positions"]
        assert positions_BK.dtype == np.int32 and positions_BK.shape == (16, round(0.15 * 128))
        for b in range(16):
            chosen_b = np.flatnonzero(out["weights"][b])
            n_chosen = len(chosen_b)
            np.testing.assert_array_equal(positions_BK[b, :n_chosen], chosen_b)  # in order, then the rest
            assert len(set(positions_BK[b].tolist())) == positions_BK.shape[1]  # no position twice
            assert (out["weights"][b, positions_BK[b, n_chosen:]] == 0).all()
    # Every row eligible: the most a row can choose is exactly K.
    full = {"tokens": np.full((2, 40), SPECIAL.n_reserved_low + 3, np.int32),
            "segment_ids": np.ones((2, 40), np.int32), "positions": np.tile(np.arange(40, dtype=np.int32), (2, 1))}
    out = mask_tokens(full, np.random.default_rng(0), vocab_size=VOCAB)
    assert out["prediction_positions"].shape == (2, 6) and (out["weights"].sum(1) == 6).all()


@pytest.mark.parametrize("head_chunk", [0, 16])
def test_mlm_loss_at_prediction_positions_equals_the_loss_over_every_position(head_chunk):
    """The head read at the K listed positions gives the loss and gradients of reading all T."""
    from flax import nnx

    from archlab.config import ModelConfig
    from archlab.nn.models import build_model
    from archlab.objectives.model_io import loss_and_metrics

    cfg = ModelConfig(family="encoder_only", d_model=32, n_layers=2, n_heads=4, d_ff=64, vocab_size=VOCAB,
                      max_seq_len=128, position="learned", norm_position="post", embedding_norm=True,
                      mlm_transform=True, head_bias=True, head_chunk=head_chunk)
    graphdef, params = nnx.split(build_model(cfg, seed=0))
    batch = {k: jnp.asarray(v) for k, v in mask_tokens(packed_batch(3, B=4), np.random.default_rng(3), vocab_size=VOCAB).items()}
    everywhere = {k: v for k, v in batch.items() if k != "prediction_positions"}

    def loss(params, batch):
        return loss_and_metrics(nnx.merge(graphdef, params), batch)

    (gathered, gathered_sums), gathered_grads = jax.value_and_grad(loss, has_aux=True)(params, batch)
    (full, full_sums), full_grads = jax.value_and_grad(loss, has_aux=True)(params, everywhere)
    np.testing.assert_allclose(gathered, full, rtol=1e-6)
    for key in ("weight_sum", "correct_sum"):
        assert float(gathered_sums[key]) == float(full_sums[key])
    for g, f in zip(jax.tree.leaves(gathered_grads), jax.tree.leaves(full_grads)):
        np.testing.assert_allclose(g, f, rtol=1e-4, atol=1e-6)


def test_mlm_deterministic_and_seed_dependent():
    batch = packed_batch(0)
    a = mask_tokens(batch, np.random.default_rng(7), vocab_size=VOCAB)
    b = mask_tokens(batch, np.random.default_rng(7), vocab_size=VOCAB)
    c = mask_tokens(batch, np.random.default_rng(8), vocab_size=VOCAB)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["weights"], c["weights"])


def test_mlm_bad_rates_and_vocab():
    batch = packed_batch(0)
    with pytest.raises(ConfigError):
        mask_tokens(batch, np.random.default_rng(0), vocab_size=VOCAB, mask_rate=0.0)
    with pytest.raises(ConfigError):
        mask_tokens(batch, np.random.default_rng(0), vocab_size=VOCAB, mask_token_fraction=0.95)
    with pytest.raises(ConfigError):
        mask_tokens(batch, np.random.default_rng(0), vocab_size=50)


# --------------------------------------------------------------------------- CLM


def test_clm_hand_built_row():
    tokens = np.array([[10, 11, 12, 20, 21, 0, 0], [30, 31, 32, 33, 34, 35, 36]], np.int32)
    segs = np.array([[1, 1, 1, 2, 2, 0, 0], [1, 1, 2, 2, 2, 3, 3]], np.int32)
    batch = {"tokens": tokens, "segment_ids": segs, "positions": np.zeros_like(tokens)}
    out = next_token_targets(batch)
    np.testing.assert_array_equal(out["targets"][0], [11, 12, 20, 21, 0, 0, 0])
    np.testing.assert_array_equal(out["weights"][0], [1, 1, 0, 1, 0, 0, 0])
    np.testing.assert_array_equal(out["weights"][1], [1, 0, 1, 1, 0, 1, 0])
    np.testing.assert_array_equal(out["inputs"], tokens)


def test_clm_weights_zero_at_boundaries():
    batch = packed_batch(3, B=32)
    out = next_token_targets(batch, np.random.default_rng(0))
    segs = batch["segment_ids"]
    np.testing.assert_array_equal(out["targets"][:, :-1], batch["tokens"][:, 1:])
    assert (out["weights"][:, -1] == 0).all()
    expected = (segs[:, :-1] == segs[:, 1:]) & (segs[:, :-1] != 0)
    np.testing.assert_array_equal(out["weights"][:, :-1], expected.astype(np.float32))
    assert (segs.max(1) >= 3).all() and (segs == 0).any(), "fixture should pack several documents and pad"


def test_packed_batch_checked():
    with pytest.raises(DataError):
        next_token_targets({"tokens": np.zeros((2, 4), np.int32)})


# --------------------------------------------------------------------------- prefix LM


def test_prefix_lm_consistency():
    fractions = []
    for seed in range(5):
        batch = packed_batch(seed)
        out = split_prefix(batch, np.random.default_rng(seed))
        clm = next_token_targets(batch)
        np.testing.assert_array_equal(out["targets"], clm["targets"])
        prefix, w = out["prefix_mask"], out["weights"]
        assert prefix.dtype == bool and not (prefix & (batch["segment_ids"] == 0)).any()
        assert not (w > clm["weights"]).any()
        for b in range(batch["tokens"].shape[0]):
            for s, e in documents(batch["segment_ids"][b]):
                L = e - s
                p = int(prefix[b, s:e].sum())
                assert prefix[b, s : s + p].all(), "prefix must be the leading tokens of the document"
                if L == 1:
                    assert p == 1 and w[b, s] == 0
                    continue
                assert 1 <= p <= L - 1
                expected = np.zeros(L, np.float32)
                expected[p - 1 : L - 1] = 1.0  # from the last prefix token on, predicting non-prefix
                np.testing.assert_array_equal(w[b, s:e], expected)
                if L >= 10:
                    fractions.append((p - 1) / (L - 2))
    # Uniform prefix length in [1, L - 1]: the normalised position averages one half.
    assert abs(np.mean(fractions) - 0.5) < 0.05


def test_prefix_lm_fraction_bounds_and_determinism():
    batch = packed_batch(1)
    out = split_prefix(batch, np.random.default_rng(0), min_prefix_fraction=0.5, max_prefix_fraction=0.5)
    for b in range(batch["tokens"].shape[0]):
        for s, e in documents(batch["segment_ids"][b]):
            L = e - s
            if L >= 2:  # both bounds at one half: p = ceil(L / 2), kept below L
                assert out["prefix_mask"][b, s:e].sum() == min(-(-L // 2), L - 1)
    a = split_prefix(batch, np.random.default_rng(5))
    c = split_prefix(batch, np.random.default_rng(6))
    np.testing.assert_array_equal(a["prefix_mask"], split_prefix(batch, np.random.default_rng(5))["prefix_mask"])
    assert not np.array_equal(a["prefix_mask"], c["prefix_mask"])
    with pytest.raises(ConfigError):
        split_prefix(batch, np.random.default_rng(0), min_prefix_fraction=0.8, max_prefix_fraction=0.2)


# --------------------------------------------------------------------------- span corruption


def t5_lengths_reference(inputs_length: int, density: float, mean_span: float) -> tuple[int, int]:
    """T5's random_spans_helper restated for the test (one sentinel per span, EOS on both sides)."""

    def lengths(n: int) -> tuple[int, int]:
        noise = int(round(n * density))
        spans = int(round(noise / mean_span))
        return n - noise + spans + 1, noise + spans + 1

    n = inputs_length - 1
    while lengths(n + 1)[0] <= inputs_length:
        n += 1
    targets = lengths(n)[1]
    if density == 0.5 and targets > inputs_length:
        n, targets = n - 1, targets - 1
    return n, targets


def test_span_lengths_match_t5():
    assert compute_input_and_target_lengths(512) == (568, 114)
    for inputs_length, density, mean_span in [(128, 0.15, 3.0), (256, 0.15, 3.0), (1024, 0.15, 3.0),
                                              (512, 0.5, 3.0), (512, 0.3, 8.0), (100, 0.15, 2.0)]:
        got = compute_input_and_target_lengths(inputs_length, density, mean_span)
        assert got == t5_lengths_reference(inputs_length, density, mean_span)
    assert raw_row_length("span_corruption", 512) == 568
    assert raw_row_length("clm", 512) == raw_row_length("mlm", 512) == raw_row_length("prefix_lm", 512) == 512


def spans_of(mask: np.ndarray) -> list[tuple[bool, int]]:
    """Run-length encoding: (is_noise, length) for each run."""
    change = np.flatnonzero(np.diff(mask.astype(np.int8))) + 1
    bounds = np.concatenate([[0], change, [len(mask)]])
    return [(bool(mask[s]), int(e - s)) for s, e in zip(bounds[:-1], bounds[1:])]


def test_noise_mask_statistics():
    rng = np.random.default_rng(0)
    noise_tokens = total_tokens = 0
    noise_span_lengths = []
    for _ in range(400):
        length = int(rng.integers(40, 600))
        mask = random_spans_noise_mask(length, 0.15, 3.0, rng)
        assert mask.shape == (length,) and mask.dtype == bool
        assert not mask[0], "spans start with non-noise"
        runs = spans_of(mask)
        # T5 rounds length * density in float32 (tf.round), so 190 * 0.15 gives 29, not 28.
        n_noise = int(np.rint(np.float32(length) * np.float32(0.15)))
        assert mask.sum() == n_noise
        assert sum(1 for noisy, _ in runs if noisy) == max(round(n_noise / 3.0), 1)
        noise_tokens += mask.sum()
        total_tokens += length
        noise_span_lengths += [n for noisy, n in runs if noisy]
    assert abs(noise_tokens / total_tokens - 0.15) < 0.005
    assert abs(np.mean(noise_span_lengths) - 3.0) < 0.15
    assert np.std(noise_span_lengths) > 1.0, "span lengths should be random, not all equal"


def test_noise_mask_tiny_lengths():
    rng = np.random.default_rng(0)
    assert random_spans_noise_mask(1, 0.15, 3.0, rng).tolist() == [False]
    assert random_spans_noise_mask(2, 0.15, 3.0, rng).tolist() == [False, True]


def reconstruct(encoder_row: np.ndarray, target_row: np.ndarray) -> list[int]:
    """Put each target span back in place of its sentinel; drop EOS and padding."""
    spans: dict[int, list[int]] = {}
    current = None
    for tok in target_row.tolist():
        if tok in (SPECIAL.eos, SPECIAL.pad):
            break
        if tok >= SPECIAL.first_sentinel_id(VOCAB):
            current = tok
            spans[current] = []
        else:
            spans[current].append(tok)
    out: list[int] = []
    for tok in encoder_row.tolist():
        if tok in (SPECIAL.eos, SPECIAL.pad):
            break
        out += spans[tok] if tok >= SPECIAL.first_sentinel_id(VOCAB) else [tok]
    return out


def raw_rows(seed: int, B: int, R: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(SPECIAL.n_reserved_low, SPECIAL.first_sentinel_id(VOCAB), size=(B, R)).astype(np.int32)


def test_corrupt_spans_shapes_and_reconstruction():
    raw = raw_rows(0, 8, 568)
    out = corrupt_spans(raw, np.random.default_rng(1), vocab_size=VOCAB, inputs_length=512)
    assert out["encoder_inputs"].shape == (8, 512) and out["decoder_targets"].shape == (8, 114)
    for k in ("encoder_segment_ids", "encoder_positions"):
        assert out[k].shape == (8, 512)
    for k in ("decoder_inputs", "decoder_segment_ids", "decoder_positions", "weights"):
        assert out[k].shape == (8, 114)
    # A full raw row fills both sides exactly, as in T5: no padding, EOS last.
    assert (out["weights"] == 1).all() and (out["encoder_segment_ids"] == 1).all()
    assert (out["encoder_inputs"][:, -1] == SPECIAL.eos).all() and (out["decoder_targets"][:, -1] == SPECIAL.eos).all()
    np.testing.assert_array_equal(out["encoder_positions"][0], np.arange(512))
    assert (out["decoder_targets"][:, 0] == SPECIAL.sentinel_id(0, VOCAB)).all()
    np.testing.assert_array_equal(out["decoder_inputs"][:, 1:], out["decoder_targets"][:, :-1])
    assert (out["decoder_inputs"][:, 0] == SPECIAL.pad).all()
    for b in range(8):
        assert reconstruct(out["encoder_inputs"][b], out["decoder_targets"][b]) == raw[b].tolist()
        sentinels = out["encoder_inputs"][b][out["encoder_inputs"][b] >= SPECIAL.first_sentinel_id(VOCAB)]
        np.testing.assert_array_equal(sentinels, [SPECIAL.sentinel_id(i, VOCAB) for i in range(28)])


def test_corrupt_spans_padded_rows():
    raw = raw_rows(2, 4, 141)
    segs = np.ones_like(raw)
    real_len = [141, 100, 1, 0]
    for b, n in enumerate(real_len):
        segs[b, n:] = 0
        raw[b, n:] = SPECIAL.pad
    out = corrupt_spans(raw, np.random.default_rng(0), vocab_size=VOCAB, inputs_length=128, segment_ids_BR=segs)
    assert out["encoder_inputs"].shape == (4, 128) and out["decoder_targets"].shape == (4, 29)
    for b, n in enumerate(real_len):
        enc, dec = out["encoder_inputs"][b], out["decoder_targets"][b]
        assert reconstruct(enc, dec) == raw[b, :n].tolist()
        n_enc, n_dec = int((enc != 0).sum()), int((dec != 0).sum())
        np.testing.assert_array_equal(out["encoder_segment_ids"][b], np.arange(128) < n_enc)
        np.testing.assert_array_equal(out["weights"][b], (np.arange(29) < n_dec).astype(np.float32))
        np.testing.assert_array_equal(out["decoder_positions"][b], np.where(np.arange(29) < n_dec, np.arange(29), 0))
        assert (out["decoder_inputs"][b][n_dec:] == SPECIAL.pad).all()
    assert out["weights"][3].sum() == 0 and out["encoder_segment_ids"][3].sum() == 0


def test_corrupt_spans_determinism():
    raw = raw_rows(0, 4, 568)
    a = corrupt_spans(raw, np.random.default_rng(3), vocab_size=VOCAB, inputs_length=512)
    b = corrupt_spans(raw, np.random.default_rng(3), vocab_size=VOCAB, inputs_length=512)
    c = corrupt_spans(raw, np.random.default_rng(4), vocab_size=VOCAB, inputs_length=512)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["encoder_inputs"], c["encoder_inputs"])


def test_corrupt_spans_config_errors():
    rng = np.random.default_rng(0)
    with pytest.raises(ConfigError):
        corrupt_spans(raw_rows(0, 2, 568) % 50, rng, vocab_size=50, inputs_length=512)
    with pytest.raises(ConfigError, match="sentinels"):
        corrupt_spans(raw_rows(0, 1, 8), rng, vocab_size=VOCAB, inputs_length=4096)
    with pytest.raises(ConfigError):
        corrupt_spans(raw_rows(0, 2, 569), rng, vocab_size=VOCAB, inputs_length=512)


# --------------------------------------------------------------------------- losses


def test_weighted_cross_entropy_and_accuracy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32) * 3
    targets = rng.integers(0, 7, size=(2, 5))
    weights = (rng.random((2, 5)) < 0.6).astype(np.float32)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
    loss_sum, weight_sum = weighted_cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights))
    np.testing.assert_allclose(loss_sum, (nll * weights).sum(), rtol=1e-5)
    assert float(weight_sum) == weights.sum()
    correct, w = weighted_accuracy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights))
    assert float(correct) == ((logits.argmax(-1) == targets) * weights).sum() and float(w) == weights.sum()


def test_cross_entropy_stable_and_float32():
    # 8192 is exact in bfloat16; a naive exp() would overflow long before it.
    logits = jnp.asarray([[[8192.0, 0.0, -8192.0], [jnp.inf, 0.0, 0.0]]], dtype=jnp.bfloat16)
    loss_sum, weight_sum = weighted_cross_entropy(logits, jnp.asarray([[1, 0]]), jnp.asarray([[1.0, 0.0]]))
    assert loss_sum.dtype == jnp.float32
    np.testing.assert_allclose(loss_sum, 8192.0, rtol=1e-6)
    assert float(weight_sum) == 1.0



def test_fused_cross_entropy_equals_the_reference_functions_with_gradient():
    from archlab.objectives.losses import cross_entropy_and_accuracy

    rng = np.random.default_rng(1)
    logits = rng.normal(size=(3, 6, 11)).astype(np.float32) * 2
    targets = rng.integers(0, 11, size=(3, 6))
    targets[0, :3] = logits[0, :3].argmax(-1)  # some correct predictions
    weights = (rng.random((3, 6)) < 0.7).astype(np.float32) * rng.uniform(0.5, 2.0, size=(3, 6)).astype(np.float32)
    logits, targets, weights = jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights)

    loss_sum, correct_sum, weight_sum = cross_entropy_and_accuracy(logits, targets, weights)
    ref_loss, ref_weight = weighted_cross_entropy(logits, targets, weights)
    ref_correct, _ = weighted_accuracy(logits, targets, weights)
    np.testing.assert_allclose(loss_sum, ref_loss, rtol=1e-6)
    assert float(correct_sum) == float(ref_correct) and float(weight_sum) == float(ref_weight)

    assert float(correct_sum) > 0
    fused_grad = jax.grad(lambda x: cross_entropy_and_accuracy(x, targets, weights)[0])(logits)
    ref_grad = jax.grad(lambda x: weighted_cross_entropy(x, targets, weights)[0])(logits)
    np.testing.assert_allclose(fused_grad, ref_grad, atol=1e-6)


def test_fused_accuracy_counts_every_target_tied_for_the_top_logit():
    from archlab.objectives.losses import cross_entropy_and_accuracy

    logits = jnp.asarray([[[3.0, 5.0, 5.0, 1.0], [3.0, 5.0, 5.0, 1.0], [3.0, 5.0, 5.0, 1.0]]])
    targets, weights = jnp.asarray([[1, 2, 0]]), jnp.ones((1, 3))
    assert float(cross_entropy_and_accuracy(logits, targets, weights)[1]) == 2.0
    assert float(weighted_accuracy(logits, targets, weights)[0]) == 1.0  # argmax: the first index only


def test_fused_cross_entropy_is_stable_and_ignores_weight_zero_rows():
    from archlab.objectives.losses import cross_entropy_and_accuracy

    logits = jnp.asarray([[[8192.0, 0.0, -8192.0], [jnp.inf, 0.0, 0.0]]], dtype=jnp.bfloat16)
    targets, weights = jnp.asarray([[1, 0]]), jnp.asarray([[1.0, 0.0]])
    loss_sum, correct_sum, weight_sum = cross_entropy_and_accuracy(logits, targets, weights)
    assert loss_sum.dtype == jnp.float32
    np.testing.assert_allclose(loss_sum, 8192.0, rtol=1e-6)
    assert float(correct_sum) == 0.0 and float(weight_sum) == 1.0
    grad = jax.grad(lambda x: cross_entropy_and_accuracy(x, targets, weights)[0])(logits)
    assert grad.dtype == jnp.bfloat16 and bool(jnp.isfinite(grad.astype(jnp.float32)).all())
    assert float(jnp.abs(grad[0, 1].astype(jnp.float32)).max()) == 0.0


@pytest.mark.parametrize("chunk", [1, 4, 16, 64])
@pytest.mark.parametrize("with_bias", [False, True])
def test_chunked_head_and_loss_equal_the_materialised_logits_with_gradients(chunk, with_bias):
    from archlab.objectives.losses import cross_entropy_and_accuracy, head_cross_entropy_and_accuracy

    rng = np.random.default_rng(2)
    rows, width, vocab = 19, 6, 13  # 19 rows: the last chunk is partial for every chunk size but 1
    features = jnp.asarray(rng.normal(size=(rows, width)), jnp.float32)
    table = jnp.asarray(rng.normal(size=(vocab, width)), jnp.float32)
    bias = jnp.asarray(rng.normal(size=(vocab,)), jnp.float32) if with_bias else None
    targets = jnp.asarray(rng.integers(0, vocab, size=rows))
    weights = jnp.asarray((rng.random(rows) < 0.7) * rng.uniform(0.5, 2.0, size=rows), jnp.float32)

    def reference(f, t, b):
        logits = f @ t.T + (0.0 if b is None else b)
        return cross_entropy_and_accuracy(logits, targets, weights)

    def chunked(f, t, b):
        return head_cross_entropy_and_accuracy(f, t, b, targets, weights, chunk=chunk)

    ref, out = reference(features, table, bias), chunked(features, table, bias)
    np.testing.assert_allclose(out[0], ref[0], rtol=1e-6)
    assert float(out[1]) == float(ref[1]) and float(out[2]) == float(ref[2])
    argnums = (0, 1, 2) if with_bias else (0, 1)
    ref_grads = jax.grad(lambda *a: reference(*a)[0] / 7.0, argnums)(features, table, bias)
    grads = jax.grad(lambda *a: chunked(*a)[0] / 7.0, argnums)(features, table, bias)
    for got, want in zip(grads, ref_grads):
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_chunked_head_and_loss_ignore_weight_zero_rows_and_keep_bfloat16_gradients():
    from archlab.objectives.losses import head_cross_entropy_and_accuracy

    features = jnp.asarray([[1.0, 2.0], [jnp.inf, 0.0], [0.5, -1.0]], jnp.bfloat16)
    table = jnp.asarray([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], jnp.bfloat16)
    targets, weights = jnp.asarray([2, 0, 1]), jnp.asarray([1.0, 0.0, 2.0])
    loss = lambda f, t: head_cross_entropy_and_accuracy(f, t, None, targets, weights, chunk=2)[0]
    assert bool(jnp.isfinite(loss(features, table)))  # the weight-0 row's logits are not finite
    features = features.at[1, 0].set(1e38)  # finite, so that the table's gradient (0 * row) is too
    grad_f, grad_t = jax.grad(loss, (0, 1))(features, table)
    assert grad_f.dtype == jnp.bfloat16 and grad_t.dtype == jnp.bfloat16
    assert float(jnp.abs(grad_f[1].astype(jnp.float32)).max()) == 0.0
    assert bool(jnp.isfinite(grad_t.astype(jnp.float32)).all())


# --------------------------------------------------------------------------- registry


@pytest.mark.parametrize(
    "family, objective",
    [("decoder_only", "mlm"), ("encoder_only", "clm"), ("decoder_only", "span_corruption"),
     ("encoder_decoder", "prefix_lm")],
)
def test_incompatible_pairings(family, objective):
    with pytest.raises(IncompatibleObjectiveError, match=f"objective '{objective}' trains"):
        check_compatible(family, objective)


def test_compatibility_messages():
    with pytest.raises(IncompatibleObjectiveError) as info:
        check_compatible("decoder_only", "mlm")
    assert str(info.value) == (
        "objective 'mlm' trains encoder_only models, not decoder_only (use objective=clm or prefix_lm)"
    )
    for objective, family in [("mlm", "encoder_only"), ("clm", "decoder_only"), ("prefix_lm", "decoder_only"),
                              ("span_corruption", "encoder_decoder")]:
        check_compatible(family, objective)
    with pytest.raises(ConfigError, match="mlm, clm, prefix_lm, span_corruption"):
        check_compatible("decoder_only", "ul2")
    with pytest.raises(ConfigError):
        check_compatible("rnn", "clm")


def test_make_transform_each_objective():
    for objective in ("mlm", "clm", "prefix_lm", "span_corruption"):
        R = raw_row_length(objective, 128)
        batch = packed_batch(0, B=4, T=R)
        out = make_transform(objective, vocab_size=VOCAB, seq_len=128)(batch, np.random.default_rng(0))
        if objective == "span_corruption":
            assert out["encoder_inputs"].shape == (4, 128) and out["decoder_targets"].shape == (4, 29)
        else:
            assert out["inputs"].shape == out["targets"].shape == out["weights"].shape == (4, 128)
        with pytest.raises(DataError):
            make_transform(objective, vocab_size=VOCAB, seq_len=128)(packed_batch(0, B=2, T=R + 1),
                                                                     np.random.default_rng(0))
    transform = make_transform("mlm", vocab_size=VOCAB, seq_len=64, mask_rate=0.3)
    out = transform(packed_batch(0, B=4, T=64), np.random.default_rng(0))
    assert out["weights"].sum() > 0


def test_make_transform_rejects_bad_options():
    with pytest.raises(ConfigError, match="does not take"):
        make_transform("clm", vocab_size=VOCAB, seq_len=64, mask_rate=0.2)
    with pytest.raises(ConfigError):
        make_transform("mlm", vocab_size=VOCAB, seq_len=64, mask_rate=2.0)
    with pytest.raises(ConfigError):
        make_transform("span_corruption", vocab_size=50, seq_len=64)
    with pytest.raises(ConfigError):
        make_transform("bert", vocab_size=VOCAB, seq_len=64)
