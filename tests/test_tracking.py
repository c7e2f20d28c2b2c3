"""archlab.train.tracking: metrics.jsonl always, W&B offline read back with wandb's own tooling, resume, failures.

No network and no account: W&B runs offline (or is made to fail), and its config/cache dirs live in tmp.
"""

from __future__ import annotations

import json
import logging
import math
import os

import pytest
import wandb
from PIL import Image

from archlab.errors import ConfigError
from archlab.train import tracking
from archlab.train.tracking import Tracker, trim_metrics_file
from wandb_offline import offline_run_files, read_offline_history, read_offline_records, read_offline_run

CONFIG = {"lr": 3e-4, "model": {"d_model": 64, "n_layers": 2}, "seed": 7}


@pytest.fixture(autouse=True, scope="module")
def _wandb_sandbox(tmp_path_factory):
    """Keep W&B away from the user's settings, credentials and environment for the whole module.

    Module-scoped because wandb reads its environment once per process and warns when it changes.
    """
    home = tmp_path_factory.mktemp("wandb_home")
    with pytest.MonkeyPatch.context() as mp:
        for key in [k for k in os.environ if k.startswith("WANDB_")]:
            mp.delenv(key)
        mp.setenv("WANDB_CONFIG_DIR", str(home / "config"))
        mp.setenv("WANDB_CACHE_DIR", str(home / "cache"))
        mp.setenv("WANDB_DATA_DIR", str(home / "data"))
        mp.setenv("NETRC", str(home / "netrc"))  # no stored API key
        yield


def _tracker(run_dir, **overrides) -> Tracker:
    kwargs = dict(backend="wandb", project="archlab-test", group="sweep-a", name="tiny", tags=["tiny", "clm"],
                  job_type="train", config=CONFIG, mode="offline")
    kwargs.update(overrides)
    return Tracker(run_dir, **kwargs)


def _rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _row(step: int, loss: float) -> dict:
    return {"train/loss": loss, "tokens": 1024 * step, "flops": 6.0e9 * step}


def _my_warnings(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == tracking.__name__ and r.levelno == logging.WARNING]


def test_offline_run_reads_back_with_wandb_tooling(tmp_path):
    tracker = _tracker(tmp_path)
    assert tracker.wandb_mode == "offline" and tracker.run_id
    for step, loss in [(1, 4.5), (2, 3.25), (3, 2.75)]:
        tracker.log(_row(step, loss), step=step)
    tracker.summary({"final/val_loss": 2.5, "params": 12345})
    Image.new("RGB", (4, 4)).save(tmp_path / "curve.png")
    tracker.log_image("plots/curve", tmp_path / "curve.png")  # joins the last row, step 3
    tracker.finish()

    [log_file] = offline_run_files(tmp_path)
    assert log_file.name == f"run-{tracker.run_id}.wandb"

    run = read_offline_run(log_file)
    assert run["run_id"] == tracker.run_id
    assert run["state"] == "finished" and run["exit_code"] == 0
    assert (run["project"], run["name"], run["tags"]) == ("archlab-test", "tiny", ["tiny", "clm"])
    assert run["config"] == CONFIG
    assert run["step"] == 3
    assert run["summary"]["train/loss"] == 2.75
    assert run["summary"]["final/val_loss"] == 2.5 and run["summary"]["params"] == 12345

    [meta] = [r["run"] for r in read_offline_records(log_file) if r["type"] == "run"]
    assert (meta["run_group"], meta["job_type"]) == ("sweep-a", "train")

    history = read_offline_history(log_file)
    assert [h["_step"] for h in history] == [1, 2, 3]
    assert [h["train/loss"] for h in history] == [4.5, 3.25, 2.75]
    assert [h["tokens"] for h in history] == [1024, 2048, 3072]
    assert [h["flops"] for h in history] == [6e9, 12e9, 18e9]
    assert history[-1]["plots/curve._type"] == "image-file"

    assert _rows(tmp_path) == [{"step": s, **_row(s, l)} for s, l in [(1, 4.5), (2, 3.25), (3, 2.75)]]
    assert json.loads((tmp_path / "summary.json").read_text()) == {"final/val_loss": 2.5, "params": 12345}


