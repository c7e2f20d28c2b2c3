"""Prefix language modelling (T5 / UniLM): a bidirectional prefix, then causal continuation."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from archlab.errors import ConfigError
from archlab.objectives.clm import next_token_targets


def split_prefix(
    batch: Mapping[str, np.ndarray],
    rng: np.random.Generator,
    *,
    min_prefix_fraction: float = 0.0,
    max_prefix_fraction: float = 1.0,
) -> dict[str, np.ndarray]:
    """Next-token targets plus a per-document prefix the model may attend to bidirectionally.

    Convention: each document (a maximal run of one nonzero segment id in a row) of length
    L gets a prefix length p drawn uniformly from the integers in
    [max(1, ceil(min_prefix_fraction * L)), min(L - 1, floor(max_prefix_fraction * L))],
    clamped into [1, max(L - 1, 1)] so there is always a prefix token and, when L >= 2, at
    least one token to predict. With the defaults this is T5's ``random_prefix_noise_mask``
    (p uniform in [1, L - 1]). ``prefix_mask`` is True on the first p tokens of each
    document. ``targets[:, t] = tokens[:, t + 1]`` as in CLM, and ``weights`` is 1.0 only
    where the target is a non-prefix token of the same document, i.e. the predicting
    position is the last prefix token or later. Offsets are counted from the first token of
    each segment in the row, not taken from ``positions``.
    """
    if not 0.0 <= min_prefix_fraction <= max_prefix_fraction <= 1.0:
        raise ConfigError(
            f"need 0 <= min_prefix_fraction <= max_prefix_fraction <= 1, "
            f"got {min_prefix_fraction} and {max_prefix_fraction}"
        )
    out = next_token_targets(batch)
    segment_ids_BT = out["segment_ids"]
    B, T = segment_ids_BT.shape

    real_BT = segment_ids_BT != 0
    if not real_BT.any():
        out["prefix_mask"] = real_BT
        return out
    starts_BT = real_BT.copy()
    starts_BT[:, 1:] &= segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]
    # Every row's first real token is a start, so a running count over the flattened batch
    # numbers the documents 0..D-1 without mixing rows. Padding borrows document 0's index
    # and is masked out by real_BT.
    doc_BT = np.where(real_BT, np.cumsum(starts_BT.ravel()).reshape(B, T) - 1, 0)
    start_col_D = np.flatnonzero(starts_BT.ravel()) % T
    length_D = np.bincount(doc_BT[real_BT], minlength=len(start_col_D))

    top_D = np.maximum(length_D - 1, 1)
    lo_D = np.clip(np.ceil(min_prefix_fraction * length_D), 1, top_D).astype(np.int64)
    hi_D = np.clip(np.floor(max_prefix_fraction * length_D), lo_D, top_D).astype(np.int64)
    prefix_len_D = rng.integers(lo_D, hi_D + 1)

    offset_BT = np.arange(T)[None, :] - start_col_D[doc_BT]
    prefix_mask_BT = real_BT & (offset_BT < prefix_len_D[doc_BT])

    target_in_prefix_BT = np.zeros((B, T), dtype=bool)
    target_in_prefix_BT[:, :-1] = prefix_mask_BT[:, 1:]
    out["weights"] = np.where(target_in_prefix_BT, 0.0, out["weights"]).astype(np.float32)
    out["prefix_mask"] = prefix_mask_BT
    return out
