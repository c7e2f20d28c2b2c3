"""A task run's data: the labelled files read and checked, split, tokenized into rows (``tasks/rows.py``)."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from archlab.errors import DataError
from archlab.schema import TaskConfig
from archlab.tasks import data as task_data
from archlab.tasks.rows import Encoded, encode_classification, encode_qa, encode_tagging


@dataclass
class TaskCorpus:
    """What the Trainer reads of a task: the tokenizer, training and validation rows, the gold answers."""

    task: TaskConfig
    tokenizer: object  # archlab.data.Tokenizer
    train: object  # TaskRows
    validation_encoded: Encoded
    gold: list  # per validation example: a label index, a tag list, or the answers
    output_names: tuple[str, ...]  # labels or tags (qa: the two ends)
    validation_contexts: list[str]  # qa: the context strings the predicted offsets index
    prior_entropy_nats: float  # the loss of always predicting the training prior: the chance baseline

    @property
    def validation(self):
        return self.validation_encoded.rows

    @property
    def n_outputs(self) -> int:
        return len(self.output_names)

    # What the training loop records for a pre-training corpus, in a task's terms.
    @property
    def unigram_entropy_nats(self) -> float:
        return self.prior_entropy_nats

    @property
    def bytes_per_token_validation(self) -> float:
        rows = self.validation
        return rows.n_bytes / max(rows.n_tokens, 1)


def _split(n: int, task: TaskConfig) -> tuple[np.ndarray, np.ndarray]:
    """(training, held-out) example indices: ``validation_fraction`` drawn with ``split_seed``."""
    order = np.random.default_rng(task.split_seed).permutation(n)
    held = max(1, round(task.validation_fraction * n))
    if held >= n:
        raise DataError(f"{task.train} has {n} examples: too few to hold out {task.validation_fraction:.0%} "
                        "for validation (give task.validation=<file>)")
    return np.sort(order[held:]), np.sort(order[:held])


def _entropy(counts: Counter) -> float:
    total = sum(counts.values())
    return -sum(c / total * math.log(c / total) for c in counts.values() if c)


def _examples(task: TaskConfig, cache_dir: str | None):
    """(training examples, validation examples, output names) in the task's own types, checked."""
    if task.name == "classification":
        options = dict(text_field=task.text_field, label_field=task.label_field, cache_dir=cache_dir)
        train = task_data.read_classification(task.train, labels=task.labels, **options)
        if task.validation is not None:
            validation = task_data.read_classification(task.validation, labels=train.label_names, **options)
            pairs = list(zip(train.texts, train.labels)), list(zip(validation.texts, validation.labels))
        else:
            everything = list(zip(train.texts, train.labels))
            kept, held = _split(len(everything), task)
            pairs = [everything[i] for i in kept], [everything[i] for i in held]
        return pairs[0], pairs[1], train.label_names
    if task.name == "tagging":
        train = task_data.read_conll(task.train)
        everything = list(zip(train.tokens, train.tags))
        if task.validation is not None:
            validation = task_data.read_conll(task.validation)
            train_pairs, validation_pairs = everything, list(zip(validation.tokens, validation.tags))
        else:
            kept, held = _split(len(everything), task)
            train_pairs, validation_pairs = [everything[i] for i in kept], [everything[i] for i in held]
        # Every tag either split uses has a head output: a rare one (CoNLL-2000's I-PRT) may be missing from a
        # training split and still be scored, as conlleval scores it.
        names = tuple(sorted({t for _, tags in train_pairs + validation_pairs for t in tags}))
        return train_pairs, validation_pairs, names
    train = task_data.read_squad(task.train)
    if task.validation is not None:
        return train, task_data.read_squad(task.validation), ("start", "end")
    kept, held = _split(len(train), task)
    return [train[i] for i in kept], [train[i] for i in held], ("start", "end")


def training_texts(task: TaskConfig, cache_dir: str | None = None) -> list[str]:
    """The training split's texts, for a tokenizer trained on the task itself (no model.init_from)."""
    train, _, _ = _examples(task, cache_dir)
    if task.name == "classification":
        return [text for text, _ in train]
    if task.name == "tagging":
        return [" ".join(words) for words, _ in train]
    return [e.question + "\n" + e.context for e in train]


def build_task_corpus(task: TaskConfig, *, length: int, vocab_size: int, tokenizer_file: str | Path | None,
                      cache_dir: str | None = None) -> TaskCorpus:
    """Read, check, split and tokenize ``task``'s files into rows of ``length`` tokens."""
    from archlab.data import Tokenizer
    from archlab.data.tokenizer import train_tokenizer

    train, validation, names = _examples(task, cache_dir)
    if not train:
        raise DataError(f"{task.train}: no training example is left")
    if tokenizer_file is not None:
        tokenizer = Tokenizer.from_file(tokenizer_file)
    else:
        tokenizer = train_tokenizer(training_texts(task, cache_dir), vocab_size)
    backend = tokenizer.backend
    contexts: list[str] = []
    if task.name == "classification":
        cls = task.pooling == "cls"
        train_rows = encode_classification(backend, [t for t, _ in train], [y for _, y in train], length, cls=cls).rows
        encoded = encode_classification(backend, [t for t, _ in validation], [y for _, y in validation], length, cls=cls)
        gold: list = [y for _, y in validation]
        prior = Counter(y for _, y in train)
    elif task.name == "tagging":
        train_rows = encode_tagging(backend, [w for w, _ in train], [t for _, t in train], names, length).rows
        encoded = encode_tagging(backend, [w for w, _ in validation], [t for _, t in validation], names, length)
        gold = [tags for _, tags in validation]
        prior = Counter(t for _, tags in train for t in tags)
    else:
        train_rows = encode_qa(backend, train, length, max_question_tokens=task.max_question_tokens, training=True).rows
        if train_rows.n_rows == 0:
            raise DataError(f"{task.train}: every answer lies past the {length}-token row (data.seq_len)")
        encoded = encode_qa(backend, validation, length, max_question_tokens=task.max_question_tokens, training=False)
        gold = [e.answers for e in validation]
        contexts = [e.context for e in validation]
        # Start and end each uniform over a row's context tokens: the loss of knowing nothing.
        mean_context = float(train_rows.arrays["context_mask"].sum(axis=1).mean())
        return TaskCorpus(task, tokenizer, train_rows, encoded, gold, names, contexts, math.log(max(mean_context, 1.0)))
    return TaskCorpus(task, tokenizer, train_rows, encoded, gold, names, contexts, _entropy(prior))
