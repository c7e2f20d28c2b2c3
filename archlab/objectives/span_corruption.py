"""T5 span corruption (Raffel et al. 2020, section 3.1.4), following ``t5/data/preprocessors.py``.

Lengths: for an encoder length ``inputs_length`` (512), ``compute_input_and_target_lengths``
gives T5's ``tokens_length`` (568), the number of RAW tokens a row must hold, and the
decoder length ``targets_length`` (114). Noise is drawn over the raw tokens themselves, as
T5 does after ``split_tokens(max_tokens_per_segment=tokens_length)``; EOS is appended to
both sides afterwards, and both computed lengths already count that EOS. So a full raw row
of 568 tokens becomes exactly 483 kept tokens + 28 sentinels + EOS = 512 encoder tokens and
28 sentinels + 85 noise tokens + EOS = 114 decoder tokens, with no padding.
"""

from __future__ import annotations

import functools

import numpy as np

from archlab.errors import ConfigError
from archlab.tokens import SPECIAL


def _check_noise(noise_density: float, mean_noise_span_length: float) -> None:
    if not 0.0 < noise_density < 1.0:
        raise ConfigError(f"noise_density must be in (0, 1), got {noise_density}")
    if not mean_noise_span_length > 0:
        raise ConfigError(f"mean_noise_span_length must be > 0, got {mean_noise_span_length}")


def _lengths_from_tokens_length(
    tokens_length: int, noise_density: float, mean_noise_span_length: float
) -> tuple[int, int]:
    # T5's random_spans_helper inner function with one sentinel per span on each side;
    # Python's round() (half to even) as in T5.
    num_noise_tokens = int(round(tokens_length * noise_density))
    num_nonnoise_tokens = tokens_length - num_noise_tokens
    num_noise_spans = int(round(num_noise_tokens / mean_noise_span_length))
    return num_nonnoise_tokens + num_noise_spans + 1, num_noise_tokens + num_noise_spans + 1


def compute_input_and_target_lengths(
    inputs_length: int, noise_density: float = 0.15, mean_noise_span_length: float = 3.0
) -> tuple[int, int]:
    """T5's ``random_spans_helper``: (raw tokens per row, decoder targets length incl. EOS).

    The raw length is the largest one whose corrupted inputs (plus EOS) fit in
    ``inputs_length``; (568, 114) for 512 at the defaults.
    """
    _check_noise(noise_density, mean_noise_span_length)
    if inputs_length < 2:
        raise ConfigError(f"span corruption needs inputs_length >= 2, got {inputs_length}")
    tokens_length = inputs_length - 1
    while _lengths_from_tokens_length(tokens_length + 1, noise_density, mean_noise_span_length)[0] <= inputs_length:
        tokens_length += 1
    _, targets_length = _lengths_from_tokens_length(tokens_length, noise_density, mean_noise_span_length)
    # T5's tweak: at density 0.5, shave one raw token so targets match the (round) inputs length.
    if noise_density == 0.5 and targets_length > inputs_length:
        tokens_length -= 1
        targets_length -= 1
    return tokens_length, targets_length


