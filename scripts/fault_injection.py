"""Kill a small training run with SIGKILL at random moments until it completes; compare with an uninterrupted run.

    python scripts/fault_injection.py --kills 20          # the full study (experiments/reliability/)
    python scripts/fault_injection.py --quick            # 2 kills, seconds of training (CI)

What it checks, after the run finally completes:

- the final parameters (every leaf of the final checkpoint: parameters, optimizer state, counters)
  equal bitwise those of an uninterrupted run with the same seed;
- every step appears exactly once in ``metrics.jsonl`` and its logged values (train loss, gradient
  norm, validation metrics) equal the uninterrupted run's: the rows of a killed launch after its
  last checkpoint are dropped and those steps are redone with the same data;
- the W&B run id in the final checkpoint's metadata is the id of the first launch, and every
  offline W&B directory any launch created carries that one id;
- after each kill the run directory's lock is free (``flock`` dies with its holder) and W&B's
  helper process exits; a save interrupted mid-write leaves ``<step>.orbax-checkpoint-tmp``,
  which the next launch skips and later sets aside.

Kill times come from ``random.Random(seed)``. The kills take turns: a random time after the
launch (start-up: imports, restore, W&B init, compilation; or early training); a random time
after the launch's first new step, then the next moment no save is in flight (training between
checkpoints); and a random time after the first new step, then the next moment an orbax
temporary directory is there (a checkpoint being written: at this model size, saves take longer
than the steps between them, so one is in flight most of the time). Each launch is the real ``archlab-train`` in a subprocess; a persistent JAX compilation
cache (warmed by the uninterrupted run) keeps restarts at a few seconds on a 2-core CPU.
Prints one line per kill and a summary line; exits 1 if anything diverged.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# orbax's on-disk layout is known in one place: archlab/train/checkpoint.py.
from archlab.train.checkpoint import TMP_MARK, committed_steps, saved_state_shapes

REPO = Path(__file__).resolve().parent.parent
SMALL = ["size=nano", "data.seq_len=32", "data.vocab_size=512", "run.batch_size=4", "run.eval_batches=1",
         "run.progress=false", "run.samples=0", "run.log_every=1", "logger=wandb", "logger.mode=offline"]
# Logged values that measure the machine, not the run.
TIMING_KEYS = {"train/tokens_per_s", "train/mfu"}
POLL_S = 0.002
KEEP_CHECKPOINTS = 3  # run.keep_checkpoints' default (archlab/schema.py)


@dataclass
class Settings:
    kills: int
    steps: int
    checkpoint_every: int
    eval_every: int
    startup_window: tuple[float, float]  # "startup" kills: seconds after the launch
    training_window: tuple[float, float]  # "training" kills: seconds after the launch's first new step
    checkpoint_wait: tuple[float, float]  # "checkpoint" kills: seconds after the first new step, then the next save
    modes: tuple[str, ...]  # kill i uses modes[(i - 1) % len(modes)]


FULL = Settings(kills=20, steps=1500, checkpoint_every=10, eval_every=50, startup_window=(0.2, 6.0),
                training_window=(0.0, 4.0), checkpoint_wait=(0.0, 4.0), modes=("startup", "training", "checkpoint"))
QUICK = Settings(kills=2, steps=60, checkpoint_every=4, eval_every=20, startup_window=(0.2, 3.0),
                 training_window=(0.0, 0.5), checkpoint_wait=(0.0, 0.5), modes=("training", "checkpoint"))


def environment(work: Path, cache: Path) -> dict[str, str]:
    """W&B offline and sandboxed in ``work``; a persistent JAX compilation cache shared by every launch."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(
        WANDB_MODE="offline", WANDB_SILENT="true", WANDB_CONFIG_DIR=str(work / "wandb-home" / "config"),
        WANDB_CACHE_DIR=str(work / "wandb-home" / "cache"), WANDB_DATA_DIR=str(work / "wandb-home" / "data"),
        NETRC=str(work / "wandb-home" / "netrc"),
        JAX_COMPILATION_CACHE_DIR=str(cache / "jax"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    return env


def command(settings: Settings, run_dir: Path, cache: Path) -> list[str]:
    args = [*SMALL, f"run.steps={settings.steps}", f"run.checkpoint_every={settings.checkpoint_every}",
            f"run.eval_every={settings.eval_every}", f"data.cache_dir={cache}", f"run.dir={run_dir}",
            f"logger.dir={run_dir}"]  # W&B files in run_dir/wandb/: the reference run's stay out of wandb_ids
    return [sys.executable, "-c", "from archlab.cli import train_main; train_main()", *args]


def launch(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    with log.open("a") as out:
        return subprocess.Popen(cmd, cwd=log.parent, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)


# -- what is on disk ---------------------------------------------------------------------------


def unfinished_saves(run_dir: Path, ignore: frozenset = frozenset()) -> list[str]:
    """orbax temporary directories (``<step>.orbax-checkpoint-tmp``), less ``ignore`` ((name, inode) pairs)."""
    root = run_dir / "checkpoints"
    try:
        entries = list(os.scandir(root))
    except FileNotFoundError:
        return []
    found = []
    for entry in entries:
        if entry.name.endswith(TMP_MARK):
            try:
                if (entry.name, entry.inode()) not in ignore:
                    found.append(entry.name)
            except OSError:
                continue
    return sorted(found)


def unfinished_now(run_dir: Path) -> frozenset:
    """The temporary directories already there (left by an earlier kill), as (name, inode)."""
    root = run_dir / "checkpoints"
    try:
        return frozenset((e.name, e.inode()) for e in os.scandir(root) if e.name.endswith(TMP_MARK))
    except FileNotFoundError:
        return frozenset()


def last_logged_step(run_dir: Path, since: float) -> int | None:
    """Step of the last complete row of ``metrics.jsonl`` if the file changed after ``since``."""
    path = run_dir / "metrics.jsonl"
    try:
        with path.open("rb") as f:
            if os.fstat(f.fileno()).st_mtime < since:
                return None
            f.seek(max(0, os.fstat(f.fileno()).st_size - 4096))
            lines = f.read().splitlines()
    except FileNotFoundError:
        return None
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError):
            continue
    return None


def lock_is_free(run_dir: Path) -> bool:
    path = run_dir / ".lock"
    if not path.exists():
        return True
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def helpers_of(pid: int) -> list[int]:
    """Live W&B service processes started for ``pid`` (``wandb-core ... --pid <pid>``)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state == "Z" or not argv[0].endswith(b"wandb-core") or b"--pid" not in argv[:-1]:
            continue
        if argv[argv.index(b"--pid") + 1] == str(pid).encode():
            found.append(int(entry.name))
    return found


def wait_helpers_gone(pid: int, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not helpers_of(pid):
            return True
        time.sleep(0.1)
    return False


def wandb_ids(run_dir: Path) -> list[str]:
    """The run id of each offline W&B directory, oldest first (``offline-run-<time>-<id>``)."""
    dirs = sorted((run_dir / "wandb").glob("offline-run-*"), key=lambda p: (p.stat().st_mtime, p.name))
    return [p.name.rsplit("-", 1)[1] for p in dirs]


# -- one kill ----------------------------------------------------------------------------------


def kill_trial(trial: int, settings: Settings, cmd: list[str], env: dict, run_dir: Path, log: Path,
               rng: random.Random) -> dict:
    """Launch, wait for the trial's moment, SIGKILL. Modes: "startup" (a time after the launch, which
    may fall in start-up or in training), "training" (a time after the launch's first new step,
    then the next moment no save is in flight), "checkpoint" (likewise, then the next moment a save
    this launch started is in flight)."""
    mode = settings.modes[(trial - 1) % len(settings.modes)]
    window = {"startup": settings.startup_window, "training": settings.training_window,
              "checkpoint": settings.checkpoint_wait}[mode]
    delay = rng.uniform(*window)
    resumes_from = max(committed_steps(run_dir / "checkpoints"), default=0)
    stale = unfinished_now(run_dir)  # a save this launch starts is a new directory
    started = time.time()
    t0 = time.monotonic()
    proc = launch(cmd, env, log)
    phase, anchor = None, (t0 if mode == "startup" else None)
    while proc.poll() is None:
        if anchor is None:
            step = last_logged_step(run_dir, started)
            if step is not None and step > resumes_from:
                anchor = time.monotonic()
        elif time.monotonic() - anchor >= delay:
            tmp = unfinished_saves(run_dir, stale)
            if mode == "startup" or (mode == "checkpoint") == bool(tmp):
                step = last_logged_step(run_dir, started)
                if tmp:
                    phase = f"checkpoint write ({tmp[-1]})"
                elif step is not None and step > resumes_from:
                    phase = f"training (step {step} logged)"
                else:
                    phase = "startup (no step yet)"
                proc.kill()
                break
        time.sleep(POLL_S)
    rc = proc.wait()
    elapsed = time.monotonic() - t0
    if phase is None:  # it finished before the kill
        return {"trial": trial, "time": elapsed, "phase": "finished before the kill", "killed": False,
                "outcome": f"exit {rc}", "mode": mode, "ok": rc == 0, "tmp_left": []}
    helpers_gone = wait_helpers_gone(proc.pid)
    free = lock_is_free(run_dir)
    latest = max(committed_steps(run_dir / "checkpoints"), default=0)
    tmp_left = unfinished_saves(run_dir)
    outcome = f"next launch resumes from step {latest}" if latest else "next launch starts from step 0"
    if tmp_left:
        outcome += f"; left {', '.join(tmp_left)}"
    outcome += "; lock free" if free else "; LOCK STILL HELD"
    if not helpers_gone:
        outcome += "; W&B HELPER STILL RUNNING"
    return {"trial": trial, "time": elapsed, "phase": phase, "killed": True, "outcome": outcome, "mode": mode,
            "ok": free and helpers_gone, "tmp_left": tmp_left, "lock_free": free}


# -- comparison --------------------------------------------------------------------------------


def final_checkpoint(run_dir: Path, step: int):
    from archlab.train.checkpoint import Checkpointer

    abstract = saved_state_shapes(run_dir / "checkpoints" / str(step))
    with Checkpointer(run_dir / "checkpoints", async_save=False) as checkpoints:
        return checkpoints.restore(step, abstract)


def compare_states(a, b) -> tuple[int, int, list[str]]:
    """(differing leaves, leaves, names of the first few that differ)."""
    import jax
    import numpy as np

    leaves_a = dict((jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_leaves_with_path(a))
    leaves_b = dict((jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_leaves_with_path(b))
    names = sorted(leaves_a.keys() | leaves_b.keys())
    bad = [n for n in names if n not in leaves_a or n not in leaves_b
           or np.asarray(leaves_a[n]).dtype != np.asarray(leaves_b[n]).dtype
           or not np.array_equal(np.asarray(leaves_a[n]), np.asarray(leaves_b[n]))]
    return len(bad), len(names), bad[:5]


def metric_rows(run_dir: Path) -> dict[tuple[int, str], dict]:
    rows: dict[tuple[int, str], dict] = {}
    duplicates = 0
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        kind = "val" if any(k.startswith("val/") for k in row) else "train"
        key = (row["step"], kind)
        duplicates += key in rows
        rows[key] = {k: v for k, v in row.items() if k not in TIMING_KEYS}
    rows[(-1, "duplicates")] = {"n": duplicates}
    return rows


def compare_metrics(reference: Path, faulty: Path) -> tuple[int, int, int]:
    """(rows that differ or are missing/extra, rows in the reference, duplicated rows in the faulty run)."""
    ref, got = metric_rows(reference), metric_rows(faulty)
    duplicates = got.pop((-1, "duplicates"))["n"]
    ref.pop((-1, "duplicates"))
    keys = ref.keys() | got.keys()
    return sum(ref.get(k) != got.get(k) for k in keys), len(ref), duplicates


# -- main --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, help="SIGKILLs before the run may finish (default 20; --quick: 2)")
    parser.add_argument("--quick", action="store_true", help="a CI-sized run: 60 steps, 2 kills (training, save)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    parser.add_argument("--workdir", type=Path, help="keep the runs here (default: a temporary directory)")
    parser.add_argument("--cache-dir", type=Path, help="data and JAX compilation cache (default: in the work dir)")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    if args.kills is not None:
        settings = Settings(**{**settings.__dict__, "kills": args.kills})

    scratch = None
    if args.workdir is None:
        scratch = tempfile.TemporaryDirectory(prefix="archlab-faults-")
        work = Path(scratch.name)
    else:
        work = args.workdir.resolve()
        for name in ("reference", "faulty"):
            shutil.rmtree(work / name, ignore_errors=True)
        work.mkdir(parents=True, exist_ok=True)
    try:
        return run_study(settings, args.seed, work, (args.cache_dir or work / "cache").resolve())
    finally:
        if scratch is not None:
            scratch.cleanup()


def run_study(settings: Settings, seed: int, work: Path, cache: Path) -> int:
    env = environment(work, cache)
    reference, faulty = work / "reference", work / "faulty"
    start = time.monotonic()
    print(f"fault injection: {settings.kills} kills, seed {seed}, {settings.steps} steps, "
          f"checkpoint every {settings.checkpoint_every}; work dir {work}", flush=True)
    print("command: " + " ".join(command(settings, work / "faulty", cache)[3:]), flush=True)

    t0 = time.monotonic()
    done = subprocess.run(command(settings, reference, cache), cwd=work, env=env, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        print(f"the uninterrupted run failed (exit {done.returncode}):\n{done.stderr[-3000:]}", file=sys.stderr)
        return 1
    print(f"uninterrupted run: {time.monotonic() - t0:.1f}s", flush=True)

    rng = random.Random(seed)
    cmd = command(settings, faulty, cache)
    faulty.mkdir(parents=True)
    log = work / "faulty.log"
    trials, first_id, first_id_launch = [], None, None
    print(f"{'kill':>5} {'mode':<10} {'time':>7}  {'phase':<44} outcome", flush=True)
    for trial in range(1, settings.kills + 1):
        result = kill_trial(trial, settings, cmd, env, faulty, log, rng)
        trials.append(result)
        if first_id is None and (ids := wandb_ids(faulty)):
            first_id, first_id_launch = ids[0], trial
        print(f"{trial:>5} {result['mode']:<10} {result['time']:>6.2f}s  {result['phase']:<44} {result['outcome']}",
              flush=True)
        if not result["killed"]:
            break

    t0 = time.monotonic()
    with log.open("a") as out:
        final = subprocess.run(cmd, cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    if first_id is None and (ids := wandb_ids(faulty)):
        first_id, first_id_launch = ids[0], len(trials) + 1
    print(f"final launch: exit {final.returncode} after {time.monotonic() - t0:.1f}s", flush=True)

    kills = sum(t["killed"] for t in trials)
    write_kills = sum(t["killed"] and t["phase"].startswith("checkpoint write") for t in trials)
    problems = []
    if final.returncode != 0:
        problems.append(f"the final launch failed (exit {final.returncode}); see {log}")
    if kills < settings.kills:
        problems.append(f"only {kills} of {settings.kills} kills landed before the run finished")
    if not all(t["ok"] for t in trials):
        problems.append("a kill left a held lock or a running W&B helper")

    leaves_bad = leaves = rows_bad = rows = duplicates = -1
    same_id = False
    if final.returncode == 0:
        ref_ckpt = final_checkpoint(reference, settings.steps)
        got_ckpt = final_checkpoint(faulty, settings.steps)
        leaves_bad, leaves, first_bad = compare_states(ref_ckpt.state, got_ckpt.state)
        if leaves_bad:
            problems.append(f"final state differs in {', '.join(first_bad)}")
        if ref_ckpt.data != got_ckpt.data:
            problems.append(f"data iterator state differs: {ref_ckpt.data} vs {got_ckpt.data}")
        rows_bad, rows, duplicates = compare_metrics(reference, faulty)
        ids = set(wandb_ids(faulty))
        final_id = got_ckpt.meta.get("wandb_run_id")
        same_id = final_id is not None and final_id == first_id and ids == {final_id}
        if not same_id:
            problems.append(f"W&B ids: first launch {first_id}, final checkpoint {final_id}, directories {sorted(ids)}")
    divergences = max(leaves_bad, 0) + max(rows_bad, 0) + max(duplicates, 0)
    launches = len(trials) + 1
    abandoned = len([*(faulty / "checkpoints").glob(f"*{TMP_MARK}*"), *(faulty / "checkpoints").glob("abandoned-*")])
    kept = committed_steps(faulty / "checkpoints")
    print(f"summary: kills={kills} (during a checkpoint write: {write_kills}), launches={launches}, "
          f"divergences={divergences} (state leaves {max(leaves_bad, 0)}/{leaves}, metric rows {max(rows_bad, 0)}/{rows}, "
          f"duplicate rows {max(duplicates, 0)}), same wandb id={'yes' if same_id else 'no'} "
          f"({first_id} from launch {first_id_launch}), stale locks={sum(not t.get('lock_free', True) for t in trials)}, "
          f"unfinished saves left on disk={abandoned}, wall={time.monotonic() - start:.0f}s", flush=True)
    if len(kept) > KEEP_CHECKPOINTS:
        print(f"note: {len(kept)} checkpoints on disk {kept}, more than run.keep_checkpoints={KEEP_CHECKPOINTS} "
              "(steps whose first save was killed are not rotated out)", flush=True)
    for problem in problems:
        print(f"FAILED: {problem}", flush=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
