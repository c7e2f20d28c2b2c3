"""The corruption campaign: damage every file of a checkpoint step in every way, then resume and evaluate.

    python scripts/corruption_campaign.py --workdir /tmp/corruption   # writes experiments/reliability/corruption.*

A small decoder-only run is trained to step 60 without interruption (the reference), and once more
stopped at step 40 (checkpoints at 20 and 40: the template). For every file of step 40 and every
corruption that applies to it (truncate to half, zero every byte, delete, flip one bit, XOR 16
bytes; for JSON files also valid JSON that is not what was saved), a copy of the template is
damaged, then

- evaluated newest-first (``archlab.evaluate.evaluate``, what ``archlab-eval checkpoint=<run>`` runs):
  the damage must be detected (a warning naming step 40) and step 20 scored instead, with the loss
  the undamaged step 20 gives; and
- resumed to step 60 (``archlab.train.loop.train``, what rerunning ``archlab-train`` runs): the
  damage must be detected, step 40 set aside, training resumed from step 20, and the final state
  (every leaf) and every metric row (throughput columns aside) must equal the reference bitwise.

A damaged file that neither reader opens cannot make a result wrong: such a case passes as
*harmless* only when neither reader warns, evaluation scores step 40 with the loss the undamaged
step 40 gives, nothing is set aside, and the resumed run again equals the reference bitwise (for
OCDBT these are the per-process database's own manifest and superseded tree nodes, which the
merged root manifest no longer references).

Both run in this one process (so each shape compiles once), on the real code paths. The table and
a summary go to ``experiments/reliability/corruption.csv`` and ``corruption.md``.
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import json
import logging
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "experiments" / "reliability"
SMALL = ["size=nano", "data.seq_len=32", "data.vocab_size=512", "run.batch_size=4", "run.eval_batches=1",
         "run.progress=false", "run.samples=0", "run.log_every=1", "logger=none", "run.steps=60",
         "run.checkpoint_every=20", "run.eval_every=20", "run.keep_checkpoints=5"]
DAMAGED_STEP, GOOD_STEP = 40, 20
THROUGHPUT = ("train/tokens_per_s", "train/mfu")


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def zero(path: Path) -> None:
    path.write_bytes(bytes(path.stat().st_size))


def delete(path: Path) -> None:
    path.unlink()


def flip_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def xor16(path: Path) -> None:
    data = bytearray(path.read_bytes())
    start = max(0, len(data) // 2 - 8)
    for i in range(start, min(len(data), start + 16)):
        data[i] ^= 0xA5
    path.write_bytes(bytes(data))


def wrong_json(path: Path) -> None:
    path.write_text(json.dumps({"hello": 1}))


CORRUPTIONS = {"truncate": truncate, "zero": zero, "delete": delete, "flip_bit": flip_bit, "xor16": xor16,
               "wrong_json": wrong_json}


def is_json(path: Path) -> bool:
    try:
        json.loads(path.read_bytes().decode("utf-8"))
        return True
    except ValueError:
        return False


def applicable(path: Path) -> list[str]:
    size = path.stat().st_size
    kinds = ["delete"] + (["truncate", "zero", "flip_bit", "xor16"] if size else [])
    return kinds + (["wrong_json"] if size and is_json(path) else [])


class Warnings(logging.Handler):
    """Every WARNING archlab logs while a case runs."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def compose(run_dir: Path, cache: Path, *extra: str):
    from archlab.trainer import compose as compose_config

    return compose_config([*SMALL, f"data.cache_dir={cache}", f"run.dir={run_dir}", *extra])


def metric_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{k: v for k, v in r.items() if k not in THROUGHPUT} for r in rows]


def final_leaves(run_dir: Path, step: int) -> list[np.ndarray]:
    import jax
    import orbax.checkpoint as ocp

    from archlab.train.checkpoint import Checkpointer

    metadata = ocp.StandardCheckpointHandler().metadata(run_dir / "checkpoints" / str(step) / "state")
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), metadata)
    with Checkpointer(run_dir / "checkpoints", async_save=False) as checkpoints:
        state = checkpoints.restore(step, abstract).state
    return [np.asarray(x) for x in jax.tree.leaves(state)]


def evaluate_newest(run_dir: Path) -> dict:
    from archlab.evaluate import evaluate
    from archlab.trainer import compose as compose_config

    cfg = compose_config([f"checkpoint={run_dir}", "batches=2", "samples=0", "logger=none"], app="eval")
    (result,) = evaluate(cfg)
    return result