def _noise_counts(length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
    """(num_noise_tokens, num_noise_spans) exactly as T5's random_spans_noise_mask computes them."""
    length = max(length, 2)  # T5 raises the length to 2 to avoid degenerate masks
    # tf.round on float32 rounds half to even; mirror the float32 arithmetic too.
    num_noise_tokens = int(np.rint(np.float32(length) * np.float32(noise_density)))
    num_noise_tokens = min(max(num_noise_tokens, 1), length - 1)
    num_noise_spans = int(np.rint(np.float32(num_noise_tokens) / np.float32(mean_noise_span_length)))
    num_noise_spans = max(num_noise_spans, 1)
    # T5's segmentation assumes num_segments <= num_items; only settings with
    # density / mean_span > 1 - density (T5 misbehaves there) reach this clamp.
    num_noise_spans = min(num_noise_spans, num_noise_tokens, length - num_noise_tokens)
    return num_noise_tokens, num_noise_spans


def _random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
    """Lengths of a uniformly random split of ``num_items`` into ``num_segments`` non-empty runs."""
    # As T5: shuffle an indicator marking num_segments - 1 of the num_items - 1 gaps as cuts.
    cuts = rng.permutation(np.arange(num_items - 1) < num_segments - 1)
    segment_id = np.cumsum(np.concatenate([[False], cuts]))
    return np.bincount(segment_id, minlength=num_segments)


def random_spans_noise_mask(
    length: int, noise_density: float, mean_noise_span_length: float, rng: np.random.Generator
) -> np.ndarray:
    """T5's noise mask: bool[length], True on noise, alternating spans starting with non-noise.

    num_noise_tokens = round(length * density) clipped to [1, length - 1]; num_noise_spans =
    round(num_noise_tokens / mean_span), at least 1; noise and non-noise counts are each
    split uniformly at random into that many non-empty spans.
    """
    _check_noise(noise_density, mean_noise_span_length)
    orig_length = length
    length = max(length, 2)
    num_noise_tokens, num_noise_spans = _noise_counts(length, noise_density, mean_noise_span_length)
    noise_lengths_S = _random_segmentation(num_noise_tokens, num_noise_spans, rng)
    nonnoise_lengths_S = _random_segmentation(length - num_noise_tokens, num_noise_spans, rng)
    interleaved_lengths = np.stack([nonnoise_lengths_S, noise_lengths_S], axis=1).reshape(-1)
    is_noise = np.repeat(np.tile([False, True], num_noise_spans), interleaved_lengths)
    return is_noise[:orig_length]


@functools.lru_cache(maxsize=64)
def span_corruption_lengths(
    inputs_length: int, noise_density: float = 0.15, mean_noise_span_length: float = 3.0
) -> tuple[int, int]:
    """``compute_input_and_target_lengths``, after checking every row length up to the raw length fits.

    T5's helper rounds in float64 and allows zero spans, while its mask rounds in float32 and
    forces at least one span; for a few lengths (tiny ones, 172, 316, 352, ... at the defaults)
    a row would overflow the computed lengths. Those, and settings needing more than 100
    sentinels in a row, raise ConfigError instead of being silently truncated.
    """
    tokens_length, targets_length = compute_input_and_target_lengths(
        inputs_length, noise_density, mean_noise_span_length
    )
    for n in range(1, tokens_length + 1):
        num_noise, num_spans = _noise_counts(n, noise_density, mean_noise_span_length)
        if num_spans > SPECIAL.n_sentinels:
            raise ConfigError(
                f"span corruption of {n} raw tokens makes {num_spans} noise spans but only "
                f"{SPECIAL.n_sentinels} sentinels exist; lower inputs_length ({inputs_length}) or "
                "noise_density, or raise mean_noise_span_length"
            )
        # A 1-token row keeps its token (the mask is cut back to length 1): "tok EOS" / "<X0> EOS".
        encoder_len, decoder_len = (2, 2) if n == 1 else (n - num_noise + num_spans + 1, num_noise + num_spans + 1)
        if encoder_len > inputs_length or decoder_len > targets_length:
            raise ConfigError(
                f"inputs_length={inputs_length} is one of the lengths where T5's length helper and noise "
                f"mask disagree ({n} raw tokens would need {encoder_len} inputs / {decoder_len} targets, "
                f"more than {inputs_length} / {targets_length}); pick a nearby inputs_length"
            )
    return tokens_length, targets_length


def _spans_to_sentinels(tokens_R: np.ndarray, drop_R: np.ndarray, vocab_size: int) -> np.ndarray:
    """T5's noise_span_to_unique_sentinel: each run of ``drop_R`` becomes one sentinel, numbered in order."""
    prev_R = np.concatenate([[False], drop_R[:-1]])
    first_R = drop_R & ~prev_R
    span_index_R = np.cumsum(first_R) - 1
    replaced_R = np.where(first_R, vocab_size - 1 - span_index_R, tokens_R)
    return replaced_R[~(drop_R & prev_R)]


def corrupt_spans(
    batch_tokens_BR: np.ndarray,
    rng: np.random.Generator,
    *,
    vocab_size: int,
    inputs_length: int,
    noise_density: float = 0.15,
    mean_noise_span_length: float = 3.0,
    segment_ids_BR: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Corrupt raw rows T5-style into fixed-shape encoder and decoder arrays.

    ``batch_tokens_BR`` holds at most R = tokens_length raw tokens per row (568 for
    inputs_length 512; see ``span_corruption_lengths``, which also raises ConfigError for
    settings that cannot fit or need more than 100 sentinels). Tokens whose
    ``segment_ids_BR`` is 0 are padding and are dropped first; the noise mask is drawn over
    each row's remaining n tokens, as T5 does for a short final chunk. Segment boundaries are
    otherwise ignored: T5 corrupts concatenated documents. An all-padding row yields an
    all-padding example (weight 0).

    Outputs: ``encoder_inputs`` [B, inputs_length] (kept tokens, one sentinel per noise span,
    EOS), ``decoder_targets`` [B, targets_length] (``<X0> span0 <X1> span1 ... EOS``),
    ``decoder_inputs`` (targets shifted right, starting with [PAD], T5's decoder start id),
    ``weights`` (float32, 1.0 on real targets), ``encoder_/decoder_segment_ids`` (1 on real
    tokens, 0 on padding) and ``encoder_/decoder_positions`` (0.. on real tokens, 0 on
    padding). Padding is [PAD] = 0.
    """
    SPECIAL.check_vocab_has_sentinels(vocab_size)
    tokens_length, targets_length = span_corruption_lengths(inputs_length, noise_density, mean_noise_span_length)
    tokens_BR = np.asarray(batch_tokens_BR)
    if tokens_BR.ndim != 2 or tokens_BR.shape[1] > tokens_length:
        raise ConfigError(
            f"span corruption with inputs_length={inputs_length} takes raw rows [B, <= {tokens_length}], "
            f"got {tuple(tokens_BR.shape)}"
        )
    real_BR = np.ones(tokens_BR.shape, bool) if segment_ids_BR is None else np.asarray(segment_ids_BR) != 0
    B = tokens_BR.shape[0]

    encoder_inputs_BI = np.full((B, inputs_length), SPECIAL.pad, np.int32)
    decoder_targets_BL = np.full((B, targets_length), SPECIAL.pad, np.int32)
    encoder_len_B = np.zeros(B, np.int64)
    decoder_len_B = np.zeros(B, np.int64)
    for b in range(B):
        raw_R = tokens_BR[b][real_BR[b]]
        if raw_R.size == 0:
            continue
        noise_R = random_spans_noise_mask(raw_R.size, noise_density, mean_noise_span_length, rng)
        enc = np.append(_spans_to_sentinels(raw_R, noise_R, vocab_size), SPECIAL.eos)
        dec = np.append(_spans_to_sentinels(raw_R, ~noise_R, vocab_size), SPECIAL.eos)
        # span_corruption_lengths checked every row length up to tokens_length.
        assert enc.size <= inputs_length and dec.size <= targets_length, (enc.size, dec.size)
        encoder_inputs_BI[b, : enc.size] = enc
        decoder_targets_BL[b, : dec.size] = dec
        encoder_len_B[b], decoder_len_B[b] = enc.size, dec.size

    encoder_real_BI = np.arange(inputs_length)[None, :] < encoder_len_B[:, None]
    decoder_real_BL = np.arange(targets_length)[None, :] < decoder_len_B[:, None]
    decoder_inputs_BL = np.full_like(decoder_targets_BL, SPECIAL.pad)
    decoder_inputs_BL[:, 1:] = decoder_targets_BL[:, :-1]
    decoder_inputs_BL = np.where(decoder_real_BL, decoder_inputs_BL, SPECIAL.pad).astype(np.int32)
    return {
        "encoder_inputs": encoder_inputs_BI,
        "decoder_inputs": decoder_inputs_BL,
        "decoder_targets": decoder_targets_BL,
        "weights": decoder_real_BL.astype(np.float32),
        "encoder_segment_ids": encoder_real_BI.astype(np.int32),
        "decoder_segment_ids": decoder_real_BL.astype(np.int32),
        "encoder_positions": np.where(encoder_real_BI, np.arange(inputs_length), 0).astype(np.int32),
        "decoder_positions": np.where(decoder_real_BL, np.arange(targets_length), 0).astype(np.int32),
    }
