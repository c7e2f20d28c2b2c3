"""Causal (next-token) language modelling targets for packed batches.

A packed batch is a dict of int32 arrays shaped [B, T]: ``tokens``, ``segment_ids``
(1, 2, 3, ... per document within a row, 0 on padding) and ``positions`` (offset within
its document). Every objective in this package reads batches through ``read_packed_batch``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from archlab.errors import DataError
from archlab.tokens import SPECIAL

PACKED_KEYS: tuple[str, ...] = ("tokens", "segment_ids", "positions")


def read_packed_batch(batch: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (tokens_BT, segment_ids_BT, positions_BT) as int32 copies, checking keys and shapes."""
    missing = [k for k in PACKED_KEYS if k not in batch]
    if missing:
        raise DataError(f"packed batch is missing {missing}; expected keys {list(PACKED_KEYS)}")
    tokens_BT, segment_ids_BT, positions_BT = (np.array(batch[k], dtype=np.int32) for k in PACKED_KEYS)
    if tokens_BT.ndim != 2 or segment_ids_BT.shape != tokens_BT.shape or positions_BT.shape != tokens_BT.shape:
        raise DataError(
            "packed batch arrays must all be [B, T]; got "
            + ", ".join(f"{k}{tuple(np.shape(batch[k]))}" for k in PACKED_KEYS)
        )
    return tokens_BT, segment_ids_BT, positions_BT


def next_token_targets(
    batch: Mapping[str, np.ndarray], rng: np.random.Generator | None = None
) -> dict[str, np.ndarray]:
    """GPT-style targets: position t predicts token t+1 within the same document.

    ``weights`` is 1.0 only where t and t+1 share a nonzero segment, so no loss crosses a
    document boundary or touches padding; the last column (no successor) has weight 0 and
    target [PAD]. ``rng`` is accepted (and unused) so every transform has one signature.
    """
    del rng
    tokens_BT, segment_ids_BT, positions_BT = read_packed_batch(batch)
    targets_BT = np.full_like(tokens_BT, SPECIAL.pad)
    targets_BT[:, :-1] = tokens_BT[:, 1:]
    same_doc_BT = np.zeros(tokens_BT.shape, dtype=bool)
    same_doc_BT[:, :-1] = (segment_ids_BT[:, 1:] == segment_ids_BT[:, :-1]) & (segment_ids_BT[:, :-1] != 0)
    return {
        "inputs": tokens_BT,
        "targets": targets_BT,
        "weights": same_doc_BT.astype(np.float32),
        "segment_ids": segment_ids_BT,
        "positions": positions_BT,
    }
