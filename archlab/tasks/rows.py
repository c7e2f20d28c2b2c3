"""Labelled examples as fixed-length token rows, one example per row, and what scoring needs to map back.

Every row holds ``tokens``, ``segment_ids`` (1 on real tokens, 0 on padding) and ``positions``, plus
``weights`` (1 for a real example, 0 for a filler row that pads the last validation batch) and the
task's targets:

- classification: ``labels [N]``; the text, then [EOS] (the decoder's last token sees the whole text);
  with ``task.pooling=cls`` a [CLS] first.
- tagging: ``tags [N, T]`` and ``tag_weights [N, T]``: each word's tag sits on its *last* sub-word
  token, the one whose state has read the whole word in every family (a causal state at the first
  sub-word would not have); words cut off by the row length are scored as ``O``.
- qa: question, [SEP], context; ``starts``/``ends [N]`` (the first answer's first and last context
  token) and ``context_mask [N, T]``. A training question whose answer lies past the row is dropped
  (counted); a validation question is kept and scored like any other.

Token-to-character offsets come from the tokenizer (``tokenizers``' ``Encoding.offsets``), so a
word, an answer and a predicted span are located in the text itself, not re-derived from ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from archlab.tokens import SPECIAL


@dataclass
class TaskRows:
    """Arrays of equal first dimension (the examples), shaped for ``data.pipeline.batch_dataset``."""

    arrays: dict[str, np.ndarray]
    n_bytes: int = 0  # UTF-8 bytes of the texts (for bytes per token)
    dropped: int = 0  # training questions whose answer lay past the row

    @property
    def n_rows(self) -> int:
        return int(self.arrays["tokens"].shape[0])

    def as_dict(self) -> dict[str, np.ndarray]:
        return self.arrays

    @property
    def n_tokens(self) -> int:
        return int(np.count_nonzero(self.arrays["segment_ids"]))

    def padded_to(self, multiple: int) -> "TaskRows":
        """The rows followed by weight-0 filler rows up to a multiple of ``multiple`` (whole batches)."""
        missing = -self.n_rows % multiple
        if not missing:
            return self
        filled = {k: np.concatenate([a, np.zeros((missing, *a.shape[1:]), a.dtype)]) for k, a in self.arrays.items()}
        return TaskRows(filled, self.n_bytes, self.dropped)


@dataclass
class Encoded:
    """What ``encode_*`` returns: the rows, and per example what scoring maps predictions back with."""

    rows: TaskRows
    word_token: list[list[int]] = field(default_factory=list)  # tagging: each word's scored token (-1: cut off)
    context_offsets: list[list[tuple[int, int]]] = field(default_factory=list)  # qa: (start, end) char per token
    context_start: list[int] = field(default_factory=list)  # qa: the row position of the first context token


def _row_arrays(ids: list[list[int]], length: int) -> dict[str, np.ndarray]:
    tokens = np.zeros((len(ids), length), np.int32)
    segment_ids = np.zeros((len(ids), length), np.int32)
    for i, row in enumerate(ids):
        tokens[i, :len(row)] = row
        segment_ids[i, :len(row)] = 1
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), tokens.shape).copy()
    return {"tokens": tokens, "segment_ids": segment_ids, "positions": positions,
            "weights": np.ones(len(ids), np.float32)}


def _n_bytes(texts) -> int:
    return sum(len(t.encode("utf-8")) for t in texts)


def encode_classification(backend, texts: list[str], labels: list[int], length: int, *, cls: bool) -> Encoded:
    """[CLS]? text [EOS], the text cut to fit ``length``."""
    room = length - 1 - int(cls)
    ids = [([SPECIAL.cls] if cls else []) + e.ids[:room] + [SPECIAL.eos]
           for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
    arrays = _row_arrays(ids, length)
    arrays["labels"] = np.asarray(labels, np.int32)
    return Encoded(TaskRows(arrays, _n_bytes(texts)))


def _word_spans(words: list[str]) -> tuple[str, np.ndarray]:
    """The words joined by single spaces, and the word index of every character (-1 for the spaces)."""
    text = " ".join(words)
    owner = np.full(len(text), -1, np.int64)
    start = 0
    for w, word in enumerate(words):
        owner[start:start + len(word)] = w
        start += len(word) + 1
    return text, owner


def encode_tagging(backend, sentences: list[list[str]], tags: list[list[str]], tag_names: tuple[str, ...],
                   length: int) -> Encoded:
    """Words joined by spaces; each word's tag on its last sub-word token."""
    tag_index = {name: i for i, name in enumerate(tag_names)}
    joined = [_word_spans(words) for words in sentences]
    encodings = backend.encode_batch([text for text, _ in joined], add_special_tokens=False)  # _fast has no offsets
    ids, word_token = [], []
    tag_rows = np.zeros((len(sentences), length), np.int32)
    weight_rows = np.zeros((len(sentences), length), np.float32)
    for i, (encoding, (_, owner), words) in enumerate(zip(encodings, joined, sentences)):
        row = encoding.ids[:length]
        last = [-1] * len(words)
        for t, (start, end) in enumerate(encoding.offsets[:length]):
            inside = owner[start:end]
            inside = inside[inside >= 0]
            if inside.size:  # a token that is only a space belongs to no word
                last[int(inside[-1])] = t
        for w, t in enumerate(last):
            if t >= 0:
                tag_rows[i, t] = tag_index[tags[i][w]]
                weight_rows[i, t] = 1.0
        ids.append(row)
        word_token.append(last)
    arrays = _row_arrays(ids, length)
    arrays.update(tags=tag_rows, tag_weights=weight_rows)
    return Encoded(TaskRows(arrays, _n_bytes(t for t, _ in joined)), word_token=word_token)


