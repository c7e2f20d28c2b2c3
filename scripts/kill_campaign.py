"""The kill campaign beyond training: SIGKILL evaluation and cooldown branches at random moments.

    python scripts/kill_campaign.py --workdir /tmp/kills    # writes experiments/reliability/kills.md

``scripts/fault_injection.py`` kills a training run; this script kills the two other writers of a
run directory, each relaunched with the same command until it finishes:

- **evaluation**: ``archlab-eval checkpoint=<run> all_steps=true`` over a trained run's six
  checkpoints, killed at a random moment after start-up or after its first scored step. When it
  finally completes, ``eval.json`` and ``eval_logs/metrics.jsonl`` must hold exactly one entry per
  step with the values of an uninterrupted evaluation, the checkpoints must be byte for byte as
  they were (evaluation only reads), and ``eval.json.lock`` must be free after every kill;
- **cooldown branches**: a constant-rate trunk with two cooldown branches (``run.branches``,
  ``run.branch_checkpoints=true``), killed at a random moment while a branch is being written
  (``branches/.<name>.partial`` exists) or while only the trunk trains. When it completes, the
  trunk's final state and metric rows, and every branch's summary, metric rows and final state,
  must equal those of an uninterrupted run bitwise, with no partial or replaced branch left.

Kill moments come from ``random.Random(seed)``; every launch is the real command in a subprocess
(W&B offline, a shared JAX compilation cache). Prints one line per kill and writes the summary.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

from fault_injection import (SMALL, TIMING_KEYS, compare_metrics, compare_states, environment, final_checkpoint,
                             launch, lock_is_free, wait_helpers_gone)

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "experiments" / "reliability"
POLL_S = 0.002
TRAIN = "from archlab.cli import train_main; train_main()"
EVAL = "from archlab.cli import eval_main; eval_main()"

EVAL_RUN = ["run.steps=60", "run.checkpoint_every=10", "run.eval_every=30", "run.keep_checkpoints=6"]
EVAL_ARGS = ["all_steps=true", "batches=2", "samples=1", "max_new_tokens=8", "logger=wandb", "logger.mode=offline"]
# 128 tokens per update: a 240-update trunk, branches at 9,600 and 19,200 tokens (75 and 150 updates)
TRUNK = ["optimizer.schedule=wsd", "optimizer.warmup_tokens=1280", "run.tokens=30720", "run.branches=[9600,19200]",
         "run.branch_checkpoints=true", "run.checkpoint_every=20", "run.eval_every=60"]
PATH_KEYS = {"run", "branch_of"}  # values naming the directory they were written in


def python(code: str, args: list[str]) -> list[str]:
    return [sys.executable, "-c", code, *args]


def kill_at(cmd: list[str], env: dict, log: Path, ready, delay: float) -> tuple[bool, str, int]:
    """Launch ``cmd``; once ``ready()`` returns a phase name, wait ``delay`` s and SIGKILL if ``ready()``
    still names a phase. Returns (killed, phase at the kill or 'finished', pid)."""
    proc = launch(cmd, env, log)
    anchor = None
    while proc.poll() is None:
        phase = ready()
        if phase is not None and anchor is None:
            anchor = time.monotonic()
        if anchor is not None and time.monotonic() - anchor >= delay and phase is not None:
            proc.kill()
            proc.wait()
            return True, phase, proc.pid
        time.sleep(POLL_S)
    return False, f"finished (exit {proc.returncode})", proc.pid


def file_digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def flock_is_free(path: Path) -> bool:
    if not path.exists():
        return True
    with path.open("a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(f, fcntl.LOCK_UN)
    return True


def rows_by_step(path: Path) -> tuple[dict[tuple[int, str], dict], int]:
    """Rows of a metrics file by (step, training or evaluation row), throughput aside, and how many
    of them appear more than once."""
    rows, duplicates = {}, 0
    for line in path.read_text().splitlines():
        row = json.loads(line)
        key = (row["step"], "eval" if any(k.startswith(("val/", "eval/")) for k in row) else "train")
        duplicates += key in rows
        rows[key] = {k: v for k, v in row.items() if k not in TIMING_KEYS}
    return rows, duplicates


def without_paths(entry: dict) -> dict:
    return {k: v for k, v in entry.items() if k not in PATH_KEYS}


# -- evaluation ---------------------------------------------------------------------------------


def eval_campaign(work: Path, cache: Path, env: dict, kills: int, rng: random.Random) -> tuple[list[str], list[str]]:
    """Returns (report lines, problems)."""
    trained = work / "trained"
    done = subprocess.run(python(TRAIN, [*SMALL, *EVAL_RUN, f"data.cache_dir={cache}", f"run.dir={trained}"]),
                          cwd=work, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if done.returncode:
        return [], [f"training the run to evaluate failed (exit {done.returncode}): {done.stderr[-2000:]}"]
    reference, faulty = work / "eval_reference", work / "eval_faulty"
    for target in (reference, faulty):
        shutil.copytree(trained, target)
    t0 = time.monotonic()
    done = subprocess.run(python(EVAL, [f"checkpoint={reference}", *EVAL_ARGS]), cwd=work, env=env,
                          capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if done.returncode:
        return [], [f"the uninterrupted evaluation failed (exit {done.returncode}): {done.stderr[-2000:]}"]
    uninterrupted = time.monotonic() - t0
    before = file_digests(faulty / "checkpoints")
    cmd = python(EVAL, [f"checkpoint={faulty}", *EVAL_ARGS])
    eval_rows = faulty / "eval_logs" / "metrics.jsonl"
    lines = [f"uninterrupted evaluation: {uninterrupted:.1f}s", "",
             "| kill | mode | delay | phase at the kill | eval.json.lock free | W&B helper gone |", "|---|---|---|---|---|---|"]
    problems, landed = [], 0
    for trial in range(1, kills + 1):
        mode = ("startup", "scoring")[trial % 2]
        launched = time.time()

        def scored_since_launch() -> str | None:
            try:
                if eval_rows.stat().st_mtime < launched:
                    return None
                last = eval_rows.read_text().splitlines()[-1]
                return f"after step {json.loads(last)['step']} was logged"
            except (FileNotFoundError, IndexError, ValueError, KeyError):
                return None

        if mode == "startup":
            ready = lambda: "start-up or scoring"  # noqa: E731 - counted from the launch
            delay = rng.uniform(0.5, 0.8 * uninterrupted)
        else:
            ready, delay = scored_since_launch, rng.uniform(0.0, 1.5)
        killed, phase, pid = kill_at(cmd, env, work / "eval_faulty.log", ready, delay)
        if killed:
            landed += 1
            phase = scored_since_launch() or "before any step was logged"
        free, gone = flock_is_free(faulty / "eval.json.lock"), wait_helpers_gone(pid)
        if not (free and gone):
            problems.append(f"kill {trial}: lock free {free}, W&B helper gone {gone}")
        lines.append(f"| {trial} | {mode} | {delay:.2f}s | {phase} | {free} | {gone} |")
        if not killed:
            break
    final = subprocess.run(cmd, cwd=work, env=env, stdout=(work / "eval_faulty.log").open("a"),
                           stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    if final.returncode:
        problems.append(f"the final evaluation failed (exit {final.returncode})")
        return lines, problems
    if landed < kills:
        problems.append(f"only {landed} of {kills} kills landed before the evaluation finished")
    want = {k: without_paths(e) for k, e in json.loads((reference / "eval.json").read_text()).items()}
    got = {k: without_paths(e) for k, e in json.loads((faulty / "eval.json").read_text()).items()}
    if got != want:
        problems.append("eval.json differs from the uninterrupted evaluation's")
    ref_rows, _ = rows_by_step(reference / "eval_logs" / "metrics.jsonl")
    got_rows, duplicates = rows_by_step(eval_rows)
    differing = sum(ref_rows.get(s) != got_rows.get(s) for s in ref_rows.keys() | got_rows.keys())
    if differing or duplicates:
        problems.append(f"eval_logs/metrics.jsonl: {differing} steps differ, {duplicates} duplicated")
    if file_digests(faulty / "checkpoints") != before:
        problems.append("the checkpoints changed under evaluation")
    lines += ["", f"Summary: {landed} kills landed; eval.json holds {len(got)} entries (uninterrupted: {len(want)}), "
              f"{'equal' if got == want else 'NOT equal'}; eval_logs/metrics.jsonl: "
              f"{len(got_rows)} steps, {differing} differing, {duplicates} duplicated; checkpoints byte-identical: "
              f"{file_digests(faulty / 'checkpoints') == before}."]
    return lines, problems


# -- cooldown branches --------------------------------------------------------------------------


def branch_campaign(work: Path, cache: Path, env: dict, kills: int, rng: random.Random) -> tuple[list[str], list[str]]:
    reference, faulty = work / "trunk_reference", work / "trunk_faulty"
    args = lambda d: [*SMALL, *TRUNK, f"data.cache_dir={cache}", f"run.dir={d}"]  # noqa: E731
    t0 = time.monotonic()
    done = subprocess.run(python(TRAIN, args(reference)), cwd=work, env=env, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL)
    if done.returncode:
        return [], [f"the uninterrupted trunk failed (exit {done.returncode}): {done.stderr[-2000:]}"]
    uninterrupted = time.monotonic() - t0
    names = sorted(p.name for p in (reference / "branches").iterdir())
    cmd = python(TRAIN, args(faulty))
    lines = [f"uninterrupted trunk with branches {', '.join(names)}: {uninterrupted:.1f}s", "",
             "| kill | mode | delay | phase at the kill | run lock free | W&B helper gone |", "|---|---|---|---|---|---|"]
    problems, landed = [], 0

    def branch_in_progress() -> str | None:
        try:
            partial = sorted(p.name for p in (faulty / "branches").iterdir() if p.name.endswith(".partial"))
        except FileNotFoundError:
            return None
        return f"writing branch {partial[0][1:-len('.partial')]}" if partial else None

    for trial in range(1, kills + 1):
        done_branches = [n for n in names if (faulty / "branches" / n).is_dir()]
        # two kills in three land in a branch while one is left to write (a resumed trunk redoes a killed one)
        mode = "branch" if trial % 3 and len(done_branches) < len(names) else "trunk"
        launched = time.time()

        def trunk_training() -> str | None:
            """The trunk (no branch being written) has logged a step since this launch."""
            try:
                logged = (faulty / "metrics.jsonl").stat().st_mtime >= launched
            except FileNotFoundError:
                return None
            return "trunk training" if logged and not branch_in_progress() else None

        if mode == "branch":
            ready, delay = branch_in_progress, rng.uniform(0.0, 1.0)
        else:
            ready, delay = trunk_training, rng.uniform(0.0, 2.0)
        killed, phase, pid = kill_at(cmd, env, work / "trunk_faulty.log", ready, delay)
        landed += killed
        free, gone = lock_is_free(faulty), wait_helpers_gone(pid)
        if not (free and gone):
            problems.append(f"kill {trial}: lock free {free}, W&B helper gone {gone}")
        lines.append(f"| {trial} | {mode} | {delay:.2f}s | {phase} | {free} | {gone} |")
        if not killed:
            break
    final = subprocess.run(cmd, cwd=work, env=env, stdout=(work / "trunk_faulty.log").open("a"),
                           stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    if final.returncode:
        problems.append(f"the final launch failed (exit {final.returncode})")
        return lines, problems
    if landed < kills:
        problems.append(f"only {landed} of {kills} kills landed before the run finished")
    steps = max(int(p.name) for p in (reference / "checkpoints").iterdir() if p.name.isdigit())
    bad, leaves, first = compare_states(final_checkpoint(reference, steps).state, final_checkpoint(faulty, steps).state)
    rows_bad, rows, duplicates = compare_metrics(reference, faulty)
    if bad or rows_bad or duplicates:
        problems.append(f"trunk: {bad}/{leaves} leaves differ ({', '.join(first)}), {rows_bad}/{rows} rows, "
                        f"{duplicates} duplicated")
    leftovers = sorted(p.name for p in (faulty / "branches").iterdir() if p.name not in names)
    if leftovers:
        problems.append(f"left in branches/: {', '.join(leftovers)}")
    branch_notes = []
    for name in names:
        ref, got = reference / "branches" / name, faulty / "branches" / name
        if not got.is_dir():
            problems.append(f"branch {name} is missing")
            continue
        summaries_equal = (without_paths(json.loads((ref / "summary.json").read_text()))
                           == without_paths(json.loads((got / "summary.json").read_text())))
        ref_rows, _ = rows_by_step(ref / "metrics.jsonl")
        got_rows, branch_duplicates = rows_by_step(got / "metrics.jsonl")
        differing = sum(ref_rows.get(s) != got_rows.get(s) for s in ref_rows.keys() | got_rows.keys())
        end = max(int(p.name) for p in (ref / "checkpoints").iterdir() if p.name.isdigit())
        leaves_bad, n_leaves, _ = compare_states(final_checkpoint(ref, end).state, final_checkpoint(got, end).state)
        if not summaries_equal or differing or branch_duplicates or leaves_bad:
            problems.append(f"branch {name}: summary equal {summaries_equal}, {differing} rows differ, "
                            f"{branch_duplicates} duplicated, {leaves_bad}/{n_leaves} leaves differ")
        branch_notes.append(f"{name}: summary {'equal' if summaries_equal else 'DIFFERS'}, {len(got_rows)} rows "
                            f"({differing} differ), final state {n_leaves - leaves_bad}/{n_leaves} leaves equal")
    during = sum(1 for line in lines if "writing branch" in line)
    lines += ["", f"Summary: {landed} kills landed ({during} while a branch was written); trunk {leaves - bad}/{leaves} "
              f"leaves and {rows - rows_bad}/{rows} metric rows equal, {duplicates} duplicated; "
              + "; ".join(branch_notes) + f"; left in branches/: {', '.join(leftovers) or 'nothing'}."]
    return lines, problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True, help="scratch directory (must not exist)")
    parser.add_argument("--kills", type=int, default=9, help="kills of each campaign (default 9)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    parser.add_argument("--only", choices=("eval", "branch"), help="run one campaign (nothing is written)")
    args = parser.parse_args(argv)
    if args.workdir.exists():
        parser.error(f"--workdir {args.workdir} exists; give a new directory")
    if args.kills < 1:
        parser.error(f"--kills must be at least 1, got {args.kills}")
    work = args.workdir.resolve()
    work.mkdir(parents=True)
    cache = work / "cache"
    env = environment(work, cache)
    rng = random.Random(args.seed)
    start = time.monotonic()
    sections, problems = [], []
    for name, campaign in (("eval", eval_campaign), ("branch", branch_campaign)):
        if args.only not in (None, name):
            continue
        lines, found = campaign(work, cache, env, args.kills, rng)
        title = {"eval": "Evaluation (`archlab-eval all_steps=true`)", "branch": "Cooldown branches (`run.branches`)"}
        section = [f"## {title[name]}", "", *lines, "", *(f"- FAILED: {p}" for p in found), ""]
        print("\n".join(section), flush=True)
        sections += section
        problems += found
    command = f"python scripts/kill_campaign.py --workdir <new dir> --kills {args.kills} --seed {args.seed}"
    verdict = "every check passed" if not problems else f"{len(problems)} problem(s)"
    text = "\n".join(["# Kill campaign: evaluation and cooldown branches", "",
                      f"Written by `{command}` (wall time {time.monotonic() - start:.0f} s): {verdict}.", "",
                      (__doc__ or "").split("\n\n", 2)[2].split("\n\nKill moments")[0], "", *sections])
    if args.only is None:
        (OUT / "kills.md").write_text(text + "\n")
    print(f"{verdict}", flush=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
