"""From a source name to a tokenizer and packed train/validation rows, cached on disk.

Cache layout under the archlab cache root (see :mod:`archlab.data.cache`)::

    tokenizers/<recipe>-<train text id>-v<vocab size>.json
    corpora/<split text id>-<tokenizer id>-L<row length>.npz

so a second run with the same corpus, vocabulary and row length reads two
files instead of training and tokenizing.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from archlab.data.cache import cache_root, content_id
from archlab.data.packing import PackedRows, pack_documents
from archlab.data.sources import check_options, load_documents
from archlab.data.tokenizer import Tokenizer, load_or_train_tokenizer
from archlab.errors import DataError

_PACKING_VERSION = "p1"


@dataclass(frozen=True)
class Corpus:
    """A tokenizer and the packed splits it produced, with the statistics a run logs."""

    tokenizer: Tokenizer
    train: PackedRows
    validation: PackedRows
    train_id: str
    """Content id of the train documents (the tokenizer's cache key)."""
    unigram_entropy_nats: float
    """Entropy of the train split's unigram token distribution (nats/token): the loss of a
    model that has learned only token frequencies, a "did it learn anything" baseline."""

    @property
    def unigram_entropy_bits(self) -> float:
        return self.unigram_entropy_nats / math.log(2)

    @property
    def bytes_per_token_train(self) -> float:
        return self.train.bytes_per_token

    @property
    def bytes_per_token_validation(self) -> float:
        return self.validation.bytes_per_token

    @property
    def n_tokens(self) -> int:
        """Real tokens in the train split (the data budget of one epoch)."""
        return self.train.n_tokens


def prepare_corpus(
    source_kind: str = "shakespeare",
    source_options: Mapping[str, Any] | None = None,
    *,
    vocab_size: int = 8192,
    row_length: int = 256,
    cache_dir: str | os.PathLike | None = None,
    tokenizer_file: str | os.PathLike | None = None,
) -> Corpus:
    """Load both splits, get the tokenizer (given file, cache, or trained on train), pack, cache.

    With ``tokenizer_file`` the file's own vocabulary is used and ``vocab_size``
    is ignored. A streamed ``hf`` source is read in full here, so give it ``max_documents``.
    """
    if row_length < 2:
        raise DataError(f"row length must be at least 2 tokens, got {row_length}")
    options = dict(source_options or {})
    check_options(source_kind, options)
    train_docs = _nonempty(load_documents(source_kind, "train", **options), source_kind, "train")
    validation_docs = _nonempty(load_documents(source_kind, "validation", **options), source_kind, "validation")
    train_id = content_id(train_docs)

    if tokenizer_file is not None:
        tokenizer = Tokenizer.from_file(tokenizer_file)
    else:
        tokenizer = load_or_train_tokenizer(train_docs, vocab_size, cache_dir=cache_dir, corpus_id=train_id)

    train = packed_split(train_docs, tokenizer, row_length, cache_dir=cache_dir, split_id=train_id)
    validation = packed_split(validation_docs, tokenizer, row_length, cache_dir=cache_dir)
    return Corpus(
        tokenizer=tokenizer,
        train=train,
        validation=validation,
        train_id=train_id,
        unigram_entropy_nats=unigram_entropy_nats(train, tokenizer.vocab_size),
    )


def packed_split(
    documents: Sequence[str],
    tokenizer: Tokenizer,
    row_length: int,
    *,
    cache_dir: str | os.PathLike | None = None,
    split_id: str | None = None,
) -> PackedRows:
    """Tokenize and pack ``documents``, or read the result cached for (text, tokenizer, row length)."""
    split_id = split_id or content_id(documents)
    path = corpus_cache_path(split_id, tokenizer.id, row_length, cache_dir)
    if path.is_file():
        return PackedRows.load(path)
    n_bytes = sum(len(d.encode("utf-8")) for d in documents)
    rows = pack_documents(tokenizer.encode_batch(documents), row_length, n_bytes=n_bytes)
    rows.save(path)
    return rows


def corpus_cache_path(
    split_id: str, tokenizer_id: str, row_length: int, cache_dir: str | os.PathLike | None = None
) -> Path:
    return cache_root(cache_dir) / "corpora" / f"{_PACKING_VERSION}-{split_id}-{tokenizer_id}-L{row_length}.npz"


def unigram_entropy_nats(rows: PackedRows, vocab_size: int) -> float:
    """Entropy (nats/token) of the token frequencies of ``rows``, padding excluded."""
    counts = np.bincount(rows.tokens[rows.segment_ids > 0], minlength=vocab_size)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def _nonempty(documents: Any, kind: str, split: str) -> list[str]:
    docs = [d for d in documents if d]
    if not docs:
        raise DataError(f"the {kind} corpus has no documents in its {split} split")
    return docs
