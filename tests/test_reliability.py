"""Reliability of archlab-train: signals, SIGKILL at random moments, non-finite values, the run lock, W&B failures.

Most tests drive the real CLI in a subprocess on the tiny test config. A persistent JAX
compilation cache shared by these launches keeps each restart at a few seconds.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from wandb_offline import offline_run_files
from conftest import REPO, SHRINK

TINY = [s for s in SHRINK if not s.startswith("run.steps=")]
TIMEOUT_S = 300


@pytest.fixture(scope="module")
def env(cache_dir) -> dict[str, str]:
    return {
        **{k: v for k, v in os.environ.items() if k != "WANDB_MODE"},
        "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "0",
        "JAX_COMPILATION_CACHE_DIR": str(cache_dir / "jax"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }


def train_cmd(run_dir: Path, cache_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-c", "from archlab.cli import train_main; train_main()", *TINY,
            f"data.cache_dir={cache_dir}", f"run.dir={run_dir}", *overrides]


def run(cmd: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT_S,
                          stdin=subprocess.DEVNULL)


def start(cmd: list[str], env: dict, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)


def rows(run_dir: Path) -> list[dict]:
    """Complete rows of ``metrics.jsonl`` (a line being written is skipped)."""
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def wait_for_step(proc: subprocess.Popen, run_dir: Path, after: int) -> int:
    """Wait until a train row with ``step > after`` is logged; returns its step."""
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        steps = [r["step"] for r in rows(run_dir) if "train/loss" in r and r["step"] > after]
        if steps:
            return steps[-1]
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"training exited ({proc.returncode}) before step {after + 1}:\n{out[-2000:]}\n{err[-2000:]}")
        time.sleep(0.01)
    proc.kill()
    pytest.fail(f"no step after {after} within {TIMEOUT_S}s")


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in rows(run_dir) if "train/loss" in r}


def load_checkpoint(run_dir: Path, step: int):
    """A checkpoint as saved (structure read from its own metadata)."""
    import jax
    import orbax.checkpoint as ocp

    from archlab.train.checkpoint import Checkpointer

    metadata = ocp.StandardCheckpointHandler().metadata(run_dir / "checkpoints" / str(step) / "state")
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), metadata)
    with Checkpointer(run_dir / "checkpoints", async_save=False) as checkpoints:
        return checkpoints.restore(step, abstract)


def file_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# -- signals -----------------------------------------------------------------------------------


def test_sigterm_and_sigint_checkpoint_exit_0_and_resume_bitwise(tmp_path, cache_dir, env):
    """Each signal: checkpoint at the next step boundary, say how to resume, exit 0; the
    resumed run logs exactly the losses of an uninterrupted one."""
    steps = ["run.steps=200", "run.checkpoint_every=50", "run.eval_every=100"]
    whole = run(train_cmd(tmp_path / "whole", cache_dir, *steps), env, tmp_path)
    assert whole.returncode == 0, whole.stderr[-3000:]

    split = tmp_path / "split"
    stopped = 0
    for sig in (signal.SIGTERM, signal.SIGINT):
        proc = start(train_cmd(split, cache_dir, *steps), env, tmp_path)
        wait_for_step(proc, split, after=stopped)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=TIMEOUT_S)
        assert proc.returncode == 0, err[-3000:]
        found = re.search(rf"{sig.name}: checkpoint saved at step (\d+); run the same command again to resume",
                          out + err)
        assert found, (out + err)[-3000:]
        step = int(found.group(1))
        assert stopped < step < 200
        assert (split / "checkpoints" / str(step) / "commit_success.txt").is_file()
        assert max(train_losses(split)) == step
        stopped = step

    resumed = run(train_cmd(split, cache_dir, *steps), env, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from step {stopped}" in (split / "train.log").read_text()
    assert train_losses(split) == train_losses(tmp_path / "whole")  # bitwise on the CPU
    assert sorted(train_losses(split)) == list(range(1, 201))
    val = [r for r in rows(tmp_path / "whole") if "val/loss" in r]
    assert [r for r in rows(split) if "val/loss" in r] == val


# -- SIGKILL at random moments -------------------------------------------------------------------


def test_fault_injection_quick(tmp_path, cache_dir):
    """scripts/fault_injection.py --quick: two SIGKILLs (one during training, one while a
    checkpoint is being written), then the run completes bitwise equal to an uninterrupted one."""
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "fault_injection.py"), "--quick", "--workdir", str(tmp_path),
         "--cache-dir", str(cache_dir)],
        capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (summary,) = [line for line in result.stdout.splitlines() if line.startswith("summary:")]
    assert "kills=2 " in summary and "divergences=0 " in summary, summary
    assert "same wandb id=yes" in summary and "stale locks=0" in summary, summary


# -- non-finite values ---------------------------------------------------------------------------


def test_nonfinite_stop_names_step_and_quantity_and_keeps_last_checkpoint(tmp_path, cache_dir, env):
    run_dir = tmp_path / "run"
    common = ["run.steps=8", "run.checkpoint_every=2"]

    def fails(step: int, into: str, what: str) -> None:
        bad = run(train_cmd(run_dir, cache_dir, *common, f"run.inject_nan_at_step={step}", f"run.inject_nan_into={into}"),
                  env, tmp_path)
        assert bad.returncode == 2, bad.stderr[-3000:]
        assert bad.stderr.strip().splitlines() == [
            f"archlab-train: error: non-finite {what} at step {step}; stopped without checkpointing "
            "(the last good checkpoint, step 4, is kept; run.on_nonfinite=skip skips such updates; to retry with a "
            "changed config, start over in place with run.restart=true)"
        ]
        assert max(train_losses(run_dir)) == step - 1

    fails(6, "loss", "loss")  # steps 1-5 train, 2 and 4 are saved, step 6's loss is NaN
    before = file_bytes(run_dir / "checkpoints")
    assert {p.split("/")[0] for p in before} == {"2", "4"}  # nothing saved from non-finite state
    fails(5, "gradients", "gradient norm")  # resumes from 4; step 5's gradients are NaN
    assert file_bytes(run_dir / "checkpoints") == before  # the good checkpoint is untouched


def test_nonfinite_skip_counts_skipped_updates_and_leaves_no_trace(tmp_path, cache_dir, env):
    run_dir = tmp_path / "run"
    result = run(train_cmd(run_dir, cache_dir, "run.steps=6", "run.checkpoint_every=1", "run.keep_checkpoints=6",
                           "run.on_nonfinite=skip", "run.inject_nan_at_step=3"), env, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    train_rows = [r for r in rows(run_dir) if "train/loss" in r]
    assert [r["train/skipped_updates"] for r in train_rows] == [0, 0, 1, 1, 1, 1]
    assert [math.isfinite(r["train/loss"]) for r in train_rows] == [True, True, False, True, True, True]
    assert json.loads((run_dir / "summary.json").read_text())["skipped_updates"] == 1

    before, skipped, final = (load_checkpoint(run_dir, s).state for s in (2, 3, 6))
    assert int(skipped["skipped"]) == 1 and int(skipped["first_nonfinite_step"]) == 2  # 0-based: step 3
    for part in ("params", "opt_state"):  # the skipped update changed neither parameters nor moments
        for a, b in zip(_leaves(before[part]), _leaves(skipped[part])):
            assert np.array_equal(a, b)
    assert all(np.isfinite(leaf).all() for leaf in _leaves(final["params"]))
    assert not all(np.array_equal(a, b) for a, b in zip(_leaves(skipped["params"]), _leaves(final["params"])))


def _leaves(tree) -> list[np.ndarray]:
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]


# -- the run lock --------------------------------------------------------------------------------


def test_live_run_holds_its_directory_and_a_killed_one_leaves_no_stale_lock(tmp_path, cache_dir, env):
    run_dir = tmp_path / "run"
    endless = ["run.steps=100000", "run.checkpoint_every=100000", "run.eval_every=100000"]
    holder = start(train_cmd(run_dir, cache_dir, *endless), env, tmp_path)
    try:
        wait_for_step(holder, run_dir, after=0)  # the lock is taken before the first step
        second = run(train_cmd(run_dir, cache_dir, *endless), env, tmp_path)
        assert second.returncode == 2
        assert second.stderr.strip().splitlines() == [
            f"archlab-train: error: run directory {run_dir} is in use by another archlab-train (pid {holder.pid}); "
            "wait for it or choose another run.name"
        ]
        assert holder.poll() is None  # the live run goes on
    finally:
        holder.kill()
        holder.communicate()
    assert holder.returncode == -signal.SIGKILL

    # The kernel released the flock with its holder: the directory can be taken again at once
    # (by the lock archlab-train takes; relaunching after SIGKILL is test_fault_injection_quick's).
    from archlab.train.run_dir import RunLock

    with RunLock(run_dir):
        assert (run_dir / ".lock").read_text() == str(os.getpid())


# -- W&B failures --------------------------------------------------------------------------------


# wandb.init fails for online mode (as without network); offline works. Credentials are faked present.
FAILING_WANDB = """
import wandb
from archlab.train import tracking
real_init = wandb.init
def init(*args, **kwargs):
    if kwargs.get("mode") == "online":
        raise ConnectionError("api.wandb.ai unreachable (simulated)")
    return real_init(*args, **kwargs)
