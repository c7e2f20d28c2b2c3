"""Task data readers and metrics (archlab/tasks): hand-worked values and every refusal."""

import json

import pytest

from archlab.errors import DataError
from archlab.tasks import metrics
from archlab.tasks.data import read_classification, read_conll, read_squad


def test_accuracy_and_macro_f1_equal_hand_computed_values():
    gold = ["pos", "pos", "pos", "neg", "neg", "neu"]
    predicted = ["pos", "pos", "neg", "neg", "pos", "neu"]
    assert metrics.accuracy(gold, predicted) == pytest.approx(4 / 6)
    # pos: P 2/3 R 2/3 F 2/3; neg: P 1/2 R 1/2 F 1/2; neu: F 1 -> mean 13/18
    assert metrics.macro_f1(gold, predicted) == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    # a label never predicted still counts (F1 0), which a plain accuracy hides
    assert metrics.macro_f1(["a", "a", "b"], ["a", "a", "a"]) == pytest.approx((0.8 + 0) / 2)


def test_chunk_f1_scores_whole_chunks_as_conlleval():
    gold = [["B-NP", "I-NP", "O", "B-VP"], ["B-PP", "B-NP", "I-NP", "I-NP"]]
    # NP cut short (wrong end), VP right, PP right, NP of sentence 2 right; one extra ADJP predicted
    predicted = [["B-NP", "O", "O", "B-VP"], ["B-PP", "B-NP", "I-NP", "I-NP"]]
    scores = metrics.chunk_scores(gold, predicted)
    assert scores == pytest.approx({"precision": 3 / 4, "recall": 3 / 4, "f1": 3 / 4})
    with_extra = metrics.chunk_scores([["O", "B-NP"]], [["B-ADJP", "B-NP"]])
    assert with_extra == pytest.approx({"precision": 1 / 2, "recall": 1.0, "f1": 2 / 3})
    # an I- tag after O starts a chunk, as conlleval reads IOB1
    assert metrics.chunk_scores([["O", "B-NP", "I-NP"]], [["O", "I-NP", "I-NP"]])["f1"] == 1.0
    with pytest.raises(ValueError, match="sentence 0: 2 gold tags but 1 predicted"):
        metrics.chunk_scores([["O", "O"]], [["O"]])


def test_squad_metrics_normalise_answers_as_the_official_script():
    assert metrics.normalize_answer("The  Cat, sat!") == "cat sat"
    assert metrics.exact_match("the Eiffel Tower.", ["Eiffel tower"]) == 1.0
    assert metrics.exact_match("Eiffel", ["Eiffel tower"]) == 0.0
    # "big cat" vs "cat sat": one common token, P = R = 1/2
    assert metrics.token_f1("the big cat", ["a cat sat"]) == pytest.approx(0.5)
    assert metrics.token_f1("the big cat", ["a cat sat", "big cat"]) == 1.0  # the best gold answer counts
    scores = metrics.squad_scores(["Denver Broncos", "1990"], [["Denver Broncos"], ["in 1991", "1991"]])
    assert scores == pytest.approx({"exact_match": 50.0, "f1": 50.0})


def test_classification_files_in_both_formats(tmp_path):
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": t, "label": lab}) for t, lab in
                                                [("good film", "pos"), ("dull", "neg"), ("fine", "pos")]) + "\n")
    (tmp_path / "a.csv").write_text("sentence,label\ngood film,1\ndull,0\nfine,1\n")
    jsonl = read_classification(tmp_path / "a.jsonl", cache_dir=tmp_path / "cache")
    assert jsonl.label_names == ("neg", "pos") and jsonl.labels == [1, 0, 1] and jsonl.texts[0] == "good film"
    csv = read_classification(tmp_path / "a.csv", text_field="sentence", cache_dir=tmp_path / "cache")
    assert csv.label_names == ("0", "1") and csv.labels == [1, 0, 1]
    with pytest.raises(DataError, match=r"a.jsonl row 2: label 'neg' is not one of pos, neutral"):
        read_classification(tmp_path / "a.jsonl", labels=["pos", "neutral"], cache_dir=tmp_path / "cache")
    with pytest.raises(DataError, match=r"has no 'text' field \(it has sentence, label\)"):
        read_classification(tmp_path / "a.csv", cache_dir=tmp_path / "cache")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": " ", "label": "pos"}) + "\n")
    with pytest.raises(DataError, match="row 1: the 'text' field is empty"):
        read_classification(tmp_path / "b.jsonl", cache_dir=tmp_path / "cache")
    with pytest.raises(DataError, match="no such file"):
        read_classification(tmp_path / "absent.csv")


def test_conll_columns_and_their_refusals(tmp_path):
    (tmp_path / "train.txt").write_text("-DOCSTART- -X- O\n\nConfidence NN B-NP\nin IN B-PP\n\nthe DT B-NP\n"
                                        "pound NN I-NP\n")
    tagged = read_conll(tmp_path / "train.txt")
    assert tagged.tokens == [["Confidence", "in"], ["the", "pound"]]
    assert tagged.tags == [["B-NP", "B-PP"], ["B-NP", "I-NP"]] and tagged.tag_names == ("B-NP", "B-PP", "I-NP")
    (tmp_path / "short.txt").write_text("Confidence NN B-NP\nin B-PP\n")
    with pytest.raises(DataError, match="short.txt line 2: 2 columns where the file's first token line has 3"):
        read_conll(tmp_path / "short.txt")
    (tmp_path / "bad_tag.txt").write_text("Confidence NN NP\n")
    with pytest.raises(DataError, match=r"line 1: tag 'NP' is not IOB \(O, B-<type>, I-<type>\)"):
        read_conll(tmp_path / "bad_tag.txt")


def test_squad_answers_are_checked_against_their_context(tmp_path):
    def write(answer_start: int) -> None:
        (tmp_path / "qa.json").write_text(json.dumps({"data": [{"title": "t", "paragraphs": [{
            "context": "The Broncos won Super Bowl 50.",
            "qas": [{"id": "q1", "question": "Who won?", "answers": [{"text": "Broncos", "answer_start": answer_start}]}],
        }]}]}))

    write(4)
    (example,) = read_squad(tmp_path / "qa.json")
    assert example.answers == ("Broncos",) and example.context[example.starts[0]:].startswith("Broncos")
    write(5)
    with pytest.raises(DataError, match="question q1: answer 'Broncos' at offset 5 is not in its context"):
        read_squad(tmp_path / "qa.json")
    write(400)
    with pytest.raises(DataError, match="at offset 400 is not in its context"):
        read_squad(tmp_path / "qa.json")
