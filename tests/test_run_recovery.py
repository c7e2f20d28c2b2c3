"""Getting a run back: starting over in place, skipped updates watched, damaged run files, eval.json
under concurrent writers, W&B with an unreachable server (issue 18, items 4, 5 and 7)."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import threading

import pytest

from archlab.errors import ConfigError, NonFiniteError


# -- starting over ---------------------------------------------------------------------------------


def test_a_changed_run_is_refused_naming_the_flag_and_restart_keeps_the_old_contents(tmp_path, train_run):
    run_dir = tmp_path / "runs" / "exp" / "run"
    first = train_run(run_dir, "run.steps=2", "optimizer.lr=0.003")
    before = {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"}
    with pytest.raises(ConfigError, match=r"holds a different run \(optimizer.lr: saved 0.003, now 0.001\).*"
                                          r"run\.restart=true"):
        train_run(run_dir, "run.steps=2", "optimizer.lr=0.001")

    second = train_run(run_dir, "run.steps=2", "optimizer.lr=0.001", "run.restart=true")
    (old,) = [p for p in run_dir.parent.iterdir() if p.name.startswith("run.restarted-")]
    for name, content in before.items():  # every byte of the old run is kept, under the new name
        assert (old / name).read_bytes() == content
    note = (old / "restarted.json").read_text()
    assert str(run_dir) in note and "run.restart=true" in note
    assert second["val/loss"] != first["val/loss"]
    import yaml

    assert yaml.safe_load((run_dir / "config.yaml").read_text())["optimizer"]["lr"] == 0.001

    # searches over a runs directory skip the moved-aside run
    from archlab.scaling.records import find_run_dirs

    assert find_run_dirs([run_dir.parent]) == [run_dir]


def test_restart_in_place_of_an_empty_or_missing_directory_moves_nothing(tmp_path):
    from archlab.train.run_dir import restart_in_place

    assert restart_in_place(tmp_path / "absent") is None
    (tmp_path / "empty").mkdir()
    assert restart_in_place(tmp_path / "empty") is None and (tmp_path / "empty").is_dir()


def test_a_damaged_config_yaml_is_named_with_the_way_out(tmp_path):
    from archlab.train.run_dir import check_resumable

    (tmp_path / "config.yaml").write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match=rf"{tmp_path / 'config.yaml'} is unreadable .*run\.restart=true"):
        check_resumable(tmp_path, {})


# -- skipped updates -------------------------------------------------------------------------------


def test_skip_watch_warns_on_every_skip_and_stops_after_the_limit_in_a_row(caplog):
    from archlab.train.skips import SkipWatch

    watch = SkipWatch(3, 0)
    with caplog.at_level(logging.WARNING, logger="archlab.train.skips"):
        for step, total in ((1, 0), (2, 1), (3, 1), (4, 2), (5, 3)):  # a run of 2, a good step, then 2
            watch.after(step, total)
        assert [r.getMessage().split(",")[0] for r in caplog.records] == [
            "step 2: non-finite loss or gradients", "step 4: non-finite loss or gradients",
            "step 5: non-finite loss or gradients"]
        assert "(2 in a row, 3 in all" in caplog.records[-1].getMessage()
        with pytest.raises(NonFiniteError, match=r"3 updates in a row skipped .*\(steps 4-6; "
                                                 r"run.max_skips_in_a_row=3\); stopped \(the last good checkpoint, "
                                                 r"step 2, is kept"):
            watch.after(6, 4, kept_step=lambda: 2)


def test_packed_members_are_watched_one_by_one():
    from archlab.train.skips import SkipWatch

    watch = SkipWatch(2, [0, 0], names=["a", "b"])
    watch.after(1, [1, 0])
    watch.after(2, [1, 1])  # a recovered, b skipped once
    with pytest.raises(NonFiniteError, match=r"^b: 2 updates in a row"):
        watch.after(3, [1, 2])


def test_a_run_whose_every_update_is_skipped_stops(tmp_path, train_run, caplog):
    run_dir = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="archlab.train.skips"):
        with pytest.raises(NonFiniteError, match=r"3 updates in a row skipped for non-finite loss or gradients "
                                                 r"\(steps 2-4; run.max_skips_in_a_row=3\)"):
            # step 1's update at this rate overflows the weights: every later loss is non-finite
            train_run(run_dir, "run.steps=8", "run.on_nonfinite=skip", "run.max_skips_in_a_row=3",
                      "optimizer.lr=1e30", "optimizer.grad_clip=0", "optimizer.warmup_tokens=0")
    skips = [r.getMessage() for r in caplog.records if "update skipped" in r.getMessage()]
    assert len(skips) == 3 and skips[0].startswith("step 2:")


# -- damaged run files -----------------------------------------------------------------------------


def test_damaged_metrics_and_summary_never_block_a_resume(tmp_path, train_run, caplog):
    run_dir = tmp_path / "run"
    common = ["run.steps=4", "run.checkpoint_every=2"]
    train_run(run_dir, *common, "run.stop_at_step=2")
    metrics = run_dir / "metrics.jsonl"
    good = metrics.read_text().splitlines()
    metrics.write_bytes(("\n".join(good[:1]) + "\n[1, 2]\n\xff\xfe garbage\n" + "\n".join(good[1:]) + "\n")
                        .encode("utf-8", errors="surrogateescape") + b"\xff\n")
    damaged_metrics = metrics.read_bytes()
    (run_dir / "summary.json").write_text('{"val/loss": 3.1')  # torn
    with caplog.at_level(logging.WARNING, logger="archlab.train.tracking"):
        summary = train_run(run_dir, *common)
    assert summary["step"] == 4
    messages = " | ".join(r.getMessage() for r in caplog.records)
    assert f"{metrics}: 3 damaged line(s) dropped (rows lost)" in messages
    assert "summary.json is damaged" in messages
    (kept,) = run_dir.glob("metrics.jsonl.damaged-*")
    assert kept.read_bytes() == damaged_metrics  # the file as it was
    assert len(list(run_dir.glob("summary.json.damaged-*"))) == 1
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == sorted(steps) and max(steps) == 4
    assert json.loads((run_dir / "summary.json").read_text())["step"] == 4


def test_a_killed_runs_torn_last_line_is_dropped_quietly(tmp_path, caplog):
    from archlab.train.tracking import trim_metrics_file

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "a": 1}\n{"step": 2, "a": 2}\n{"step": 3, "a"')
    with caplog.at_level(logging.WARNING):
        assert trim_metrics_file(path, resume_step=1) == 2
    assert not caplog.records and not list(tmp_path.glob("*.damaged-*"))
    assert path.read_text() == '{"step": 1, "a": 1}\n'


def test_an_appending_tracker_drops_a_killed_writers_torn_line_before_its_first_row(tmp_path):
    from archlab.train.tracking import Tracker

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 10, "eval/loss": 3.0}\n{"step": 20, "eval/lo')  # a killed evaluation's tail
    tracker = Tracker(tmp_path, backend="none", project="", group=None, name="e", tags=[], job_type="eval", config={})
    tracker.log({"eval/loss": 2.5}, 20, replace=True)
    tracker.finish()
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"step": 10, "eval/loss": 3.0}, {"step": 20, "eval/loss": 2.5}]


def test_a_summary_that_is_not_an_object_is_rebuilt_from_the_metrics(tmp_path):
    from archlab.train.tracking import read_summary

    (tmp_path / "metrics.jsonl").write_text('{"step": 2, "val/loss": 3.5}\n{"step": 4, "train/loss": 3.0}\n')
    (tmp_path / "summary.json").write_text("[1, 2]")
    assert read_summary(tmp_path / "summary.json") == {"step": 4, "val/loss": 3.5, "train/loss": 3.0}
    assert not (tmp_path / "summary.json").exists()


# -- eval.json --------------------------------------------------------------------------------------


def test_eval_json_keeps_every_writers_entry_and_a_damaged_one_is_moved_aside(tmp_path):
    from archlab.evaluate import _record

    (tmp_path / "eval.json").write_text("{not json")
    threads = [threading.Thread(target=lambda s=s: [_record(tmp_path, {"step": s * 100 + i}) for i in range(20)])
               for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    entries = json.loads((tmp_path / "eval.json").read_text())
    assert sorted(map(int, entries)) == sorted(s * 100 + i for s in range(4) for i in range(20))
    (moved,) = tmp_path.glob("eval.json.damaged-*")
    assert moved.read_text() == "{not json"
    assert not list(tmp_path.glob(".eval.json.*.tmp"))


def test_reevaluating_a_step_leaves_one_row_per_step(tmp_path):
    from archlab.train.tracking import Tracker

    def evaluate_steps(*steps):
        tracker = Tracker(tmp_path, backend="none", project="", group=None, name="e", tags=[], job_type="eval",
                          config={})
        for step in steps:
            tracker.log({"eval/loss": float(step)}, step, replace=True)
        return tracker

    evaluate_steps(2, 4)._metrics.close()  # a killed evaluation: rows written, never finished
    evaluate_steps(4, 6).finish()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6]


# -- W&B with an unreachable server ------------------------------------------------------------------


WANDB_UNREACHABLE = """
import json, sys, time
from pathlib import Path
from archlab.train.tracking import Tracker
start = time.monotonic()
tracker = Tracker(Path(sys.argv[1]), backend="wandb", project="p", group=None, name="n", tags=[], job_type="train",
                  config={}, mode="online", run_id="takenid1", online_timeout=3)
