"""Greedy packing of tokenized documents into fixed-length rows.

Every document gets an [EOS] appended; the documents are concatenated in order
into one stream that is cut into rows of ``row_length`` tokens. Only the last
row is padded (with [PAD], segment id 0).

- ``segment_ids``: 1, 2, ... for the documents within a row, 0 on padding. A
  document cut by a row boundary continues in the next row as that row's segment 1.
- ``positions``: restart at 0 at each new segment, including a continuation at
  the start of a row. Attention never crosses rows, so a continuation is a new
  sequence for the model, and positions follow from segment ids alone
  (:func:`positions_from_segments`), whatever masking or cropping comes later.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from archlab.data.cache import atomic_write
from archlab.errors import DataError
from archlab.tokens import SPECIAL


@dataclass(frozen=True)
class PackedRows:
    """Packed int32 arrays ``[n_rows, row_length]`` plus the byte count of the source text."""

    tokens: np.ndarray
    segment_ids: np.ndarray
    positions: np.ndarray
    n_bytes: int
    """UTF-8 bytes of the documents that were packed (for bits per byte)."""

    @property
    def n_rows(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def row_length(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def n_tokens(self) -> int:
        """Real (non-padding) tokens, the appended [EOS] tokens included."""
        return int(np.count_nonzero(self.segment_ids))

    @property
    def bytes_per_token(self) -> float:
        """UTF-8 bytes per real token: bits/byte = (nats/token) / ln 2 / bytes_per_token.

        The [EOS] tokens count, since a causal LM is scored on predicting them too.
        """
        return self.n_bytes / max(self.n_tokens, 1)

    def as_dict(self) -> dict[str, np.ndarray]:
        return {"tokens": self.tokens, "segment_ids": self.segment_ids, "positions": self.positions}

    def save(self, path: str | os.PathLike) -> None:
        """Write an .npz (atomically: runs may share a cache)."""
        atomic_write(Path(path), lambda tmp: np.savez(tmp, n_bytes=np.int64(self.n_bytes), **self.as_dict()))

    @classmethod
    def load(cls, path: str | os.PathLike) -> PackedRows:
        with np.load(path, allow_pickle=False) as f:
            return cls(
                tokens=f["tokens"],
                segment_ids=f["segment_ids"],
                positions=f["positions"],
                n_bytes=int(f["n_bytes"]),
            )


def pack_documents(
    token_ids: Sequence[Sequence[int] | np.ndarray],
    row_length: int,
    *,
    n_bytes: int = 0,
    eos_id: int = SPECIAL.eos,
    pad_id: int = SPECIAL.pad,
) -> PackedRows:
    """Pack tokenized documents (without [EOS]) into rows; see the module docstring for the layout.

    ``n_bytes`` is the UTF-8 size of the source text, kept for bits per byte.
    """
    if row_length < 2:
        raise DataError(f"row length must be at least 2 tokens, got {row_length}")
    lengths_D = np.fromiter((len(d) for d in token_ids), dtype=np.int64, count=len(token_ids))
    if lengths_D.sum() == 0:
        raise DataError("nothing to pack: the documents hold no tokens")
    flat = np.fromiter(itertools.chain.from_iterable(token_ids), dtype=np.int32, count=int(lengths_D.sum()))
    stream_S = np.insert(flat, np.cumsum(lengths_D), np.int32(eos_id))
    doc_S = np.repeat(np.arange(len(lengths_D)), lengths_D + 1)

    n_rows = -(-stream_S.size // row_length)
    n_pad = n_rows * row_length - stream_S.size
    tokens_RL = np.concatenate([stream_S, np.full(n_pad, pad_id, np.int32)]).reshape(n_rows, row_length)
    doc_RL = np.concatenate([doc_S, np.full(n_pad, -1)]).reshape(n_rows, row_length)
    # documents are consecutive, so numbering them from the row's first document gives 1, 2, ...
    segment_ids_RL = np.where(doc_RL >= 0, doc_RL - doc_RL[:, :1] + 1, 0).astype(np.int32)
    return PackedRows(
        tokens=tokens_RL,
        segment_ids=segment_ids_RL,
        positions=positions_from_segments(segment_ids_RL),
        n_bytes=int(n_bytes),
    )


def positions_from_segments(segment_ids_BT: np.ndarray) -> np.ndarray:
    """Position of each token within its segment (0 at a segment's first token; 0 on padding).

    A segment is a run of equal non-zero ids along the last axis.
    """
    segment_ids_BT = np.asarray(segment_ids_BT)
    t_T = np.arange(segment_ids_BT.shape[-1])
    starts_BT = np.ones(segment_ids_BT.shape, dtype=bool)
    starts_BT[..., 1:] = segment_ids_BT[..., 1:] != segment_ids_BT[..., :-1]
    start_index_BT = np.maximum.accumulate(np.where(starts_BT, t_T, 0), axis=-1)
    return np.where(segment_ids_BT > 0, t_T - start_index_BT, 0).astype(np.int32)


def unpack_tokens(rows: PackedRows) -> np.ndarray:
    """The packed stream without padding (the inverse of packing, [EOS] tokens kept)."""
    return rows.tokens[rows.segment_ids > 0]
