"""Tiny generated task files in the three standard formats, each learnable in a few dozen updates.

- classification (JSON lines): the label is the sentiment of the one sentiment word in a random sentence;
- tagging (CoNLL columns): chunk tags that follow from each word's class and its neighbours;
- qa (SQuAD v1.1): the answer is the number in the context, wherever it sits.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

POSITIVE = ("good", "great", "fine", "lovely", "superb", "happy", "nice")
NEGATIVE = ("bad", "awful", "poor", "sad", "dull", "ugly", "weak")
FILLER = ("the", "film", "was", "a", "story", "and", "really", "quite", "very", "plot")


def write_classification(path: Path, n: int = 400, seed: int = 0) -> Path:
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        label = i % 2
        words = [rng.choice(FILLER) for _ in range(6)]
        words.insert(rng.randrange(6), rng.choice(POSITIVE if label else NEGATIVE))
        lines.append(json.dumps({"text": " ".join(words), "label": "pos" if label else "neg"}))
    path.write_text("\n".join(lines) + "\n")
    return path


# word class -> (words, chunk tag when it starts a chunk, tag inside one)
_DET, _ADJ, _NOUN = ("the", "a", "this"), ("big", "red", "old", "small"), ("dog", "cat", "house", "car", "tree")
_VERB, _PREP = ("sees", "likes", "finds", "near"), ("in", "on", "under")


def _noun_phrase(rng: random.Random) -> list[tuple[str, str]]:
    words = [(rng.choice(_DET), "B-NP")]
    words += [(rng.choice(_ADJ), "I-NP") for _ in range(rng.randrange(3))]
    return words + [(rng.choice(_NOUN), "I-NP")]


def write_conll(path: Path, n: int = 300, seed: int = 0) -> Path:
    rng = random.Random(seed)
    lines = ["-DOCSTART- -X- O", ""]
    for _ in range(n):
        sentence = _noun_phrase(rng) + [(rng.choice(_VERB), "B-VP")] + _noun_phrase(rng)
        if rng.random() < 0.5:
            sentence += [(rng.choice(_PREP), "B-PP")] + _noun_phrase(rng)
        sentence.append((".", "O"))
        lines += [f"{word} X {tag}" for word, tag in sentence] + [""]
    path.write_text("\n".join(lines))
    return path


def write_squad(path: Path, n: int = 300, seed: int = 0) -> Path:
    rng = random.Random(seed)
    paragraphs = []
    for i in range(n):
        words = [rng.choice(FILLER) for _ in range(10)]
        number = str(rng.randrange(100, 1000))
        where = rng.randrange(len(words) + 1)
        before = " ".join(words[:where])
        context = " ".join([*words[:where], number, *words[where:]])
        start = len(before) + (1 if before else 0)
        paragraphs.append({"context": context, "qas": [{"id": f"q{i}", "question": "what is the number?",
                                                       "answers": [{"text": number, "answer_start": start}]}]})
    path.write_text(json.dumps({"version": "1.1", "data": [{"title": "numbers", "paragraphs": paragraphs}]}))
    return path
