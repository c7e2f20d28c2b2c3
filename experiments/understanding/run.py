"""The understanding study's runner: pre-train each family at one budget, fine-tune it on two tasks.

    python experiments/understanding/run.py prepare --corpora ../shared/corpora   # the task splits
    python experiments/understanding/run.py pretrain   # each family's best size at C=8e11, as the v2 ladder ran it
    python experiments/understanding/run.py sweep      # learning rates x3 per family and task, seed 0, on dev
    python experiments/understanding/run.py final      # the best rate, seeds 0-2, scored on the test split
    python experiments/understanding/run.py STAGE --list   # print the commands only

A job whose summary.json exists is skipped; one cut short resumes from its checkpoint (rerun the
same command). Runs go to ``runs/understanding/<stage>/<name>``, their logs beside them.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
V2 = REPO / "experiments" / "scaling_laws" / "v2"
sys.path.insert(0, str(V2))  # the v2 study's design and ladder (scripts, not a package)

import design  # noqa: E402
import ladder  # noqa: E402

RUNS = REPO / "runs" / "understanding"
DATA = RUNS / "data"
BUDGET = 8e11  # one of the v2 ladder's budgets where every family has an interior-ish optimum and runs are short
OBJECTIVES = {"decoder_only": "clm", "encoder_only": "mlm", "encoder_decoder": "span_corruption"}
TASKS = {"polarity": "classification", "chunking": "tagging"}
LRS = (1e-3, 3e-3, 1e-2)
SEEDS = (0, 1, 2)
STEPS, BATCH = 400, 32  # ~1.5 epochs of either training split
SPLIT_SEED = 0


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_conll(path: Path, sentences: list[list[str]]) -> None:
    path.write_text("".join("\n".join(lines) + "\n\n" for lines in sentences))


def conll_sentences(path: Path) -> list[list[str]]:
    sentences, current = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            current.append(line)
        elif current:
            sentences.append(current)
            current = []
    return sentences + ([current] if current else [])


def prepare(corpora: Path) -> None:
    """Sentence polarity split 80/10/10 (train/dev/test); CoNLL-2000's train split 90/10 (train/dev), its test as test."""
    DATA.mkdir(parents=True, exist_ok=True)
    polarity = [json.loads(line) for line in (corpora / "sentiment" / "sentence_polarity.jsonl").read_text().splitlines()]
    random.Random(SPLIT_SEED).shuffle(polarity)
    n = len(polarity)
    cut = [int(0.8 * n), int(0.9 * n)]
    for name, rows in (("train", polarity[:cut[0]]), ("dev", polarity[cut[0]:cut[1]]), ("test", polarity[cut[1]:])):
        write_jsonl(DATA / f"polarity-{name}.jsonl", [{"text": r["text"], "label": r["label"]} for r in rows])
    train = conll_sentences(corpora / "conll2000" / "train.txt")
    random.Random(SPLIT_SEED).shuffle(train)
    held = len(train) // 10
    write_conll(DATA / "chunking-train.txt", train[held:])
    write_conll(DATA / "chunking-dev.txt", train[:held])
    write_conll(DATA / "chunking-test.txt", conll_sentences(corpora / "conll2000" / "test.txt"))
    counts = {p.name: sum(1 for _ in p.open()) for p in sorted(DATA.glob("polarity-*.jsonl"))}
    counts.update({p.name: len(conll_sentences(p)) for p in sorted(DATA.glob("chunking-*.txt"))})
    print(json.dumps(counts))