def run_case(template: Path, case_dir: Path, cache: Path, relative: str, kind: str, reference: dict,
             handler: Warnings) -> dict:
    from archlab.train.loop import train

    shutil.copytree(template, case_dir)
    CORRUPTIONS[kind](case_dir / "checkpoints" / str(DAMAGED_STEP) / relative)
    row = {"file": relative, "corruption": kind}

    handler.messages.clear()
    try:
        result = evaluate_newest(case_dir)
        row["eval_step"] = result["step"]
        # Step 40 scored: right only if its loss is the undamaged step 40's (a harmless case).
        expected = reference["eval_loss_step_40" if result["step"] == DAMAGED_STEP else "eval_loss_step_20"]
        row["eval_loss_matches"] = result["eval/loss"] == expected
        row["eval_detected"] = any(f"step {DAMAGED_STEP}" in m for m in handler.messages)
    except Exception as error:  # noqa: BLE001 - recorded as the case's outcome
        row.update(eval_step="", eval_loss_matches=False, eval_detected=False,
                   eval_error=f"{type(error).__name__}: {' '.join(str(error).split())[:160]}")

    handler.messages.clear()
    try:
        summary = train(compose(case_dir, cache), case_dir)
        row["resume_detected"] = any(f"step {DAMAGED_STEP}" in m for m in handler.messages)
        row["set_aside"] = ",".join(e["name"].rsplit("-", 1)[0] for e in summary.get("set_aside", []))
        row["metrics_equal"] = metric_rows(case_dir) == reference["rows"]
        leaves = final_leaves(case_dir, 60)
        row["state_equal"] = len(leaves) == len(reference["leaves"]) and all(
            a.dtype == b.dtype and np.array_equal(a, b) for a, b in zip(leaves, reference["leaves"]))
    except Exception as error:  # noqa: BLE001
        row.update(resume_detected=False, set_aside="", metrics_equal=False, state_equal=False,
                   resume_error=f"{type(error).__name__}: {' '.join(str(error).split())[:160]}")
    warning = next((m for m in handler.messages if f"step {DAMAGED_STEP}" in m), "")
    row["warning"] = re.sub(r"-\d{12,}", "-<ns>", warning.replace(str(case_dir), "<run>"))[:240]
    same_results = all(row.get(k) is True for k in ("eval_loss_matches", "metrics_equal", "state_equal"))
    detected = row.get("eval_detected") is True and row.get("resume_detected") is True
    unread = (row.get("eval_detected") is False and row.get("resume_detected") is False and not row.get("set_aside")
              and row.get("eval_step") == DAMAGED_STEP)
    row["outcome"] = ("detected" if same_results and detected and row["eval_step"] == GOOD_STEP
                      else "harmless" if same_results and unread else "FAILED")
    row["ok"] = row["outcome"] != "FAILED"
    shutil.rmtree(case_dir)
    return row


FIELDS = ("file", "corruption", "eval_detected", "eval_step", "eval_loss_matches", "resume_detected", "set_aside",
          "metrics_equal", "state_equal", "outcome", "ok", "warning", "eval_error", "resume_error")


