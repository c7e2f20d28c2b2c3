"""``archlab-generate``: prompts from the command line, a file or stdin; greedy and seeded sampling;
samples per prompt; the int8 cache; the JSON-lines output; a prefix-LM run conditioned on its prompt.

Its refusals are cases of tests/bad_input_cases.py (``generate_*``).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from archlab.schema import GenerateConfig
from conftest import compose_train

PROMPTS = ["ROMEO:", "To be, or not"]
NEW = 6


def cli(*args: str, cwd: Path, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, "-c", "from archlab.cli import generate_main; generate_main()", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600, input=stdin)


def run_app(run: Path, **settings) -> list[dict]:
    from archlab.generate_app import generate_from_run

    return generate_from_run(GenerateConfig(checkpoint=str(run), **{"max_new_tokens": NEW, **settings}))


def continuations(records: list[dict]) -> list[list[int]]:
    return [r["tokens"] for r in records]


@pytest.fixture(scope="module")
def prefix_lm_run(tmp_path_factory, cache_dir) -> Path:
    from archlab.train.loop import train

    run_dir = tmp_path_factory.mktemp("prefix_lm") / "run"
    train(compose_train(["objective=prefix_lm", "run.steps=4"], cache_dir), run_dir)
    return run_dir


def test_prompts_from_the_command_line_with_output_file(prepared_run, tmp_path):
    result = cli(f"checkpoint={prepared_run}", 'prompts=["ROMEO:","To be, or not"]', f"max_new_tokens={NEW}",
                 f"output={tmp_path / 'out.jsonl'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "prompt 0: 'ROMEO:'" in result.stdout and "prompt 1: 'To be, or not'" in result.stdout
    assert "compiling (first prefill and decode step)" in result.stdout and "tokens/s" in result.stdout
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in records] == PROMPTS
    assert all(len(r["tokens"]) == len(r["logprobs"]) <= NEW and r["step"] == 2 for r in records)
    assert all(f"-> {r['continuation']!r}" in result.stdout for r in records)
    # The same command again would overwrite its output: refused, the file kept.
    again = cli(f"checkpoint={prepared_run}", "prompts=[x]", f"output={tmp_path / 'out.jsonl'}", cwd=tmp_path)
    assert again.returncode == 2 and "already exists" in again.stderr
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 2


def test_prompts_from_stdin_with_samples(prepared_run, tmp_path):
    result = cli(f"checkpoint={prepared_run}", "prompts_file=-", "temperature=1.0", "num_samples=2",
                 f"max_new_tokens={NEW}", cwd=tmp_path, stdin="ROMEO:\n\n   \nTo be, or not\n")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "prompt 1: 'To be, or not'" in result.stdout and "prompt 2" not in result.stdout
    assert result.stdout.count("sample 0 (seed 0): ") == 2 and result.stdout.count("sample 1 (seed 1): ") == 2


def test_prompts_file_equals_the_same_prompts_given_inline(prepared_run, tmp_path):
    (tmp_path / "prompts.txt").write_text("ROMEO:\n\n\nTo be, or not\r\n")
    from_file = run_app(prepared_run, prompts_file=str(tmp_path / "prompts.txt"))
    inline = run_app(prepared_run, prompts=PROMPTS)
    assert [r["prompt"] for r in from_file] == PROMPTS
    assert continuations(from_file) == continuations(inline)


def test_greedy_is_deterministic_and_is_the_library_generation(prepared_run):
    from archlab.generate import generate
    from archlab.trainer import Trainer

    first = run_app(prepared_run, prompts=PROMPTS)
    assert continuations(first) == continuations(run_app(prepared_run, prompts=PROMPTS))
    trainer = Trainer.restore(prepared_run)
    ids = [trainer.tokenizer.encode(p) for p in PROMPTS]
    assert continuations(first) == generate(trainer.model, ids, max_new_tokens=NEW).tokens
    assert all(r["prompt_ids"] == i for r, i in zip(first, ids))


def test_sampling_is_reproducible_from_the_seed_and_seeds_differ(prepared_run):
    sampled = dict(prompts=PROMPTS, temperature=1.0, top_k=100)
    one = continuations(run_app(prepared_run, seed=3, **sampled))
    assert one == continuations(run_app(prepared_run, seed=3, **sampled))
    assert one != continuations(run_app(prepared_run, seed=4, **sampled))


def test_num_samples_draw_from_successive_seeds(prepared_run):
    sampled = dict(prompts=PROMPTS, temperature=1.0, top_k=100)
    records = run_app(prepared_run, seed=3, num_samples=3, **sampled)
    assert [(r["prompt"], r["sample"], r["seed"]) for r in records] == [
        (p, i, 3 + i) for p in PROMPTS for i in range(3)]
    by_seed = {r["seed"]: [] for r in records}
    for r in records:
        by_seed[r["seed"]].append(r["tokens"])
    assert by_seed[3] == continuations(run_app(prepared_run, seed=3, **sampled))
    assert by_seed[4] == continuations(run_app(prepared_run, seed=4, **sampled))
    assert len({tuple(map(tuple, rows)) for rows in by_seed.values()}) == 3


def test_int8_cache(prepared_run):
    records = run_app(prepared_run, prompts=PROMPTS, kv_cache_dtype="int8")
    float_records = run_app(prepared_run, prompts=PROMPTS)
    assert all(r["kv_cache_dtype"] == "int8" for r in records)
    assert all(r["kv_cache_dtype"] == "float32" for r in float_records)
    assert all(len(r["tokens"]) == len(r["logprobs"]) and np.isfinite(r["logprobs"]).all() for r in records)


def test_validation_openings_by_default(prepared_run, capsys):
    records = run_app(prepared_run, validation_prompts=2, prompt_tokens=5)
    assert len(records) == 2 and all(len(r["prompt_ids"]) <= 5 for r in records)
    assert "prompt 1: " in capsys.readouterr().out


def test_a_prefix_lm_run_reads_its_prompt_as_the_prefix(prefix_lm_run, capsys):
    from archlab.generate import generate
    from archlab.trainer import Trainer

    records = run_app(prefix_lm_run, prompts=PROMPTS)
    assert all(r["prefix_lm"] for r in records)
    assert "prompt read as a prefix-LM prefix" in capsys.readouterr().out
    trainer = Trainer.restore(prefix_lm_run)
    ids = [trainer.tokenizer.encode(p) for p in PROMPTS]
    as_prefix = generate(trainer.model, ids, max_new_tokens=NEW, prefix=True)
    causal = generate(trainer.model, ids, max_new_tokens=NEW, prefix=False, return_logits=True)
    assert continuations(records) == as_prefix.tokens
    for record, expected in zip(records, as_prefix.logprobs):
        np.testing.assert_allclose(record["logprobs"], expected, atol=1e-6)
    # The prefix changes what the model computes (the test would be vacuous otherwise).
    prefix_logits = generate(trainer.model, ids, max_new_tokens=NEW, prefix=True, return_logits=True).logits
    assert np.abs(prefix_logits[:, 0] - causal.logits[:, 0]).max() > 1e-5


def test_an_encoder_decoder_continuation_is_the_span_for_sentinel_0():
    from archlab.samples import generation_inputs, span_continuation
    from archlab.tokens import SPECIAL

    vocab = 512
    s0, s1 = SPECIAL.sentinel_id(0, vocab), SPECIAL.sentinel_id(1, vocab)
    assert generation_inputs("encoder_decoder", [[7, 8]], vocab) == [[7, 8, s0]]
    assert generation_inputs("decoder_only", [[7, 8]], vocab) == [[7, 8]]
    assert span_continuation([s0, 40, 41, s1, 50, 51], vocab) == [40, 41]
    assert span_continuation([40, 41], vocab) == [40, 41]
    assert span_continuation([s0, s1, s1], vocab) == []


def test_help_lists_every_setting_with_its_description(tmp_path):
    result = cli("--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Usage: archlab-generate checkpoint=" in result.stdout
    for line in ("num_samples (int) = 1: continuations per prompt", "kv_cache_dtype (str | null) = None: KV-cache",
                 "prompts_file (str | null) = None: a UTF-8 text file"):
        assert line in result.stdout
    assert not list(tmp_path.iterdir())
