"""Many members per process (archlab/train/members.py): a packed member trains as its separate run
does (loss curve within 1e-5 relative), a stopped pack resumes to the uninterrupted one, members
compose with cooldown branches, and a bad run.members is refused before anything is built."""

import json
from pathlib import Path

import numpy as np
import pytest

from archlab.errors import ConfigError

# 128 tokens per step, 10 updates, a 2-update warmup, a 3-update cooldown.
WSD = ["optimizer.schedule=wsd", "optimizer.warmup_tokens=256", "optimizer.cooldown_fraction=0.3", "run.tokens=1280",
       "run.eval_every=5", "run.checkpoint_every=5"]
MEMBERS = "run.members=[{seed:0,lr:3e-3},{seed:1,lr:1e-2},{seed:2,lr:3e-3}]"


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path, key: str = "train/loss") -> np.ndarray:
    return np.array([row[key] for row in rows(run_dir) if key in row])


def member_dir(pack: Path, lr: str, seed: int) -> Path:
    (found,) = (pack / "members").glob(f"*-lr{lr}-s{seed}")
    return found


@pytest.fixture(scope="module")
def pack(tmp_path_factory, cache_dir) -> Path:
    from archlab.train.loop import train
    from conftest import compose_train

    run_dir = tmp_path_factory.mktemp("pack") / "run"
    train(compose_train([*WSD, MEMBERS], cache_dir), run_dir)
    return run_dir


@pytest.mark.parametrize(("lr", "seed"), [("0.01", 1), ("0.003", 2)])
def test_a_packed_member_trains_as_its_separate_run(pack, train_run, tmp_path, lr, seed):
    separate = tmp_path / "separate"
    train_run(separate, *WSD, f"optimizer.lr={lr}", f"run.seed={seed}")
    member = member_dir(pack, lr, seed)
    np.testing.assert_allclose(losses(member), losses(separate), rtol=1e-5)
    np.testing.assert_allclose(losses(member, "val/loss"), losses(separate, "val/loss"), rtol=1e-5)
    np.testing.assert_allclose(losses(member, "train/lr"), losses(separate, "train/lr"), rtol=1e-6)
    summary = json.loads((member / "summary.json").read_text())
    assert summary["step"] == summary["total_steps"] == 10
    # A member's directory is a run directory: its config is its own, and it evaluates as one.
    from archlab.trainer import Trainer

    restored = Trainer.restore(member)
    assert restored.cfg.run.seed == seed and restored.cfg.run.members == [] and restored.restored_step == 10


def test_a_stopped_pack_resumes_to_the_uninterrupted_one(pack, train_run, tmp_path):
    split = tmp_path / "split"
    train_run(split, *WSD, MEMBERS, "run.stop_at_step=5")
    assert "step" not in json.loads((member_dir(split, "0.01", 1) / "summary.json").read_text())
    train_run(split, *WSD, MEMBERS)
    for lr, seed in (("0.003", 0), ("0.01", 1), ("0.003", 2)):
        assert list(losses(member_dir(split, lr, seed))) == list(losses(member_dir(pack, lr, seed)))  # bitwise


def test_members_compose_with_branches(train_run, tmp_path):
    run_dir = tmp_path / "ladder"
    train_run(run_dir, *WSD, "run.branches=[640,1280]", "run.members=[{seed:0},{seed:1}]")
    separate = tmp_path / "separate"
    train_run(separate, *WSD[:3], "run.tokens=640", "run.eval_every=5", "run.checkpoint_every=5", "run.seed=1")
    branch = member_dir(run_dir, "0.003", 1) / "branches" / "D640"
    np.testing.assert_allclose(losses(branch), losses(separate), rtol=1e-5)
    assert json.loads((branch / "summary.json").read_text())["val/loss"] == pytest.approx(
        json.loads((separate / "summary.json").read_text())["val/loss"], rel=1e-5)


@pytest.mark.parametrize(("members", "extra", "message"), [
    ("[{seed:1}]", ["optimizer.schedule=cosine"], r"run.members needs optimizer.schedule=wsd"),
    ("[{seed:1,d_model:32}]", [], r"run.members\[0\] must set seed and/or lr"),
    ("[{seed:1},{seed:1}]", [], r"run.members repeats a member"),
    ("[{lr:-1}]", [], r"run.members\[0\].lr must be a positive number, got -1.0"),
])
def test_bad_members_are_refused_before_anything_is_built(members, extra, message, cache_dir):
    from archlab.trainer import check_config
    from conftest import compose_train

    cfg = compose_train([*WSD, f"run.members={members}", *extra], cache_dir)
    with pytest.raises(ConfigError, match=message):
        check_config(cfg)
