"""A task's validation predictions mapped back to labels, tag sequences or answer text, and scored
with the field's metrics (``tasks/metrics.py``)."""

from __future__ import annotations

import numpy as np

from archlab.tasks import metrics
from archlab.tasks.corpus import TaskCorpus


def predicted_tags(corpus: TaskCorpus, predictions_NT: np.ndarray) -> list[list[str]]:
    """Each word's tag, read at its scored token; a word cut off by the row length is ``O``."""
    names = corpus.output_names
    return [[names[int(predictions_NT[i, t])] if t >= 0 else "O" for t in word_token]
            for i, word_token in enumerate(corpus.validation_encoded.word_token)]


def predicted_answers(corpus: TaskCorpus, spans_N2: np.ndarray) -> list[str]:
    """The context text between the predicted start token's first and end token's last character."""
    encoded, answers = corpus.validation_encoded, []
    for i, (start, end) in enumerate(spans_N2):
        offsets, first = encoded.context_offsets[i], encoded.context_start[i]
        s, e = int(start) - first, int(end) - first
        if not (0 <= s <= e < len(offsets)):  # only a model with no context tokens in its row gets here
            answers.append("")
            continue
        # A byte-level token carries the space before its word: the answer text is trimmed.
        answers.append(corpus.validation_contexts[i][offsets[s][0]:offsets[e][1]].strip())
    return answers


def task_metrics(corpus: TaskCorpus, predictions: np.ndarray, prefix: str = "val") -> dict[str, float]:
    """Accuracy and macro-F1; chunk precision, recall and F1 (CoNLL); or SQuAD exact match and F1."""
    predictions = predictions[:len(corpus.gold)]
    name = corpus.task.name
    if name == "classification":
        labels = list(range(corpus.n_outputs))
        scores = {"accuracy": metrics.accuracy(corpus.gold, predictions.tolist()),
                  "macro_f1": metrics.macro_f1(corpus.gold, predictions.tolist(), labels=labels)}
    elif name == "tagging":
        tags = predicted_tags(corpus, predictions)
        chunks = metrics.chunk_scores(corpus.gold, tags)
        correct = sum(g == p for gold, pred in zip(corpus.gold, tags) for g, p in zip(gold, pred))
        scores = {"chunk_f1": chunks["f1"], "chunk_precision": chunks["precision"], "chunk_recall": chunks["recall"],
                  "tag_accuracy": correct / sum(len(g) for g in corpus.gold)}
    else:
        scores = metrics.squad_scores(predicted_answers(corpus, predictions), corpus.gold)
    return {f"{prefix}/{k}": float(v) for k, v in scores.items()}
