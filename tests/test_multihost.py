"""A run over two processes on this machine (``jax.distributed`` with a local coordinator, 2 CPU devices each).

The test starts every process itself (``archlab-train`` in subprocesses; the CPU device count is
fixed when JAX starts) and kills them all if any is still alive when it ends. One sequence covers
the issue's contract: FSDP 2 x data 2 over the two processes matches one process with 4 devices;
a run stopped at step 3 and relaunched ends bitwise where the uninterrupted one does (the step-5
checksums, which cover every state leaf); one process with 1 device restores the checkpoint and
scores it to the same validation loss.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

TRAIN = ["size=nano", "data.seq_len=32", "data.vocab_size=512", "run.batch_size=8", "run.steps=5",
         "logger=none", "run.progress=false", "run.log_every=1", "run.eval_every=5", "run.checkpoint_every=5",
         "run.samples=0", "mesh.fsdp=2"]
TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def environment(devices: int, cache_dir: Path) -> dict[str, str]:
    return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu",
            "ARCHLAB_CACHE": str(cache_dir), "WANDB_SILENT": "true"}


def train_command(*overrides: str) -> list[str]:
    return [sys.executable, "-c", "from archlab.cli import train_main; train_main()", *TRAIN, *overrides]


def launch_two(run_dir: Path, cache_dir: Path, *overrides: str) -> list[str]:
    """``archlab-train`` as processes 0 and 1 of one run; both must exit 0. Returns their output."""
    port = free_port()
    processes = [
        subprocess.Popen(train_command(f"run.dir={run_dir}", f"data.cache_dir={cache_dir}", *overrides,
                                       f"distributed.coordinator_address=localhost:{port}",
                                       "distributed.num_processes=2", f"distributed.process_id={rank}"),
                         env=environment(2, cache_dir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         stdin=subprocess.DEVNULL, text=True)
        for rank in (0, 1)
    ]
    try:
        outputs = [p.communicate(timeout=TIMEOUT_S)[0] for p in processes]
    finally:
        for p in processes:  # a hung or failed peer must not outlive the test
            if p.poll() is None:
                p.kill()
                p.wait()
    for rank, (p, out) in enumerate(zip(processes, outputs)):
        assert p.returncode == 0, f"process {rank} exited {p.returncode}:\n{out[-4000:]}"
    return outputs


def losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row["train/loss"] for row in rows if "train/loss" in row]


def state_digests(run_dir: Path, step: int) -> dict:
    return json.loads((run_dir / "checkpoints" / str(step) / "integrity" / "checksums.json").read_text())["state"]


def test_two_processes_train_resume_and_restore_on_one_device(tmp_path):
    cache = tmp_path / "cache"
    reference = tmp_path / "one-process"
    result = subprocess.run(train_command(f"run.dir={reference}", f"data.cache_dir={cache}"),
                            env=environment(4, cache), capture_output=True, text=True, timeout=TIMEOUT_S,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-4000:]

    whole, stopped = tmp_path / "two-processes", tmp_path / "two-processes-resumed"
    outputs = launch_two(whole, cache)
    assert len(losses(reference)) == 5
    for ours, theirs in zip(losses(whole), losses(reference), strict=True):
        assert math.isclose(ours, theirs, rel_tol=1e-5), (losses(whole), losses(reference))
    # Process 0 tells the story (the other only warns); the checkpoint holds both processes' shards.
    assert "process 0 of 2 joined the run (explicit): 2 local devices of 4" in outputs[0]
    assert "mesh data 2 x fsdp 2" in outputs[0] and "mesh data" not in outputs[1]
    assert sorted(p.name for p in (whole / "checkpoints" / "5" / "state").glob("ocdbt.process_*")) == \
        ["ocdbt.process_0", "ocdbt.process_1"]

    launch_two(stopped, cache, "run.stop_at_step=3")
    assert [p.name for p in (stopped / "checkpoints").iterdir()] == ["3"]
    launch_two(stopped, cache)
    assert losses(stopped) == losses(whole)
    assert state_digests(stopped, 5) == state_digests(whole, 5)  # every leaf, bitwise

    score = ("import json, sys, jax; from archlab.trainer import Trainer; t = Trainer.restore(sys.argv[1]); "
             "print(json.dumps({'devices': jax.device_count(), 'step': t.restored_step, **t.evaluate()}))")
    result = subprocess.run([sys.executable, "-c", score, str(whole)], env=environment(1, cache),
                            capture_output=True, text=True, timeout=TIMEOUT_S, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-4000:]
    scored = json.loads(result.stdout.strip().splitlines()[-1])
    assert (scored["devices"], scored["step"]) == (1, 5)
    saved = json.loads((whole / "summary.json").read_text())["val/loss"]
    assert math.isclose(scored["val/loss"], saved, rel_tol=1e-5), (scored, saved)


@pytest.mark.parametrize("overrides, message", [
    (["distributed.coordinator_address=localhost:1234"], "is set without distributed.num_processes"),
    (["distributed.coordinator_address=localhost", "distributed.num_processes=2", "distributed.process_id=0"],
     "must be host:port"),
    (["distributed.coordinator_address=localhost:1234", "distributed.num_processes=2", "distributed.process_id=2"],
     "must be in 0 .. 1"),
    (["distributed.cluster=none", "distributed.process_id=0"], "does not read it"),
    (["distributed.cluster=local"], "must be one of auto, slurm, none"),
])
def test_bad_distributed_keys_are_refused(overrides, message):
    from archlab.errors import ConfigError
    from archlab.trainer import compose

    with pytest.raises(ConfigError, match=message):
        compose(overrides)


def test_cluster_slurm_outside_slurm_is_refused(monkeypatch):
    from archlab.errors import ConfigError
    from archlab.schema import DistributedConfig
    from archlab.train.distributed import SLURM_VARIABLES, launch_mode

    for name in SLURM_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match="inside a SLURM job step"):
        launch_mode(DistributedConfig(cluster="slurm"))
    assert launch_mode(DistributedConfig()) == "single"
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_STEP_NODELIST", "node[001-002]")
    monkeypatch.setenv("SLURM_NTASKS", "16")
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_LOCALID", "3")
    assert launch_mode(DistributedConfig()) == "slurm"  # auto: a job step of 16 tasks
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert launch_mode(DistributedConfig()) == "single"  # one task: alone
    assert launch_mode(DistributedConfig(cluster="none")) == "single"
