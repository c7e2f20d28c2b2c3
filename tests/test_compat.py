"""Checkpoints written before the run-assembly redesign (one of each family, committed under
``tests/fixtures/runs_v0``, with the ``eval.json`` the code of that time wrote) restore and
evaluate to the same numbers, and sample the same continuations, with today's code."""

import json
import shutil
from pathlib import Path

import pytest

from archlab.schema import EvalConfig, LoggerConfig

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "runs_v0"


@pytest.mark.parametrize("family", ["decoder_only", "encoder_only", "encoder_decoder"])
def test_a_checkpoint_written_before_the_redesign_evaluates_to_the_same_numbers(family, tmp_path, monkeypatch,
                                                                               cache_dir):
    from archlab.evaluate import evaluate

    monkeypatch.setenv("ARCHLAB_CACHE", str(cache_dir))
    run_dir = tmp_path / family
    shutil.copytree(FIXTURES / family, run_dir)
    expected = json.loads((run_dir / "eval.json").read_text())["3"]
    (run_dir / "eval.json").unlink()
    # What the fixture's eval.json was written by: batches=2 samples=1 max_new_tokens=8, and the fixed
    # first prompt of that time (today's default prompts are validation openings).
    prompts = [s["prompt"] for s in expected.get("samples", [])]
    (result,) = evaluate(EvalConfig(checkpoint=str(run_dir), batches=2, samples=len(prompts), max_new_tokens=8,
                                    prompts=prompts,
                                    logger=LoggerConfig(backend="none")))
    for key in ("step", "family", "objective", "eval/loss", "eval/accuracy", "eval/bits_per_byte",
                "eval/target_tokens"):
        assert result[key] == expected[key], key
    assert result.get("samples") == expected.get("samples")