def v2_rows() -> list[dict]:
    with (V2 / "results.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def best_size(family: str) -> str:
    """The family's lowest-loss size at BUDGET in the committed v2 table (seed 0; its own objective)."""
    stage = "fit" if family == "decoder_only" else "families"
    rows = [r for r in v2_rows() if r["family"] == family and r["stage"] == stage and int(r["seed"]) == 0
            and float(r["budget_flops"]) == BUDGET]
    if not rows:
        raise SystemExit(f"error: no {family} row at C={BUDGET:g} in {V2 / 'results.csv'}")
    return min(rows, key=lambda r: float(r["val_loss"]))["size"]


def pretrain_jobs() -> list[dict]:
    """The v2 trunk of each family's best size, cut at BUDGET, its branch there checkpointed.

    The same budgets up to BUDGET as the v2 trunk (the rule file sets batch and warmup from the smallest),
    so the cooled-down branch at BUDGET is the run the v2 table scored."""
    jobs = []
    for family, objective in OBJECTIVES.items():
        size = best_size(family)
        if family == "decoder_only":
            budgets = [b for b in design.budgets_of(size) if b <= BUDGET]
            extra = [*design.EVAL, "rules=ladder_v2"]
        else:
            budgets = [b for b in ladder.FAMILY_BUDGETS if b <= BUDGET]
            extra = [*design.EVAL, "rules=ladder_v2", f"objective={objective}"]
        job = ladder.trunk(f"{family}-{size}", size, budgets, [*extra, "run.branch_checkpoints=true"], family=family)
        job.update(family=family, stage="pretrain", done=f"branches/C{BUDGET:g}/summary.json")
        jobs.append(job)
    return jobs


def source_of(job: dict) -> Path:
    return RUNS / "pretrain" / job["name"] / "branches" / f"C{BUDGET:g}"


def finetune_job(pre: dict, task_name: str, lr: float, seed: int, split: str, stage: str) -> dict:
    task = TASKS[task_name]
    suffix = "jsonl" if task == "classification" else "txt"
    overrides = [
        f"model={pre['family']}", f"objective={OBJECTIVES[pre['family']]}", *design.size_overrides(pre["size"]),
        "data.seq_len=128", "data.vocab_size=512", "logger=none", "run.progress=false", "run.samples=0",
        f"task={task}", f"task.train={DATA / f'{task_name}-train.{suffix}'}",
        f"task.validation={DATA / f'{task_name}-{split}.{suffix}'}", f"model.init_from={source_of(pre)}",
        f"run.steps={STEPS}", f"run.batch_size={BATCH}", f"run.eval_every={STEPS}", f"run.checkpoint_every={STEPS // 2}",
        "run.keep_checkpoints=1", f"optimizer.lr={lr:g}", "optimizer.schedule=linear", "optimizer.warmup_fraction=0.1",
        "optimizer.final_lr_fraction=0.0", f"run.seed={seed}", f"run.name={pre['family']}-{task_name}-lr{lr:g}-s{seed}",
    ]
    return {"name": f"{pre['family']}-{task_name}-lr{lr:g}-s{seed}", "overrides": overrides, "stage": stage,
            "family": pre["family"], "task": task_name, "lr": lr, "seed": seed, "split": split, "size": pre["size"],
            "done": "summary.json"}


def sweep_jobs() -> list[dict]:
    return [finetune_job(pre, t, lr, 0, "dev", "sweep") for pre in pretrain_jobs() for t in TASKS for lr in LRS]


METRIC = {"polarity": "val/accuracy", "chunking": "val/chunk_f1"}


def best_lr(family: str, task_name: str) -> float:
    """The sweep's rate with the best dev score (all three must have finished)."""
    scores = {}
    for job in sweep_jobs():
        if job["family"] == family and job["task"] == task_name:
            summary = RUNS / "sweep" / job["name"] / "summary.json"
            if not summary.is_file():
                raise SystemExit(f"error: the sweep has not finished {job['name']}; run the sweep stage first")
            scores[job["lr"]] = json.loads(summary.read_text())[METRIC[task_name]]
    return max(scores, key=scores.get)


def final_jobs() -> list[dict]:
    return [finetune_job(pre, t, best_lr(pre["family"], t), s, "test", "final")
            for pre in pretrain_jobs() for t in TASKS for s in SEEDS]


STAGES = {"pretrain": pretrain_jobs, "sweep": sweep_jobs, "final": final_jobs}


def run_stage(stage: str, jobs: list[dict], list_only: bool) -> None:
    failed = []
    for job in jobs:
        run_dir = RUNS / stage / job["name"]
        command = [sys.executable, "-c", "from archlab.cli import train_main; train_main()", *job["overrides"],
                   f"run.dir={run_dir}"]
        if list_only:
            print(" ".join(f"'{a}'" if any(c in a for c in "[]{}, ") else a for a in command[3:]))
            continue
        if (run_dir / job["done"]).is_file():
            print(json.dumps({"job": job["name"], "status": "finished"}), flush=True)
            continue
        log = RUNS / stage / "_logs" / f"{job['name']}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with log.open("a") as out:
            rc = subprocess.run(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT).returncode
        print(json.dumps({"job": job["name"], "rc": rc, "seconds": round(time.perf_counter() - start, 1)}), flush=True)
        if rc != 0:
            failed.append(f"{job['name']} exited {rc}; see {log}")
    if failed:
        raise SystemExit("error: " + "; ".join(failed))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["prepare", *STAGES])
    parser.add_argument("--corpora", type=Path, default=REPO.parent / "shared" / "corpora",
                        help="a folder holding sentiment/sentence_polarity.jsonl and conll2000/{train,test}.txt")
    parser.add_argument("--list", action="store_true", help="print each job's overrides and exit")
    args = parser.parse_args(argv)
    if args.stage == "prepare":
        prepare(args.corpora)
        return
    run_stage(args.stage, STAGES[args.stage](), args.list)


if __name__ == "__main__":
    main()
