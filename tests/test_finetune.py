"""Fine-tuning runs (task=...): every family learns every task on tiny generated data, from a
pre-trained run through model.init_from, resumes bitwise, and maps predictions back to text exactly."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest

import task_files

FAMILIES = {"encoder_only": "mlm", "decoder_only": "clm", "encoder_decoder": "span_corruption"}
FILES = {"classification": task_files.write_classification, "tagging": task_files.write_conll,
         "qa": task_files.write_squad}
SUFFIX = {"classification": "jsonl", "tagging": "txt", "qa": "json"}
# metric, the level a model that learnt nothing stays far below (balanced labels: 0.5 accuracy; a
# random tagger or span finds almost no chunk or answer)
TARGET = {"classification": ("val/accuracy", 0.8), "tagging": ("val/chunk_f1", 0.7), "qa": ("val/exact_match", 50.0)}
# One family per task runs in the default suite; the other six pairs are marked slow.
IN_CI = {("encoder_only", "classification"), ("decoder_only", "tagging"), ("encoder_decoder", "qa")}


def task_overrides(tmp: Path, family: str, task: str, steps: int = 80) -> list[str]:
    path = FILES[task](tmp / f"{task}.{SUFFIX[task]}")
    return [f"model={family}", f"objective={FAMILIES[family]}", f"task={task}", f"task.train={path}",
            "run.batch_size=16", f"run.steps={steps}", f"run.eval_every={steps}", "optimizer.lr=3e-3",
            "optimizer.warmup_tokens=0"]


@pytest.mark.parametrize("family,task", [
    pytest.param(f, t, marks=() if (f, t) in IN_CI else pytest.mark.slow) for f in FAMILIES for t in FILES])
def test_fine_tuning_learns_the_task(tmp_path, train_run, family, task):
    summary = train_run(tmp_path / "run", *task_overrides(tmp_path, family, task))
    metric, level = TARGET[task]
    # The prior's loss (always predicting the training label or tag frequencies; for QA a uniform
    # guess over the context) is the loss of a model that learnt nothing from the text.
    assert summary["val/loss"] < 0.5 * summary["unigram_entropy_nats"], summary
    assert summary[metric] >= level, summary
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert summary["val/loss"] < first["train/loss"]


def test_init_from_fills_the_backbone_and_keeps_the_source_tokenizer(tmp_path, prepared_run, cache_dir):
    from conftest import compose_train

    from archlab.trainer import Trainer

    source = Trainer.restore(prepared_run)
    cfg = compose_train([*task_overrides(tmp_path, "decoder_only", "classification", steps=2),
                         f"model.init_from={prepared_run}"], cache_dir)
    trainer = Trainer(cfg)
    assert trainer.tokenizer.id == source.tokenizer.id
    backbone = jax.tree.leaves(trainer.state.params["backbone"])
    assert len(backbone) == len(jax.tree.leaves(source.state.params))
    for got, want in zip(backbone, jax.tree.leaves(source.state.params)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert trainer.evaluate()["val/loss"] > 0


def test_a_resumed_task_run_is_bitwise_the_uninterrupted_one(tmp_path, train_run):
    from archlab.trainer import Trainer

    overrides = [*task_overrides(tmp_path, "decoder_only", "classification", steps=6), "run.checkpoint_every=3",
                 "model.residual_dropout=0.1"]
    whole = train_run(tmp_path / "whole", *overrides)
    train_run(tmp_path / "cut", *overrides, "run.stop_at_step=3")
    resumed = train_run(tmp_path / "cut", *overrides)
    assert resumed["val/loss"] == whole["val/loss"]
    a, b = Trainer.restore(tmp_path / "whole"), Trainer.restore(tmp_path / "cut")
    for x, y in zip(jax.tree.leaves(a.state), jax.tree.leaves(b.state)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _tokenizer():
    from archlab.data.tokenizer import train_tokenizer

    return train_tokenizer(["the big dog sees a red cat", "what is the number ? 417 and 23"] * 50, 400)


def test_tags_sit_on_each_words_last_token_and_cut_off_words_score_as_O():
    from archlab.tasks.corpus import TaskCorpus
    from archlab.tasks.rows import encode_tagging
    from archlab.tasks.scoring import predicted_tags

    backend = _tokenizer().backend
    words = ["the", "bigdogsees", "cat"]
    names = ("B-NP", "I-NP", "O")
    encoded = encode_tagging(backend, [words], [["B-NP", "I-NP", "O"]], names, length=64)
    ids = backend.encode("the bigdogsees cat", add_special_tokens=False)
    last = encoded.word_token[0]
    # each word's scored token is the last one whose characters lie in it
    for w, (start, end) in enumerate([(0, 3), (4, 14), (15, 18)]):
        inside = [t for t, (a, b) in enumerate(ids.offsets) if b > start and a < end]
        assert last[w] == inside[-1]
    row = encoded.rows.arrays
    assert row["tag_weights"][0].sum() == 3 and list(row["tags"][0, last]) == [0, 1, 2]
    # a row too short for the last word: that word is predicted O whatever the model says
    short = encode_tagging(backend, [words], [["B-NP", "I-NP", "O"]], names, length=last[1] + 1)
    corpus = TaskCorpus(None, None, None, short, [["B-NP", "I-NP", "O"]], names, [], 0.0)
    assert predicted_tags(corpus, np.zeros((1, last[1] + 1), np.int64)) == [["B-NP", "B-NP", "O"]]


def test_answer_spans_map_to_context_characters_and_back():
    from archlab.tasks.corpus import TaskCorpus
    from archlab.tasks.data import QAExample
    from archlab.tasks.rows import encode_qa
    from archlab.tasks.scoring import predicted_answers

    backend = _tokenizer().backend
    context = "the big dog 417 sees a cat"
    example = QAExample("q", "what is the number ?", context, ("417",), (context.index("417"),))
    encoded = encode_qa(backend, [example], 64, max_question_tokens=32, training=True)
    arrays = encoded.rows.arrays
    start, end = int(arrays["starts"][0]), int(arrays["ends"][0])
    corpus = TaskCorpus(None, None, None, encoded, [("417",)], ("start", "end"), [context], 0.0)
    assert predicted_answers(corpus, np.array([[start, end]])) == ["417"]
    assert arrays["context_mask"][0, :encoded.context_start[0]].sum() == 0  # the question is never an answer
    # an answer cut off by the row: dropped from training, kept (with no loss weight) for scoring
    first = encoded.context_start[0]
    assert encode_qa(backend, [example], first + 2, max_question_tokens=32, training=True).rows.n_rows == 0
    kept = encode_qa(backend, [example], first + 2, max_question_tokens=32, training=False)
    assert kept.rows.n_rows == 1 and kept.rows.arrays["weights"][0] == 0
