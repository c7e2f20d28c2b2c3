"""Task metrics as the field computes them.

- Classification: accuracy and macro-F1 (scikit-learn's ``f1_score(average="macro")``: the
  unweighted mean of each label's F1, so a rare label counts as much as a common one).
- Tagging: chunk-level precision, recall and F1 as CoNLL's ``conlleval`` scores them
  (``seqeval``'s default mode: a chunk is right only if its type and both ends are).
- Extractive QA: SQuAD v1.1's exact match and token F1 after its answer normalisation
  (lower case, no punctuation, no articles a/an/the, single spaces), the best over the gold answers.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence


def accuracy(gold: Sequence, predicted: Sequence) -> float:
    _same_length(gold, predicted)
    return sum(g == p for g, p in zip(gold, predicted)) / len(gold)


def macro_f1(gold: Sequence, predicted: Sequence, labels: Sequence | None = None) -> float:
    """Mean F1 over ``labels`` (default: every label that occurs in ``gold`` or ``predicted``)."""
    from sklearn.metrics import f1_score

    _same_length(gold, predicted)
    return float(f1_score(list(gold), list(predicted), labels=None if labels is None else list(labels),
                          average="macro", zero_division=0))


def chunk_scores(gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]]) -> dict[str, float]:
    """``precision``, ``recall`` and ``f1`` over chunks of IOB tag sequences (one per sentence)."""
    from seqeval.metrics import f1_score, precision_score, recall_score

    _same_length(gold, predicted)
    for i, (g, p) in enumerate(zip(gold, predicted)):
        if len(g) != len(p):
            raise ValueError(f"sentence {i}: {len(g)} gold tags but {len(p)} predicted")
    gold, predicted = [list(s) for s in gold], [list(s) for s in predicted]
    return {"precision": float(precision_score(gold, predicted, zero_division=0)),
            "recall": float(recall_score(gold, predicted, zero_division=0)),
            "f1": float(f1_score(gold, predicted, zero_division=0))}


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD v1.1's normalisation: lower case, punctuation and articles removed, whitespace collapsed."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(predicted: str, answers: Sequence[str]) -> float:
    return float(max(normalize_answer(predicted) == normalize_answer(a) for a in answers))


def token_f1(predicted: str, answers: Sequence[str]) -> float:
    """The best token-overlap F1 of ``predicted`` against any gold answer."""
    def one(gold: str) -> float:
        predicted_tokens, gold_tokens = normalize_answer(predicted).split(), normalize_answer(gold).split()
        common = sum((Counter(predicted_tokens) & Counter(gold_tokens)).values())
        if not predicted_tokens or not gold_tokens:
            return float(predicted_tokens == gold_tokens)
        if common == 0:
            return 0.0
        precision, recall = common / len(predicted_tokens), common / len(gold_tokens)
        return 2 * precision * recall / (precision + recall)

    return max(one(a) for a in answers)


def squad_scores(predicted: Sequence[str], answers: Sequence[Sequence[str]]) -> dict[str, float]:
    """Mean ``exact_match`` and ``f1`` in percent, as SQuAD's evaluation script reports them."""
    _same_length(answers, predicted)
    n = len(predicted)
    return {"exact_match": 100 * sum(exact_match(p, a) for p, a in zip(predicted, answers)) / n,
            "f1": 100 * sum(token_f1(p, a) for p, a in zip(predicted, answers)) / n}


def _same_length(gold: Sequence, predicted: Sequence) -> None:
    if len(gold) != len(predicted):
        raise ValueError(f"{len(gold)} gold items but {len(predicted)} predicted")
    if not gold:
        raise ValueError("nothing to score")
