"""Labelled data in the formats the field ships it in, checked before anything trains on it.

- Sentence classification: CSV with a header, or JSON lines, one ``text`` and one ``label`` per
  row (SST-2 / sentence-polarity style; the field names are arguments), read with ``datasets``.
- Token tagging: CoNLL columns, one token per line (``word ... tag``, the tag last), a blank line
  between sentences, ``-DOCSTART-`` lines skipped (CoNLL-2000 chunking, CoNLL-2003 NER).
- Extractive QA: SQuAD v1.1 JSON (``data`` -> ``paragraphs`` -> ``qas`` -> ``answers`` with
  ``text`` and ``answer_start``).

Each refusal is one line naming the file and the row, line or question: an unknown label (when
the label set is given), a missing field, a tag line with another number of columns than the
file's first, a tag outside the IOB scheme, an answer whose offset does not hold its text.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from archlab.errors import DataError

_IOB = re.compile(r"^(O|[BI]-\S+)$")


@dataclass(frozen=True)
class ClassificationSet:
    texts: list[str]
    labels: list[int]  # indices into label_names
    label_names: tuple[str, ...]


@dataclass(frozen=True)
class TaggingSet:
    tokens: list[list[str]]  # one list of words per sentence
    tags: list[list[str]]  # IOB tags, aligned with tokens

    @property
    def tag_names(self) -> tuple[str, ...]:
        return tuple(sorted({tag for sentence in self.tags for tag in sentence}))


@dataclass(frozen=True)
class QAExample:
    id: str
    question: str
    context: str
    answers: tuple[str, ...]
    starts: tuple[int, ...]  # character offsets of the answers in context


def _existing(path: str | os.PathLike) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    return path


def read_classification(
    path: str | os.PathLike, *, text_field: str = "text", label_field: str = "label",
    labels: tuple[str, ...] | list[str] | None = None, cache_dir: str | os.PathLike | None = None,
) -> ClassificationSet:
    """Rows of a ``.csv`` (with a header) or ``.jsonl`` / ``.json`` (JSON lines) file.

    ``labels`` fixes the label set and its order (a row with another label is refused); without it
    the labels are the sorted distinct values found.
    """
    path = _existing(path)
    kind = {".csv": "csv", ".tsv": "csv", ".jsonl": "json", ".json": "json"}.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: a classification file is .csv, .tsv or .jsonl, not {path.suffix or 'no suffix'}")
    import datasets

    datasets.disable_progress_bars()  # one small local file: a progress bar would only be noise
    options = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
    try:
        rows = datasets.load_dataset(kind, data_files=str(path), split="train", cache_dir=cache_dir, **options)
    except Exception as error:  # datasets raises its own error types for unreadable files
        raise DataError(f"{path} is not readable as {kind} ({' '.join(str(error).split())[:160]})") from None
    for name in (text_field, label_field):
        if name not in rows.column_names:
            raise DataError(f"{path} has no {name!r} field (it has {', '.join(rows.column_names)})")
    texts, raw_labels = rows[text_field], [str(v) if v is not None else None for v in rows[label_field]]
    names = tuple(labels) if labels is not None else tuple(sorted({v for v in raw_labels if v is not None}))
    index = {name: i for i, name in enumerate(names)}
    for row, (text, label) in enumerate(zip(texts, raw_labels), start=1):
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{path} row {row}: the {text_field!r} field is empty")
        if label not in index:
            raise DataError(f"{path} row {row}: label {label!r} is not one of {', '.join(names)}")
    if len(names) < 2:
        raise DataError(f"{path}: a classification set needs at least 2 labels, found {len(names)}")
    return ClassificationSet(list(texts), [index[v] for v in raw_labels], names)


def read_conll(path: str | os.PathLike) -> TaggingSet:
    """Sentences of a CoNLL column file; the tag is the last column and must be IOB (O, B-x, I-x)."""
    path = _existing(path)
    tokens: list[list[str]] = []
    tags: list[list[str]] = []
    words: list[str] = []
    labels: list[str] = []
    columns = None
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        fields = line.split()
        if not fields or fields[0] == "-DOCSTART-":
            if words:
                tokens.append(words)
                tags.append(labels)
                words, labels = [], []
            continue
        columns = columns or len(fields)
        if len(fields) != columns or len(fields) < 2:
            raise DataError(f"{path} line {number}: {len(fields)} columns where the file's first token line has "
                            f"{columns} (word ... tag)")
        if not _IOB.match(fields[-1]):
            raise DataError(f"{path} line {number}: tag {fields[-1]!r} is not IOB (O, B-<type>, I-<type>)")
        words.append(fields[0])
        labels.append(fields[-1])
    if words:
        tokens.append(words)
        tags.append(labels)
    if not tokens:
        raise DataError(f"{path} holds no tagged sentence")
    return TaggingSet(tokens, tags)


def read_squad(path: str | os.PathLike) -> list[QAExample]:
    """Questions of a SQuAD v1.1 file, each answer checked to sit at its offset in its context."""
    path = _existing(path)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        paragraphs = [(p["context"], p["qas"]) for article in document["data"] for p in article["paragraphs"]]
    except (ValueError, KeyError, TypeError) as error:
        raise DataError(f"{path} is not SQuAD JSON (data -> paragraphs -> context, qas): {error}") from None
    examples = []
    for context, questions in paragraphs:
        for qa in questions:
            qid = str(qa.get("id", "?"))
            answers = qa.get("answers") or []
            if not answers:
                raise DataError(f"{path} question {qid}: no answer")
            for answer in answers:
                text, start = answer.get("text"), answer.get("answer_start")
                if not isinstance(text, str) or not isinstance(start, int) or start < 0 \
                        or context[start:start + len(text)] != text:
                    raise DataError(f"{path} question {qid}: answer {text!r} at offset {start} is not in its context")
            examples.append(QAExample(qid, qa["question"], context, tuple(a["text"] for a in answers),
                                      tuple(a["answer_start"] for a in answers)))
    if not examples:
        raise DataError(f"{path} holds no question")
    return examples