wandb.init = init
tracking._has_credentials = lambda: True
from archlab.cli import train_main
train_main()
"""


def test_training_continues_when_wandb_online_init_fails(tmp_path, cache_dir, env):
    run_dir = tmp_path / "run"
    home = tmp_path / "wandb-home"
    sandbox = {**{k: v for k, v in env.items() if not k.startswith("WANDB_")}, "WANDB_SILENT": "true",
               "WANDB_CONFIG_DIR": str(home / "config"), "WANDB_CACHE_DIR": str(home / "cache"),
               "WANDB_DATA_DIR": str(home / "data"), "NETRC": str(home / "netrc")}
    cmd = [sys.executable, "-c", FAILING_WANDB, *train_cmd(run_dir, cache_dir)[3:], "logger=wandb", "logger.mode=online",
           "run.steps=3"]
    result = run(cmd, sandbox, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    warnings = [line for line in output.splitlines() if "W&B" in line]
    assert len(warnings) == 1 and "W&B online init failed (ConnectionError: api.wandb.ai unreachable" in warnings[0], output
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    (offline,) = offline_run_files(tmp_path, run_id)  # the experiment folder: run_dir's parent
    assert offline.name == f"run-{run_id}.wandb"
    assert load_checkpoint(run_dir, 3).meta["wandb_run_id"] == run_id
    assert sorted(train_losses(run_dir)) == [1, 2, 3]
