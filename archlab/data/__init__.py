"""Corpora, the byte-level BPE tokenizer, packing and the grain input pipeline.

Typical use::

    corpus = prepare_corpus("shakespeare", vocab_size=8192, row_length=256)
    it = build_iterator(corpus.train, batch_size=8, seed=0)
    batch = next(it)  # {"tokens", "segment_ids", "positions"}: int32 [8, 256]
"""

from archlab.data.cache import cache_root, content_id
from archlab.data.corpus import Corpus, packed_split, prepare_corpus, unigram_entropy_nats
from archlab.data.packing import PackedRows, pack_documents, positions_from_segments, unpack_tokens
from archlab.data.pipeline import Batch, Transform, batch_at, batch_dataset, batch_rng, build_iterator
from archlab.data.sources import SHAKESPEARE_VALIDATION_PLAYS, SOURCES, load_documents, shakespeare_plays
from archlab.data.tokenizer import Tokenizer, load_or_train_tokenizer, train_tokenizer

__all__ = [
    "SHAKESPEARE_VALIDATION_PLAYS",
    "SOURCES",
    "Batch",
    "Corpus",
    "PackedRows",
    "Tokenizer",
    "Transform",
    "batch_at",
    "batch_dataset",
    "batch_rng",
    "build_iterator",
    "cache_root",
    "content_id",
    "load_documents",
    "load_or_train_tokenizer",
    "pack_documents",
    "packed_split",
    "positions_from_segments",
    "prepare_corpus",
    "shakespeare_plays",
    "train_tokenizer",
    "unigram_entropy_nats",
    "unpack_tokens",
]
