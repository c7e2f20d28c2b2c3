"""Run a scaling sweep's runs as parallel ``archlab-train`` processes on one machine, resumably.

    python experiments/scaling_laws/v1/run_sweep.py sweep=scaling_encoder --sizes nano,micro,tiny,mini,small,small_plus \\
        --budgets 1e11,3e11,1e12 --jobs 4 [--cores-per-job 2] [--max-epochs 4] [--lr-from runs/.../lr_choice.json]
    python experiments/scaling_laws/v1/run_sweep.py sweep=scaling_decoder --sizes nano,micro --budgets 3e11 \\
        --lrs 1e-3,3e-3,1e-2 --pick-lr runs/scaling_decoder_lr/lr_choice.json   # a learning-rate sweep

``archlab-train -m sweep=NAME`` runs the same grid one run after another (2 CPU cores: the
budget the README states). This runner is for a machine with more cores or a GPU: it starts up to
``--jobs`` runs at once, each pinned to its own ``--cores-per-job`` cores (or sharing the one GPU,
each process allocating GPU memory on demand), skips runs whose directory already holds a finished
summary, and skips (and lists) any run that would read more than ``--max-epochs`` epochs of its
corpus. Every run is an ordinary ``archlab-train`` run: same config, same directory, same records.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from archlab.scaling.records import run_finished

REPO = Path(__file__).resolve().parents[3]


def grid(args) -> list[list[str]]:
    """One override list per run: sizes x budgets (x learning rates)."""
    lrs = args.lrs.split(",") if args.lrs else [None]
    chosen = json.loads(Path(args.lr_from).read_text()) if args.lr_from else {}
    runs = []
    for size in args.sizes.split(","):
        for budget in args.budgets.split(","):
            for lr in lrs:
                overrides = [*args.overrides, f"size={size}", f"run.flops={budget}"]
                lr = lr or chosen.get(size)
                if lr is not None:
                    overrides.append(f"optimizer.lr={lr}")
                runs.append(overrides)
    return runs


_CORPORA: dict = {}


def plan_of(overrides: list[str]) -> tuple[Path, float]:
    """(run directory, epochs it would read) without training."""
    from archlab.trainer import compose

    from archlab.train.setup import load_corpus, make_plan, row_length_for

    cfg = compose([*overrides, "logger=none"])
    key = json.dumps([cfg.data.source, dict(cfg.data.options), cfg.data.vocab_size, row_length_for(cfg)], sort_keys=True)
    if key not in _CORPORA:  # one tokenized corpus per data config, not one per run
        _CORPORA[key] = load_corpus(cfg.data, row_length_for(cfg))
    corpus = _CORPORA[key]
    plan = make_plan(cfg, corpus.tokenizer.vocab_size)
    # As archlab/conf/train.yaml's hydra.run.dir, anchored at the repository (the runs' working directory).
    run_dir = REPO / (cfg.run.dir or Path("runs") / cfg.experiment / cfg.run.name)
    return run_dir, plan.token_budget / corpus.train.n_tokens


def launch(overrides: list[str], cores: list[int] | None, log_path: Path) -> subprocess.Popen:
    command = [sys.executable, "-c", "from archlab.cli import train_main; train_main()", *overrides]
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")  # runs sharing one GPU allocate on demand
    preexec = (lambda: os.sched_setaffinity(0, cores)) if cores is not None else None
    log_path.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=log_path.open("w"), stderr=subprocess.STDOUT,
                            preexec_fn=preexec)


def pick_lr(run_dirs: dict[str, Path], out: Path) -> dict[str, str]:
    """The learning rate with the lowest final validation loss, per size."""
    best: dict[str, tuple[float, str]] = {}
    for name, run_dir in run_dirs.items():
        summary = json.loads((run_dir / "summary.json").read_text())
        size = yaml.safe_load((run_dir / "config.yaml").read_text())["size_name"]
        lr = next(o.split("=", 1)[1] for o in name.split("|") if o.startswith("optimizer.lr="))
        loss = float(summary["val/loss"])
        if math.isfinite(loss) and (size not in best or loss < best[size][0]):
            best[size] = (loss, lr)
    choice = {size: lr for size, (_, lr) in best.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(choice, indent=2) + "\n")
    print(json.dumps({"lr_choice": choice, "val_loss": {s: l for s, (l, _) in best.items()}}), flush=True)
    return choice


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides shared by every run (e.g. sweep=NAME)")
    parser.add_argument("--sizes", required=True)
    parser.add_argument("--budgets", required=True)
    parser.add_argument("--lrs", help="comma-separated learning rates: a learning-rate sweep")
    parser.add_argument("--lr-from", help="JSON {size: lr} from an earlier --pick-lr")
    parser.add_argument("--pick-lr", help="after a --lrs sweep, write the best lr per size to this JSON")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--cores-per-job", type=int, default=0, help="pin each run to this many CPU cores (0: no pinning)")
    parser.add_argument("--first-core", type=int, default=0)
    parser.add_argument("--max-epochs", type=float, default=4.0)
    args = parser.parse_intermixed_args(argv)
    if args.pick_lr and not args.lrs:
        parser.error("--pick-lr needs --lrs")

    pending, skipped, done = [], [], {}
    for overrides in grid(args):
        run_dir, epochs = plan_of(overrides)
        key = "|".join(overrides)
        if epochs > args.max_epochs:
            skipped.append({"run": run_dir.name, "epochs": round(epochs, 2)})
        elif run_finished(run_dir):
            done[key] = run_dir
        else:
            pending.append((key, overrides, run_dir))
    print(json.dumps({"runs": len(pending) + len(done), "already_finished": len(done),
                      "skipped_over_max_epochs": skipped}), flush=True)

    free_slots = list(range(args.jobs))
    running: dict[int, tuple[subprocess.Popen, str, Path, float]] = {}
    failures = []
    while pending or running:
        while pending and free_slots:
            slot = free_slots.pop(0)
            key, overrides, run_dir = pending.pop(0)
            cores = None
            if args.cores_per_job:
                first = args.first_core + slot * args.cores_per_job
                cores = list(range(first, first + args.cores_per_job))
            log_path = run_dir.parent / "_logs" / f"{run_dir.name}.log"
            running[slot] = (launch(overrides, cores, log_path), key, run_dir, time.perf_counter())
        time.sleep(0.5)
        for slot, (process, key, run_dir, start) in list(running.items()):
            if process.poll() is None:
                continue
            del running[slot]
            free_slots.append(slot)
            ok = process.returncode == 0 and run_finished(run_dir)
            print(json.dumps({"run": run_dir.name, "ok": ok, "seconds": round(time.perf_counter() - start, 1)}),
                  flush=True)
            if ok:
                done[key] = run_dir
            else:
                failures.append(run_dir.name)
    if args.pick_lr:
        pick_lr(done, Path(args.pick_lr))
    if failures:
        raise SystemExit(f"error: {len(failures)} run(s) failed: {', '.join(failures)} (logs under runs/*/_logs/)")


if __name__ == "__main__":
    main()
