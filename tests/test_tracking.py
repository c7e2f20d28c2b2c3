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