seconds, mode = time.monotonic() - start, tracker.wandb_mode
tracker.log({"a": 1.0}, 1)
tracker.finish()
print(json.dumps({"seconds": seconds, "mode": mode, "id": tracker.run_id}))
"""


def test_an_unreachable_wandb_server_falls_back_to_offline_in_bounded_time(tmp_path):
    home = tmp_path / "home"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}, "WANDB_SILENT": "true",
           "WANDB_MODE": "online", "WANDB_API_KEY": "x" * 40, "WANDB_BASE_URL": "http://127.0.0.1:9",
           "WANDB_CONFIG_DIR": str(home / "config"), "WANDB_CACHE_DIR": str(home / "cache"),
           "WANDB_DATA_DIR": str(home / "data"), "NETRC": str(home / "netrc")}
    result = subprocess.run([sys.executable, "-c", WANDB_UNREACHABLE, str(tmp_path / "run")], env=env,
                            capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["mode"] == "offline" and outcome["id"]
    assert outcome["seconds"] < 60, outcome  # wandb's own default waits 90 s, then gave no record at all
    (offline,) = (tmp_path / "run" / "wandb").glob(f"offline-run-*-{outcome['id']}")
    assert list(offline.glob("*.wandb"))
    assert "logging offline" in result.stderr


def test_the_online_timeout_is_checked():
    from archlab.trainer import compose

    with pytest.raises(Exception, match="logger.online_timeout"):
        compose(["logger.online_timeout=0"])
    assert math.isclose(compose([]).logger.online_timeout, 30.0)