def write_outputs(rows: list[dict], seconds: float, command: str, *, write: bool) -> str:
    """The summary; with ``write``, it and the table replace the committed outputs (full campaigns only)."""
    if write:
        with (OUT / "corruption.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS)
            writer.writeheader()
            writer.writerows({k: row.get(k, "") for k in FIELDS} for row in rows)
    ok = sum(r["ok"] for r in rows)
    harmless = sorted({r["file"] for r in rows if r["outcome"] == "harmless"})
    files = sorted({r["file"] for r in rows})
    by_kind = {k: (sum(r["ok"] for r in rows if r["corruption"] == k), sum(r["corruption"] == k for r in rows))
               for k in CORRUPTIONS}
    lines = [
        "# Corruption campaign: every file of a checkpoint step, damaged every way",
        "",
        f"Written by `{command}` (wall time {seconds:.0f} s); every row is in `corruption.csv`.",
        "",
        f"A decoder-only nano run (60 steps, checkpoints every 20) is stopped at step {DAMAGED_STEP}; each case "
        f"damages one file of step {DAMAGED_STEP} one way, then evaluates the run newest-first and resumes it to "
        f"step 60. A case passes when both readers name step {DAMAGED_STEP} in a warning, evaluation scores step "
        f"{GOOD_STEP} with the loss the undamaged step {GOOD_STEP} gives, the resume sets step {DAMAGED_STEP} aside, "
        "and the resumed run's every metric row (throughput aside) and every leaf of its final state equal the "
        "uninterrupted run's bitwise. A damage that no reader sees passes as harmless only when the results "
        f"are those of the undamaged step {DAMAGED_STEP}: evaluation scores it with its own loss, nothing is set "
        "aside, and the resumed run equals the uninterrupted one bitwise.",
        "",
        f"**Result: {ok} of {len(rows)} cases pass** ({len(files)} files x the corruptions that apply to each): "
        f"{sum(r['outcome'] == 'detected' for r in rows)} detected and recovered from step {GOOD_STEP}, "
        f"{sum(r['outcome'] == 'harmless' for r in rows)} harmless, "
        f"{sum(r['outcome'] == 'FAILED' for r in rows)} failed.",
        "",
        *([f"Harmless: damage to {len(harmless)} file(s) that no reader opens "
           f"({', '.join(f'`{f}`' for f in harmless)}): orbax writes each process's OCDBT database in "
           "`ocdbt.process_<i>/`, then merges it under the item's root manifest, which references the "
           "value files and no longer the per-process manifest or its superseded tree nodes.", ""]
          if harmless else []),
        "| corruption | cases passed |",
        "|---|---|",
        *(f"| {k} | {p} / {n} |" for k, (p, n) in by_kind.items() if n),
        "",
    ]
    failed = [r for r in rows if not r["ok"]]
    if failed:
        lines += ["Cases that did not pass:", "", "| file | corruption | what happened |", "|---|---|---|"]
        for r in failed:
            what = "; ".join(f"{k}={r.get(k)}" for k in ("eval_detected", "eval_step", "eval_loss_matches",
                                                         "resume_detected", "metrics_equal", "state_equal"))
            what += "".join(f"; {k}: {r[k]}" for k in ("eval_error", "resume_error") if r.get(k))
            lines.append(f"| `{r['file']}` | {r['corruption']} | {what} |")
        lines.append("")
    lines += ["Files of a step, each damage's outcome and the first warning it gave (on resume):", "",
              "| file | corruption | outcome | warning |", "|---|---|---|---|"]
    lines += [f"| `{r['file']}` | {r['corruption']} | {r['outcome']} | {r['warning'].replace('|', '/')} |"
              for r in rows]
    text = "\n".join(lines) + "\n"
    if write:
        (OUT / "corruption.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True, help="scratch directory (must not exist)")
    parser.add_argument("--limit", type=int, help="only the first N cases (a quick look; nothing is written)")
    parser.add_argument("--files", help="only the step's files matching this glob, e.g. '*commit_success.txt' "
                                        "(nothing is written)")
    args = parser.parse_args(argv)
    if args.workdir.exists():
        parser.error(f"--workdir {args.workdir} exists; give a new directory")
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be at least 1, got {args.limit}")
    start = time.perf_counter()
    from archlab.train.loop import train

    cache, work = args.workdir / "cache", args.workdir
    handler = Warnings()
    logging.getLogger("archlab").addHandler(handler)
    logging.getLogger("archlab").setLevel(logging.INFO)

    reference_dir, template = work / "reference", work / "template"
    train(compose(reference_dir, cache), reference_dir)
    train(compose(template, cache, f"run.stop_at_step={DAMAGED_STEP}"), template)
    good = work / "good20"
    shutil.copytree(template, good)
    shutil.rmtree(good / "checkpoints" / str(DAMAGED_STEP))
    undamaged = work / "undamaged"
    shutil.copytree(template, undamaged)
    reference = {"rows": metric_rows(reference_dir), "leaves": final_leaves(reference_dir, 60),
                 "eval_loss_step_20": evaluate_newest(good)["eval/loss"],
                 "eval_loss_step_40": evaluate_newest(undamaged)["eval/loss"]}

    step_dir = template / "checkpoints" / str(DAMAGED_STEP)
    files = sorted(str(p.relative_to(step_dir)) for p in step_dir.rglob("*") if p.is_file())
    if args.files is not None:
        files = [f for f in files if fnmatch.fnmatch(f, args.files)]
        if not files:
            print(f"--files {args.files!r} matches no file of step {DAMAGED_STEP}", file=sys.stderr)
            return 2
    cases = [(f, kind) for f in files for kind in applicable(step_dir / f)][: args.limit]
    rows = []
    for i, (relative, kind) in enumerate(cases):
        row = run_case(template, work / f"case{i:03d}", cache, relative, kind, reference, handler)
        rows.append(row)
        print(json.dumps({"case": i, "of": len(cases), "file": relative, "corruption": kind, "ok": row["ok"]}),
              flush=True)
    full = args.limit is None and args.files is None
    print(write_outputs(rows, time.perf_counter() - start, "python scripts/corruption_campaign.py --workdir <new dir>",
                        write=full))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