def test_resume_continues_the_same_run_and_drops_the_crashed_tail(tmp_path):
    first = _tracker(tmp_path)
    for step in range(1, 6):
        first.log(_row(step, 10.0 - step), step=step)
    first.finish(exit_code=1)  # crashed after step 5; the last checkpoint is step 3
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "train/lo')  # torn last line

    second = _tracker(tmp_path, run_id=first.run_id, resume_step=3)
    assert second.run_id == first.run_id
    assert [r["step"] for r in _rows(tmp_path)] == [1, 2, 3]
    for step in range(4, 7):
        second.log(_row(step, 1.0 / step), step=step)
    second.finish()

    rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[3]["train/loss"] == 0.25 and rows[2]["train/loss"] == 7.0

    old_log, new_log = offline_run_files(tmp_path)  # W&B writes one offline dir per process attempt
    assert read_offline_run(old_log)["state"] == "failed"
    resumed = read_offline_run(new_log)
    assert resumed["run_id"] == first.run_id and resumed["state"] == "finished"
    [meta] = [r["run"] for r in read_offline_records(new_log) if r["type"] == "run"]
    assert meta["resume"] is True
    assert [h["_step"] for h in read_offline_history(new_log)] == [4, 5, 6]


def test_backend_none_writes_only_the_jsonl(tmp_path):
    with _tracker(tmp_path, backend="none") as tracker:
        assert tracker.run_id is None and tracker.wandb_mode is None
        tracker.log({"val/loss": float("nan"), "tokens": 64}, step=0)
        tracker.log_image("plot", tmp_path / "missing.png")  # no W&B, no-op
        tracker.summary({"done": True})
    assert not (tmp_path / "wandb").exists()
    [row] = _rows(tmp_path)
    assert row["step"] == 0 and math.isnan(row["val/loss"])
    assert json.loads((tmp_path / "summary.json").read_text()) == {"done": True}


def test_wandb_mode_env_wins_over_config(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    tracker = _tracker(tmp_path, mode="online")
    tracker.log(_row(1, 1.0), step=1)
    tracker.finish()
    assert tracker.run_id is None and not (tmp_path / "wandb").exists()
    assert len(_rows(tmp_path)) == 1
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    with pytest.raises(ConfigError, match="WANDB_MODE"):
        _tracker(tmp_path / "bad")


def test_bad_backend_or_job_type_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="backend"):
        _tracker(tmp_path, backend="tensorboard")
    with pytest.raises(ConfigError, match="job_type"):
        _tracker(tmp_path, job_type="pretrain")
    assert not (tmp_path / "metrics.jsonl").exists()


def test_online_init_failure_falls_back_to_offline_once(tmp_path, monkeypatch, caplog):
    real_init, modes = wandb.init, []

    def flaky_init(*args, **kwargs):
        modes.append(kwargs["mode"])
        if len(modes) == 1:
            raise wandb.errors.CommError("server unreachable")
        return real_init(*args, **kwargs)

    monkeypatch.setattr(tracking, "_has_credentials", lambda: True)
    monkeypatch.setattr(wandb, "init", flaky_init)
    with caplog.at_level(logging.WARNING, logger=tracking.__name__):
        tracker = _tracker(tmp_path, mode="online")
        for step in (1, 2):
            tracker.log(_row(step, 2.0), step=step)
        tracker.finish()
    assert modes == ["online", "offline"]
    assert tracker.wandb_mode is None and tracker.run_id  # finished; the id survives for resuming
    [warning] = _my_warnings(caplog)
    assert "offline" in warning.getMessage() and "server unreachable" in warning.getMessage()
    [log_file] = offline_run_files(tmp_path)
    assert [h["_step"] for h in read_offline_history(log_file)] == [1, 2]
    assert len(_rows(tmp_path)) == 2


def test_online_without_credentials_goes_offline_without_prompting(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr("sys.stdin", None)  # any attempt to read a key would fail loudly
    with caplog.at_level(logging.WARNING, logger=tracking.__name__):
        tracker = _tracker(tmp_path, mode="online")
    assert tracker.wandb_mode == "offline"
    tracker.finish()
    [warning] = _my_warnings(caplog)
    assert "credentials" in warning.getMessage()


def test_failing_wandb_log_warns_once_and_jsonl_continues(tmp_path, monkeypatch, caplog):
    tracker = _tracker(tmp_path)

    def broken_log(*args, **kwargs):
        raise RuntimeError("wandb-core went away")

    monkeypatch.setattr(tracker._run, "log", broken_log)
    with caplog.at_level(logging.WARNING, logger=tracking.__name__):
        for step in (1, 2, 3):
            tracker.log(_row(step, 1.5), step=step)
        tracker.summary({"final/loss": 1.5})
        tracker.finish()
    [warning] = _my_warnings(caplog)
    assert "wandb-core went away" in warning.getMessage()
    assert tracker.wandb_mode is None
    assert [r["step"] for r in _rows(tmp_path)] == [1, 2, 3]
    assert json.loads((tmp_path / "summary.json").read_text()) == {"final/loss": 1.5}


def test_trim_metrics_file_keeps_rows_up_to_the_resume_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "x": s}) + "\n" for s in range(5)) + '{"step": 5')
    assert trim_metrics_file(path, 2) == 3
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [0, 1, 2]
    assert trim_metrics_file(path, 2) == 0
    assert trim_metrics_file(tmp_path / "absent.jsonl", 0) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # no temp file left behind