def _answer_tokens(offsets: list[tuple[int, int]], start: int, end: int) -> tuple[int, int] | None:
    """First and last context token overlapping characters ``start .. end`` (None: not in the row)."""
    covering = [t for t, (a, b) in enumerate(offsets) if a < end and b > start]
    return (covering[0], covering[-1]) if covering else None


def encode_qa(backend, examples, length: int, *, max_question_tokens: int, training: bool) -> Encoded:
    """question [SEP] context, cut to ``length``; a training question whose answer is cut off is dropped."""
    questions = backend.encode_batch_fast([e.question for e in examples], add_special_tokens=False)
    contexts = backend.encode_batch([e.context for e in examples], add_special_tokens=False)  # with offsets
    ids, offsets, first, spans, kept_texts = [], [], [], [], []
    dropped = 0
    for example, question, context in zip(examples, questions, contexts):
        head = question.ids[:max_question_tokens] + [SPECIAL.sep]
        room = max(0, length - len(head))
        context_offsets = [tuple(o) for o in context.offsets[:room]]
        answer = _answer_tokens(context_offsets, example.starts[0], example.starts[0] + len(example.answers[0]))
        if answer is None and training:
            dropped += 1
            continue
        ids.append(head + context.ids[:room])
        offsets.append(context_offsets)
        first.append(len(head))
        start, end = answer if answer is not None else (-len(head), -len(head))  # row position 0, weight 0
        spans.append((len(head) + start, len(head) + end))
        kept_texts.append(example.question + example.context)
    arrays = _row_arrays(ids, length)
    context_mask = np.zeros((len(ids), length), np.float32)
    for i, (start, row) in enumerate(zip(first, ids)):
        context_mask[i, start:len(row)] = 1.0
    # A validation answer past the row has no target position: no loss, but it is still scored (by text).
    arrays["weights"] = np.asarray([float(s >= first[i]) for i, (s, _) in enumerate(spans)], np.float32).reshape(-1)
    arrays.update(starts=np.asarray([s for s, _ in spans], np.int32).reshape(-1),
                  ends=np.asarray([e for _, e in spans], np.int32).reshape(-1), context_mask=context_mask)
    return Encoded(TaskRows(arrays, _n_bytes(kept_texts), dropped), context_offsets=offsets, context_start=first)
