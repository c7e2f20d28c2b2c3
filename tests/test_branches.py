"""Cooldown branches on a constant-rate trunk (archlab/train/branches.py): a branch equals the
separate optimizer.schedule=wsd run to its budget bitwise, survives a SIGKILL mid-branch, a trunk
extends to a larger budget as if trained longer in one go, and a bad run.branches is refused."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from archlab.errors import ConfigError
from conftest import SHRINK

# 128 tokens per step; a 2-update warmup; run.tokens=6400 is 50 updates.
WSD = ["optimizer.schedule=wsd", "optimizer.warmup_tokens=256", "run.eval_every=1000", "run.checkpoint_every=1000"]
TRUNK = [*WSD, "run.tokens=6400", "run.branches=[1600,3200,6400]", "run.branch_checkpoints=true"]


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def train_losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["train/loss"] for row in rows if "train/loss" in row}


def final_state(run_dir: Path):
    from archlab.train.checkpoint import Checkpointer, committed_steps, saved_state_shapes

    step = committed_steps(run_dir / "checkpoints")[-1]
    with Checkpointer(run_dir / "checkpoints", async_save=False) as checkpoints:
        return checkpoints.restore(step, saved_state_shapes(run_dir / "checkpoints" / str(step))).state


def assert_same_state(a: Path, b: Path) -> None:
    import jax

    left, right = (jax.tree_util.tree_leaves_with_path(final_state(d)) for d in (a, b))
    assert [p for p, _ in left] == [p for p, _ in right]
    for (path, x), (_, y) in zip(left, right):
        assert np.array_equal(np.asarray(x), np.asarray(y)), jax.tree_util.keystr(path)


@pytest.fixture(scope="module")
def trunk(tmp_path_factory, cache_dir) -> Path:
    """An uninterrupted trunk of 50 updates with branches at 1600, 3200 and 6400 tokens."""
    from archlab.train.loop import train
    from conftest import compose_train

    run_dir = tmp_path_factory.mktemp("trunk") / "run"
    train(compose_train(TRUNK, cache_dir), run_dir)
    return run_dir


def test_a_branch_equals_the_separate_wsd_run_bitwise(trunk, train_run, tmp_path):
    separate = tmp_path / "separate"
    train_run(separate, *WSD, "run.tokens=3200")
    branch = trunk / "branches" / "D3200"
    assert summary(branch)["fork_step"] == 20 and summary(branch)["total_steps"] == 25
    assert summary(branch)["val/loss"] == summary(separate)["val/loss"]
    assert train_losses(branch) == train_losses(separate)
    assert_same_state(branch, separate)
    # The record reads like a run's: the scaling study's reader takes it as it is.
    from archlab.scaling.records import read_run

    record = read_run(branch, continuation=False)
    assert record["tokens"] == 3200 and record["val_loss"] == summary(separate)["val/loss"]


def test_a_sigkill_during_a_branch_resumes_to_the_uninterrupted_result(trunk, tmp_path, cache_dir):
    run_dir = tmp_path / "killed"
    overrides = [*SHRINK, f"data.cache_dir={cache_dir}", *TRUNK, f"run.dir={run_dir}"]
    command = [sys.executable, "-c", "from archlab.cli import train_main; train_main()", *overrides]
    env = {**os.environ, "WANDB_SILENT": "true"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = run_dir / "branches" / ".D6400.partial"
    deadline = time.monotonic() + 300
    while not partial.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.001)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (run_dir / "branches" / "D6400").exists(), "the kill came after the branch finished"
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for name in ("D1600", "D3200", "D6400"):
        assert summary(run_dir / "branches" / name)["val/loss"] == summary(trunk / "branches" / name)["val/loss"]
        assert train_losses(run_dir / "branches" / name) == train_losses(trunk / "branches" / name)
    assert_same_state(run_dir / "branches" / "D6400", trunk / "branches" / "D6400")
    assert train_losses(run_dir) == train_losses(trunk)


def test_extending_a_trunk_equals_training_it_longer_in_one_go(trunk, train_run, tmp_path):
    run_dir = tmp_path / "extended"
    train_run(run_dir, *WSD, "run.tokens=3200", "run.branches=[1600,3200]", "run.branch_checkpoints=true")
    assert sorted(p.name for p in (run_dir / "branches").iterdir()) == ["D1600", "D3200"]
    train_run(run_dir, *TRUNK)
    assert train_losses(run_dir) == train_losses(trunk)
    assert summary(run_dir / "branches" / "D6400")["val/loss"] == summary(trunk / "branches" / "D6400")["val/loss"]
    assert_same_state(run_dir / "branches" / "D6400", trunk / "branches" / "D6400")
    assert len(list(run_dir.glob("config.*.yaml"))) == 1  # the trunk's first config, set aside
    # Anything else that changes is still a different run, and a branch the trunk has passed too.
    with pytest.raises(ConfigError, match="holds a different run"):
        train_run(run_dir, *TRUNK, "optimizer.lr=1e-2")
    short = tmp_path / "short"
    train_run(short, *WSD, "run.tokens=3200", "run.branches=[1600]")
    before = {p: p.stat().st_mtime_ns for p in short.rglob("*")}
    with pytest.raises(ConfigError, match="D3200 forks after update 20, but the trunk resumes at step 25"):
        train_run(short, *TRUNK)
    assert {p: p.stat().st_mtime_ns for p in short.rglob("*") if p.name != ".lock"} == {
        p: t for p, t in before.items() if p.name != ".lock"}  # refused before anything was written


@pytest.mark.parametrize(("branches", "extra", "message"), [
    ("[3200,1600]", [], r"run.branches must be strictly increasing, got \[3200.0, 1600.0\]"),
    ("[1600,12800]", [], r"run.branches: 12800 is beyond the trunk's budget run.tokens=6400"),
    ("[256,1600]", ["optimizer.warmup_tokens=512"], r"the branch at 256 \(2 updates\) is shorter than the warmup"),
    ("[1600,1700]", [], r"the cooldowns of 1600 \(updates 10-13\) and 1700 \(from update 11\) overlap"),
    ("[1600]", ["optimizer.schedule=cosine"], r"run.branches needs optimizer.schedule=wsd"),
    ("[1600]", ["optimizer.warmup_tokens=null"], r"run.branches needs optimizer.warmup_tokens"),
])
def test_bad_branches_are_refused_before_anything_is_built(branches, extra, message, cache_dir):
    from archlab.trainer import check_config
    from conftest import compose_train

    cfg = compose_train([*WSD, "run.tokens=6400", f"run.branches={branches}", *extra], cache_dir)
    with pytest.raises(ConfigError, match=message):
        check_config(cfg)
