"""The train/eval app: presets, resume, W&B read-back, evaluation of every family, multirun."""

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from archlab.schema import EvalConfig, LoggerConfig
from conftest import CONF_DIR, SHRINK, compose_train

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(run_dir: Path) -> dict[int, float]:
    return {row["step"]: row["train/loss"] for row in read_metrics(run_dir) if "train/loss" in row}


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_preset_trains_two_steps(experiment, train_run, tmp_path):
    summary = train_run(tmp_path / "run", f"experiment={experiment}", "run.steps=2")
    assert summary["step"] == 2
    assert math.isfinite(summary["val/loss"])
    assert (tmp_path / "run" / "checkpoints" / "2").is_dir()
    assert (tmp_path / "run" / "config.yaml").is_file() and (tmp_path / "run" / "tokenizer.json").is_file()


def test_every_size_and_model_preset_passes_validation(cache_dir):
    """Each size= preset on each model= preset (with an objective it trains) is accepted: the
    schemas' ranges must not refuse a shape the presets ship. Options come from Hydra, so presets
    registered in the ConfigStore count as well as conf/ files."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    compose_train([], cache_dir)  # registers the schemas and resolvers
    objective_of = {"encoder_only": "mlm", "decoder_only": "clm", "encoder_decoder": "span_corruption"}
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        models, sizes = loader.get_group_options("model"), loader.get_group_options("size")
        family_of = {model: compose("train", overrides=[f"model={model}"]).model.family for model in models}
    assert models and sizes
    for model in models:
        for size in sizes:
            overrides = [f"model={model}", f"objective={objective_of[family_of[model]]}", f"size={size}"]
            compose_train(overrides, cache_dir, shrink=False)


def test_stopped_and_resumed_run_matches_uninterrupted(train_run, tmp_path):
    common = ("run.steps=6", "run.checkpoint_every=3", "run.eval_every=3")
    train_run(tmp_path / "whole", *common)
    stopped = train_run(tmp_path / "split", *common, "run.stop_at_step=3")
    assert stopped["stopped_at"] == 3
    train_run(tmp_path / "split", *common)
    whole, split = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "split")
    assert train_losses(tmp_path / "whole") == train_losses(tmp_path / "split")  # bitwise on the CPU
    assert sorted(train_losses(tmp_path / "split")) == [1, 2, 3, 4, 5, 6]
    assert [r for r in whole if "val/loss" in r] == [r for r in split if "val/loss" in r]


def test_resume_refuses_a_different_config(train_run, tmp_path):
    from archlab.errors import ConfigError

    train_run(tmp_path / "run", "run.steps=2")
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    with pytest.raises(ConfigError, match="holds a different run"):
        train_run(tmp_path / "run", "run.steps=2", "model.d_model=32")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before


def test_wandb_offline_run_reads_back(train_run, tmp_path):
    from wandb_offline import offline_run_files, read_offline_history, read_offline_run

    summary = train_run(tmp_path / "run", "logger=wandb", "logger.mode=offline", "run.steps=3")
    (path,) = offline_run_files(tmp_path)  # runs/<experiment>/wandb: the run directory's parent
    run = read_offline_run(path)
    assert run["config"]["model"]["family"] == "decoder_only"
    assert run["config"]["derived"]["params_total"] > 0
    assert set(run["tags"]) >= {"decoder_only", "clm", "nano"}
    history = read_offline_history(path)
    logged = [row for row in history if "train/loss" in row]
    assert [row["_step"] for row in logged] == [1, 2, 3]
    assert all({"tokens", "flops", "train/mfu", "train/tokens_per_s"} <= set(row) for row in logged)
    assert run["summary"]["val/loss"] == pytest.approx(summary["val/loss"])


@pytest.fixture(scope="module")
def trained_families(tmp_path_factory, cache_dir):
    from conftest import compose_train
    from archlab.train.loop import train

    runs = {}
    for experiment in ("quickstart", "bert_mlm", "t5_span_corruption"):
        run_dir = tmp_path_factory.mktemp(experiment) / "run"
        config = compose_train([f"experiment={experiment}", "run.steps=2"], cache_dir)
        train(config, run_dir)
        runs[config.model.family] = run_dir
    return runs


@pytest.mark.parametrize("family", ["decoder_only", "encoder_only", "encoder_decoder"])
def test_evaluation_from_checkpoint(family, trained_families):
    from archlab.evaluate import evaluate

    run_dir = trained_families[family]
    quiet = LoggerConfig(backend="none", mode="disabled")
    (result,) = evaluate(EvalConfig(checkpoint=str(run_dir), batches=1, samples=1, max_new_tokens=4, logger=quiet))
    assert result["step"] == 2 and result["family"] == family
    assert math.isfinite(result["eval/loss"]) and 0 <= result["eval/accuracy"] <= 1
    assert result["eval/perplexity"] == pytest.approx(math.exp(result["eval/loss"]))
    assert result["eval/bits_per_byte"] > 0
    assert ("samples" in result) == (family != "encoder_only")
    if family != "encoder_only":  # by default the prompt is a held-out validation document's opening
        (sample,) = result["samples"]
        assert sample["prompt"].strip() and sample["prompt"] not in ("ROMEO:", "To be, or not")
    saved = json.loads((run_dir / "eval.json").read_text())
    assert saved["2"]["eval/loss"] == result["eval/loss"]
    # A step directory and a sweep directory work too.
    (by_step,) = evaluate(EvalConfig(checkpoint=str(run_dir / "checkpoints" / "2"), batches=1, samples=0, logger=quiet))
    assert by_step["eval/loss"] == result["eval/loss"]


def test_evaluating_a_whole_sweep_directory(trained_families, tmp_path):
    from archlab.evaluate import evaluate

    sweep = tmp_path / "sweep"
    sweep.mkdir()
    for family, run_dir in trained_families.items():
        shutil.copytree(run_dir, sweep / family)
    quiet = LoggerConfig(backend="none", mode="disabled")
    results = evaluate(EvalConfig(checkpoint=str(sweep), batches=1, samples=0, logger=quiet))
    assert sorted(r["family"] for r in results) == ["decoder_only", "encoder_decoder", "encoder_only"]


def cli(app: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_SILENT": "true"}
    return subprocess.run([sys.executable, "-c", f"from archlab.cli import {app}; {app}()", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def assert_console_block(run: Path, stdout: str) -> None:
    """The start block, compile notice, evaluation lines, samples and final summary of one run are on
    the console and in its train.log (timestamped there)."""
    summary = json.loads((run / "summary.json").read_text())
    log_lines = [line.split("] ", 1)[1] for line in (run / "train.log").read_text().splitlines()]
    expected = [
        f"run        {run}",
        f"parameters {summary['params_total']:,} total, {summary['params_non_embedding']:,} non-embedding",
        "plan       2 steps from scratch",
        "compiled the training step and ran it once in ",
        f"step 2/2  val: loss {summary['val/loss']:.4g}  bits per byte {summary['val/bits_per_byte']:.4g}",
        "sample     ",
        "done in ",
        f"  val/loss              {summary['val/loss']:.6g}",
        f"  step                  {summary['step']}",
    ]
    for line in expected:
        assert any(logged.startswith(line) for logged in log_lines), (line, log_lines)
        assert any(shown.startswith(line) for shown in stdout.splitlines()), (line, stdout[-3000:])


def test_a_sweep_runs_every_job_and_ends_with_its_table(tmp_path, cache_dir):
    """A diverging job and a refused one fail alone: the job after them trains, the sweep prints and
    writes its table and exits 1; the same sweep again resumes the finished job instead of colliding
    with it, and gets no further stuck on the others."""
    import csv

    shrink = [s for s in SHRINK if not s.startswith("logger=")]
    sweep = ["-m", "optimizer.lr=1e30,-1,3e-3", "experiment=multirun_test", *shrink,
             f"data.cache_dir={cache_dir}", "run.samples=1"]
    suffix = ",data.seq_len=32,data.vocab_size=512,optimizer.lr={},run.batch_size=4,run.steps=2"
    names = [f"decoder_only-nano-clm-s0{suffix.format(lr)}" for lr in ("1e+30", "-1", "0.003")]
    sweep_dir = tmp_path / "runs" / "multirun_test"
    for launch in range(2):
        result = cli("train_main", *sweep, cwd=tmp_path)
        assert result.returncode == 1, result.stderr[-2000:]
        assert "non-finite loss at step 2" in result.stderr and "optimizer.lr must be positive" in result.stderr
        assert result.stderr.strip().splitlines()[-1].startswith("archlab-train: error: 2 of 3 jobs did not finish")
        table = sorted(sweep_dir.glob("sweep-*.csv"))[launch]
        rows = list(csv.DictReader(table.open()))
        assert [r["run"] for r in rows] == names
        assert [r["status"].split(":")[0] for r in rows] == ["stopped", "refused", "done"]
        assert rows[2]["family"] == "decoder_only" and rows[2]["size"] == "nano" and int(rows[2]["params"]) > 0
        done = sweep_dir / names[2]
        assert float(rows[2]["val_loss"]) == json.loads((done / "summary.json").read_text())["val/loss"]
        assert f"3 jobs, 1 done; table written to {table.relative_to(tmp_path)}" in result.stdout
        if launch == 0:
            assert_console_block(done, result.stdout)
            assert (done / "checkpoints" / "2").is_dir()
            assert list((sweep_dir / "wandb").glob("offline-run-*/run-*.wandb"))  # the experiment's W&B folder
            assert not (done / "wandb").exists() and (done / "loss_curve.png").is_file()
            assert not (sweep_dir / names[1]).exists()  # refused before anything was written
            time.sleep(1)  # the second table gets its own second-stamped name
        else:
            assert "resuming at step 2 of 2" in (done / "train.log").read_text()