# -- beyond scalars: tables, images, artifacts; one W&B folder per experiment; opt-in settings ---------


def _artifacts(log_file) -> dict[str, dict]:
    return {r["artifact"]["name"]: r["artifact"] for r in read_offline_records(log_file) if r["type"] == "artifact"}


def test_table_image_and_artifacts_read_back(tmp_path):
    run_dir, folder = tmp_path / "exp" / "run", tmp_path / "exp"
    tracker = _tracker(run_dir, wandb_dir=folder)
    tracker.log(_row(1, 2.0), step=1)
    tracker.log_table("samples", ["step", "prompt", "continuation"], [[1, "To be", ", or not"], [1, "The", " king"]])
    (run_dir / "config.yaml").write_text("seed: 7\n")
    tracker.summary({"val/loss": 1.75})
    (run_dir / "checkpoints" / "1").mkdir(parents=True)
    (run_dir / "checkpoints" / "1" / "state.bin").write_bytes(b"\0" * 64)
    assert tracker.log_artifact("config-x", "config", [run_dir / "config.yaml", run_dir / "summary.json"])
    assert tracker.log_artifact("model-x", "model", [run_dir / "checkpoints" / "1"],
                                metadata={"step": 1, "val/loss": 1.75}, aliases=["latest", "step-1"])
    tracker.finish()

    assert not (run_dir / "wandb").exists()
    [log_file] = offline_run_files(folder, tracker.run_id)
    [row] = read_offline_history(log_file)
    assert row["samples._type"] == "table-file" and row["samples.nrows"] == 2
    table = json.loads((log_file.parent / "files" / row["samples.path"]).read_text())
    assert table["columns"] == ["step", "prompt", "continuation"]
    assert table["data"] == [[1, "To be", ", or not"], [1, "The", " king"]]
    artifacts = _artifacts(log_file)
    assert artifacts["config-x"]["type"] == "config"
    assert sorted(c["path"] for c in artifacts["config-x"]["manifest"]["contents"]) == ["config.yaml", "summary.json"]
    model = artifacts["model-x"]
    assert model["type"] == "model" and json.loads(model["metadata"]) == {"step": 1, "val/loss": 1.75}
    assert set(model["aliases"]) == {"latest", "step-1"}
    assert [c["path"] for c in model["manifest"]["contents"]] == ["1/state.bin"]


def test_runs_of_one_experiment_share_one_wandb_folder_and_resume(tmp_path):
    from archlab.schema import LoggerConfig

    folder = tmp_path / "runs" / "exp"
    options = tracking.wandb_options(LoggerConfig(), folder / "a")
    assert options == {"wandb_dir": folder, "system_metrics": False, "console": "off"}
    a = _tracker(folder / "a", **options)
    a.log(_row(1, 3.0), step=1)
    a.finish()
    b = _tracker(folder / "b", name="other", **tracking.wandb_options(LoggerConfig(), folder / "b"))
    b.log(_row(1, 2.0), step=1)
    b.finish()
    again = _tracker(folder / "a", run_id=a.run_id, resume_step=1, **options)
    again.log(_row(2, 1.0), step=2)
    again.finish()

    assert not (folder / "a" / "wandb").exists() and not (folder / "b" / "wandb").exists()
    assert len(offline_run_files(folder)) == 3  # `wandb leet runs/exp/wandb` lists them all
    first, resumed = offline_run_files(folder, a.run_id)
    assert [h["_step"] for h in read_offline_history(resumed)] == [2]
    assert read_offline_run(resumed)["run_id"] == a.run_id
    [other] = offline_run_files(folder, b.run_id)
    assert read_offline_run(other)["name"] == "other"
    custom = tracking.wandb_options(LoggerConfig(dir=str(tmp_path / "elsewhere")), folder / "a")
    assert custom["wandb_dir"] == tmp_path / "elsewhere"


def test_system_metrics_and_console_settings_reach_wandb_init(tmp_path, monkeypatch):
    real_init, seen = wandb.init, []

    def spying_init(*args, **kwargs):
        seen.append((kwargs["settings"], kwargs["dir"]))
        return real_init(*args, **kwargs)

    monkeypatch.setattr(wandb, "init", spying_init)
    _tracker(tmp_path / "quiet").finish()
    _tracker(tmp_path / "loud", system_metrics=True, console="wrap", wandb_dir=tmp_path / "exp").finish()
    (quiet, quiet_dir), (loud, loud_dir) = seen
    assert (quiet.console, quiet.x_disable_stats, quiet_dir) == ("off", True, str(tmp_path / "quiet"))
    assert (loud.console, loud.x_disable_stats, loud_dir) == ("wrap", False, str(tmp_path / "exp"))


