"""Byte-level BPE (GPT-2 style, via ``tokenizers``) with archlab's fixed special-token layout.

Layout (see :mod:`archlab.tokens`): [PAD] [CLS] [SEP] [MASK] [BOS] [EOS] at ids
0..5, then the 256 byte tokens and the learned merges, then the 100 sentinels
counting down from the top: ``<extra_id_i>`` has id ``vocab_size - 1 - i``.

No normaliser and a byte-level pre-tokenizer and decoder, so
``decode(encode(text)) == text`` for any string. Special-token text that
occurs in a document (a literal "[MASK]") is encoded as ordinary text: the
special ids only ever come from code, never from data.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from archlab.data.cache import atomic_write, cache_root, content_id, text_id
from archlab.errors import ConfigError, DataError
from archlab.tokens import N_SENTINELS, SPECIAL, SPECIAL_TOKEN_NAMES, sentinel_name

# Bump when training settings change, so old cache entries are not reused.
_RECIPE = "bytebpe1"
N_BYTES = 256
MIN_VOCAB_SIZE = len(SPECIAL_TOKEN_NAMES) + N_BYTES + N_SENTINELS

# The pre-tokenizer keeps a run of whitespace, letters, digits or punctuation in one pre-token,
# and the BPE trainer's merges take time quadratic in a pre-token's length (a line of random
# letters, 16 merges: 1 s at 200 KB, 39 s at 1 MB). Training text is therefore cut inside runs
# of whitespace or of non-whitespace longer than MAX_RUN characters; the pre-tokenizer's \s is
# Python's without \x1c-\x1f.
MAX_RUN = 4096
_SPACE, _NOT_SPACE = r"[^\S\x1c-\x1f]", r"[\S\x1c-\x1f]"
# the look-behinds let a search skip the inside of a short run instead of rescanning it
_LONG_RUN = re.compile(rf"(?<!{_SPACE}){_SPACE}{{{MAX_RUN + 1},}}|(?<!{_NOT_SPACE}){_NOT_SPACE}{{{MAX_RUN + 1},}}")


class Tokenizer:
    """A ``tokenizers.Tokenizer`` checked to follow archlab's special-token layout."""

    def __init__(self, backend: tokenizers.Tokenizer, source: str = "tokenizer"):
        check_layout(backend, source)
        # Not stored in tokenizer.json, so it is set on every construction.
        backend.encode_special_tokens = True
        self.backend = backend

    @property
    def vocab_size(self) -> int:
        """The real vocabulary size (may be below the size asked for on a small corpus)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @functools.cached_property
    def id(self) -> str:
        """Content hash of the serialised tokenizer; part of packed-corpus cache keys."""
        return text_id(self.backend.to_str())

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many texts in parallel (Rust threads)."""
        return [e.ids for e in self.backend.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int] | np.ndarray, *, skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; specials appear by name ("[EOS]") unless skipped."""
        ids = np.asarray(ids, dtype=np.int64).ravel().tolist()  # the Rust side takes Python ints only
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def token(self, token_id: int) -> str | None:
        """The vocabulary string of one id (byte-level form, e.g. "Ġthe")."""
        return self.backend.id_to_token(int(token_id))

    def save(self, path: str | os.PathLike) -> None:
        """Write ``tokenizer.json`` (readable by ``tokenizers`` and Hugging Face ``transformers``)."""
        path = Path(path)
        atomic_write(path, lambda tmp: self.backend.save(str(tmp)))

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Tokenizer:
        path = Path(path).expanduser()
        return cls(read_backend(path), source=str(path))

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, id={self.id})"


def read_backend(path: Path) -> tokenizers.Tokenizer:
    """The ``tokenizers.Tokenizer`` of a ``tokenizer.json``, whatever its layout; DataError if unreadable."""
    if not path.is_file():
        raise DataError(f"tokenizer file {path} does not exist")
    try:
        return tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises a bare Exception
        raise DataError(f"{path} is not a readable tokenizer.json: {e}") from e


def check_layout(backend: tokenizers.Tokenizer, source: str = "tokenizer") -> None:
    """Raise DataError unless specials sit at 0..5 and sentinel i at ``vocab_size - 1 - i``."""
    vocab_size = backend.get_vocab_size(with_added_tokens=True)
    expected = {name: i for i, name in enumerate(SPECIAL_TOKEN_NAMES)}
    expected.update({sentinel_name(i): vocab_size - 1 - i for i in range(N_SENTINELS)})
    for name, want in expected.items():
        got = backend.token_to_id(name)
        if got != want:
            raise DataError(
                f"{source} does not follow archlab's special-token layout: {name} should have id {want}, has {got}"
            )


def training_pieces(document: str) -> Iterator[str]:
    """``document`` in consecutive pieces, cut every MAX_RUN characters inside longer runs.

    A document without such a run comes back whole, so it trains exactly as it did before
    the cut existed.
    """
    start = 0
    for run in _LONG_RUN.finditer(document):
        for cut in range(run.start() + MAX_RUN, run.end(), MAX_RUN):
            yield document[start:cut]
            start = cut
    yield document[start:]


def train_tokenizer(documents: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE of (at most) ``vocab_size`` tokens on ``documents``.

    BPE learns ``vocab_size - 100`` tokens; the sentinels are then appended in
    reverse order so that sentinel 0 lands on the last id. A corpus too small for
    that many merges gives a smaller vocabulary with the same layout. Training
    sees :func:`training_pieces`; encoding still takes any text whole.
    """
    check_vocab_size(vocab_size)
    docs = [d for d in documents if d]
    if not docs:
        raise DataError("cannot train a tokenizer on an empty corpus")
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - N_SENTINELS,
        special_tokens=list(SPECIAL_TOKEN_NAMES),
        # every byte is in the vocabulary even if the corpus lacks it, so no text is ever unencodable
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator((piece for doc in docs for piece in training_pieces(doc)), trainer)
    backend.add_special_tokens([sentinel_name(i) for i in reversed(range(N_SENTINELS))])
    return Tokenizer(backend, source="the trained tokenizer")


def check_vocab_size(vocab_size: int) -> None:
    SPECIAL.check_vocab_has_sentinels(vocab_size)
    if vocab_size < MIN_VOCAB_SIZE:
        raise ConfigError(
            f"vocab_size {vocab_size} is too small for a byte-level BPE: {len(SPECIAL_TOKEN_NAMES)} specials, "
            f"{N_BYTES} byte tokens and {N_SENTINELS} sentinels need at least {MIN_VOCAB_SIZE}"
        )


def tokenizer_cache_path(corpus_id: str, vocab_size: int, cache_dir: str | os.PathLike | None = None) -> Path:
    return cache_root(cache_dir) / "tokenizers" / f"{_RECIPE}-{corpus_id}-v{vocab_size}.json"


def load_or_train_tokenizer(
    documents: Sequence[str],
    vocab_size: int,
    *,
    cache_dir: str | os.PathLike | None = None,
    corpus_id: str | None = None,
) -> Tokenizer:
    """The tokenizer for (corpus, vocab_size): read from the cache, or trained and cached.

    ``corpus_id`` defaults to :func:`archlab.data.cache.content_id` of ``documents``.
    """
    check_vocab_size(vocab_size)
    path = tokenizer_cache_path(corpus_id or content_id(documents), vocab_size, cache_dir)
    if path.is_file():
        return Tokenizer.from_file(path)
    tokenizer = train_tokenizer(documents, vocab_size)
    tokenizer.save(path)
    return tokenizer