def test_bad_console_value_is_refused(tmp_path):
    from archlab.schema import LoggerConfig

    with pytest.raises(ConfigError, match=r"^logger.console='tee' is not one of off, wrap, redirect, auto$"):
        LoggerConfig(console="tee")
    with pytest.raises(ConfigError, match="logger.dir must be a folder"):
        LoggerConfig(dir=" ")
    with pytest.raises(ConfigError, match="W&B console 'tee'"):
        _tracker(tmp_path, console="tee")
    assert not (tmp_path / "metrics.jsonl").exists()


def test_failing_artifact_or_table_warns_once_and_jsonl_continues(tmp_path, monkeypatch, caplog):
    tracker = _tracker(tmp_path)

    def broken(*args, **kwargs):
        raise RuntimeError("staging area full")

    monkeypatch.setattr(tracker._run, "log_artifact", broken)
    (tmp_path / "config.yaml").write_text("a: 1\n")
    with caplog.at_level(logging.WARNING, logger=tracking.__name__):
        assert not tracker.log_artifact("config-x", "config", [tmp_path / "config.yaml"])
        tracker.log_table("samples", ["step"], [[1]])  # W&B is off now: a no-op
        tracker.log(_row(1, 1.0), step=1)
        tracker.finish()
    [warning] = _my_warnings(caplog)
    assert "log_artifact" in warning.getMessage() and "staging area full" in warning.getMessage()
    assert [r["step"] for r in _rows(tmp_path)] == [1]


def test_loss_curve_is_drawn_from_metrics_jsonl_and_redrawn(tmp_path):
    from archlab.train.run_end import LOSS_CURVE_FILE, loss_series, plot_loss_curve

    assert plot_loss_curve(tmp_path) is None and not (tmp_path / LOSS_CURVE_FILE).exists()
    rows = [{"step": 1, "train/loss": 5.0, "tokens": 64}, {"step": 2, "train/loss": float("nan"), "tokens": 128},
            {"step": 2, "val/loss": 4.5, "tokens": 128}, {"step": 3, "train/loss": 4.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "tr')
    assert loss_series(tmp_path / "metrics.jsonl") == {"train/loss": [(64.0, 5.0)], "val/loss": [(128.0, 4.5)]}
    path = plot_loss_curve(tmp_path)
    assert path == tmp_path / LOSS_CURVE_FILE
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (600, 400)
    first = path.read_bytes()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('\n{"step": 5, "train/loss": 3.0, "tokens": 320}\n')
    assert plot_loss_curve(tmp_path) == path and path.read_bytes() != first  # the same run's curve, redrawn
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOSS_CURVE_FILE, "metrics.jsonl"]


def test_a_training_run_logs_samples_the_loss_curve_and_its_artifacts(train_run, tmp_path):
    folder = tmp_path / "exp"
    summary = train_run(folder / "run", "logger=wandb", "logger.mode=offline", "run.steps=3", "run.samples=2",
                        "logger.log_checkpoints=true")
    run_dir = folder / "run"
    assert (run_dir / "loss_curve.png").is_file() and not (run_dir / "wandb").exists()
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    [log_file] = offline_run_files(folder, run_id)
    history = read_offline_history(log_file)
    last = history[-1]
    assert last["_step"] == 3 and last["samples._type"] == "table-file" and last["samples.nrows"] == 2
    assert last["loss_curve._type"] == "image-file"
    table = json.loads((log_file.parent / "files" / last["samples.path"]).read_text())
    assert table["columns"] == ["step", "prompt", "continuation"] and [r[0] for r in table["data"]] == [3, 3]
    artifacts = _artifacts(log_file)
    assert artifacts[f"config-{run_id}"]["type"] == "config"
    model = artifacts[f"model-{run_id}"]
    assert model["type"] == "model" and set(model["aliases"]) == {"latest", "step-3"}
    metadata = json.loads(model["metadata"])
    assert metadata["step"] == 3 and metadata["val/loss"] == pytest.approx(summary["val/loss"])
    assert any(c["path"].startswith("3/") for c in model["manifest"]["contents"])

    from archlab.evaluate import evaluate
    from archlab.schema import EvalConfig, LoggerConfig

    evaluate(EvalConfig(checkpoint=str(run_dir), batches=1, samples=2, max_new_tokens=4,
                        logger=LoggerConfig(project="archlab-test")))
    eval_logs = [f for f in offline_run_files(folder) if f.name != log_file.name]
    [eval_log] = eval_logs  # beside the training run, in the experiment's folder
    assert not (run_dir / "eval_logs" / "wandb").exists()
    [row] = [h for h in read_offline_history(eval_log) if "eval/samples._type" in h]
    assert row["_step"] == 3 and row["eval/samples.nrows"] == 2
