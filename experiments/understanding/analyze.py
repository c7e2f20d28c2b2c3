"""The understanding study's table and README, from the committed results.csv.

    python experiments/understanding/analyze.py --collect   # read runs/understanding/* into results.csv first
    python experiments/understanding/analyze.py             # README.md from the committed results.csv
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # run.py, beside this script

import run as study  # noqa: E402

TABLE = HERE / "results.csv"
README = HERE / "README.md"
FIELDS = ("stage", "family", "size", "task", "lr", "seed", "split", "score", "macro_f1", "chunk_precision",
          "chunk_recall", "tag_accuracy", "val_loss", "prior_loss", "steps", "pretrain_val_loss", "pretrain_flops",
          "pretrain_params", "v2_val_loss")
T_975 = {2: 4.303, 1: 12.706}  # Student's t, 97.5th percentile, by degrees of freedom
FAMILIES = ("encoder_only", "decoder_only", "encoder_decoder")


def pretrain_record(job: dict) -> dict:
    summary = json.loads((study.source_of(job) / "summary.json").read_text())
    v2 = [r for r in study.v2_rows() if r["family"] == job["family"] and r["size"] == job["size"]
          and int(r["seed"]) == 0 and float(r["budget_flops"]) == study.BUDGET
          and r["stage"] == ("fit" if job["family"] == "decoder_only" else "families")]
    return {"pretrain_val_loss": summary["val/loss"], "pretrain_flops": summary["train_flops_total"],
            "pretrain_params": summary["params_total"], "v2_val_loss": float(v2[0]["val_loss"]) if v2 else math.nan}


def collect() -> list[dict]:
    pre = {job["family"]: pretrain_record(job) for job in study.pretrain_jobs()}
    rows = []
    for stage in ("sweep", "final"):
        for summary_file in sorted((study.RUNS / stage).glob("*/summary.json")):
            summary = json.loads(summary_file.read_text())
            name = summary_file.parent.name
            family, task, lr, seed = name.split("-")  # run.finetune_job's name: <family>-<task>-lr<lr>-s<seed>
            if "val/loss" not in summary:
                continue
            metric = study.METRIC[task]
            rows.append({
                "stage": stage, "family": family, "size": next(j["size"] for j in study.pretrain_jobs() if j["family"] == family),
                "task": task, "lr": float(lr[2:]), "seed": int(seed[1:]), "split": "dev" if stage == "sweep" else "test",
                "score": summary[metric], "macro_f1": summary.get("val/macro_f1", ""),
                "chunk_precision": summary.get("val/chunk_precision", ""), "chunk_recall": summary.get("val/chunk_recall", ""),
                "tag_accuracy": summary.get("val/tag_accuracy", ""), "val_loss": summary["val/loss"],
                "prior_loss": summary["unigram_entropy_nats"], "steps": summary["step"], **pre[family],
            })
    return rows


def write_table(rows: list[dict]) -> None:
    rows = sorted(rows, key=lambda r: (r["stage"], r["task"], r["family"], float(r["lr"]), int(r["seed"])))
    with TABLE.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def read_table() -> list[dict]:
    with TABLE.open(newline="") as f:
        return list(csv.DictReader(f))


def mean_interval(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of its 95% t-interval over seeds)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan
    return mean, T_975[len(values) - 1] * statistics.stdev(values) / math.sqrt(len(values))


def summarise(rows: list[dict]) -> dict:
    final = defaultdict(list)
    for r in rows:
        if r["stage"] == "final":
            final[(r["task"], r["family"])].append(float(r["score"]))
    out = {}
    for (task, family), scores in final.items():
        mean, half = mean_interval(scores)
        out[(task, family)] = {"scores": scores, "mean": mean, "half": half}
    return out


def render(rows: list[dict]) -> str:
    s = summarise(rows)
    pre = {r["family"]: r for r in rows}
    lines = [
        "# Understanding tasks: the three families at equal pre-training compute",
        "",
        "Every number here is printed by `python experiments/understanding/analyze.py` from the committed",
        "`results.csv`; this file is written by it.",
        "",
        "## Question",
        "",
        "The documents archlab follows say encoder-only models suit understanding. At equal pre-training",
        "compute, which family understands best at this scale, and by how much?",
        "",
        "## Design",
        "",
        "- Pre-training: each family on its own objective (decoder-only: causal LM; encoder-only: MLM;",
        f"  encoder-decoder: span corruption, L+L layers) at C = {study.BUDGET:g} training FLOPs on `data=english`,",
        "  at its own compute-optimal size there in scaling study v2's table (its lowest-loss size at that budget),",
        "  trained exactly as the v2 ladder trained it (the same trunk and cooldown branch; the branch's",
        "  checkpoint is the fine-tuning source):",
        "",
        "| family | size | parameters | pre-training FLOPs | pre-training val loss (own objective) | v2 table's loss there |",
        "|---|---|---|---|---|---|",
    ]
    for family in FAMILIES:
        if family in pre:
            r = pre[family]
            lines.append(f"| {family} | {r['size']} | {int(float(r['pretrain_params'])):,} | {float(r['pretrain_flops']):.3g} |"
                         f" {float(r['pretrain_val_loss']):.4f} | {float(r['v2_val_loss']):.4f} |")
    gaps = {f: float(r["pretrain_val_loss"]) - float(r["v2_val_loss"]) for f, r in pre.items()}
    lines += ["", "Pre-training reproduces the v2 table's point to " + ", ".join(
        f"{gap:+.4f} ({f})" for f, gap in gaps.items()) + " nats. Not bitwise for every family: the v2 points were "
        "trained by earlier commits (the decoder's trunk also resumed and extended in the ladder shift); one seed's "
        "spread at this budget in v2 is about 0.04 nats."]
    lines += [
        "",
        "- Tasks: sentence polarity (Pang & Lee 2005, 10,662 sentences; split 80/10/10 into train/dev/test with",
        "  seed 0) and CoNLL-2000 chunking (its train split 90/10 into train/dev; its own test split, 2,012",
        "  sentences, for the report).",
        "- Fine-tuning: the family's recipe (`archlab/tasks/model.py`: encoder-only and encoder-decoder read their",
        "  encoder's bidirectional states, mean-pooled for classification; decoder-only reads its causal states, the",
        "  last token for classification; tags are read at each word's last sub-word token), a fresh linear head,",
        f"  every parameter trained, {study.STEPS} updates of {study.BATCH} examples (about 1.5 epochs), AdamW with",
        "  linear decay after 10% warmup, no dropout, rows of 128 tokens, the pre-training tokenizer (BPE 512).",
        f"- Learning rate: {', '.join(f'{lr:g}' for lr in study.LRS)} at seed 0, chosen on dev; then seeds "
        f"{', '.join(map(str, study.SEEDS))} at that rate, scored on test (seed changes the head's draw and the data order).",
        "- Metrics: accuracy (polarity) and chunk F1 as conlleval scores it (seqeval); intervals are 95% t-intervals",
        "  over the 3 seeds (they hold fine-tuning noise, not pre-training noise: one pre-trained model per family).",
        "",
        "## Commands",
        "",
        "```bash",
        "pip install -e \".[study,finetune]\"",
        "python experiments/understanding/run.py prepare --corpora ../shared/corpora   # or your own copy (below)",
        "python experiments/understanding/run.py pretrain",
        "python experiments/understanding/run.py sweep",
        "python experiments/understanding/run.py final",
        "python experiments/understanding/analyze.py --collect",
        "```",
        "",
        "The two datasets are public NLTK corpora: `python -m nltk.downloader sentence_polarity conll2000`, then",
        "write `sentiment/sentence_polarity.jsonl` (one `{\"text\": \" \".join(words), \"label\": \"pos\"|\"neg\"}` per",
        "sentence of `nltk.corpus.sentence_polarity.sents(categories=...)`, pos first, then neg) and",
        "`conll2000/{train,test}.txt` (the corpus files `train.txt` and `test.txt` as they are) under one folder and",
        "pass it as `--corpora`.",
        "",
        "## Results",
        "",
        "Learning-rate sweep (seed 0, dev split):",
        "",
        "| task | family | " + " | ".join(f"lr {lr:g}" for lr in study.LRS) + " |",
        "|---|---|" + "---|" * len(study.LRS),
    ]
    sweep = {(r["task"], r["family"], float(r["lr"])): float(r["score"]) for r in rows if r["stage"] == "sweep"}
    for task in study.TASKS:
        for family in FAMILIES:
            cells = [f"{sweep[(task, family, lr)]:.4f}" if (task, family, lr) in sweep else "-" for lr in study.LRS]
            lines.append(f"| {task} | {family} | " + " | ".join(cells) + " |")
    chosen_all = {(r["task"], r["family"]): float(r["lr"]) for r in rows if r["stage"] == "final"}
    at_edge = sorted(f"{f} on {t}" for (t, f), lr in chosen_all.items() if lr in (min(study.LRS), max(study.LRS)))
    if at_edge:
        lines += ["", f"The chosen rate sits at an end of the sweep for {len(at_edge)} of {len(chosen_all)} pairs "
                  f"({', '.join(at_edge)}): the sweep does not bracket their best rate, so those scores may be "
                  "under-tuned (a wider sweep is the next step)."]
    lines += ["", "Test split, the chosen rate, 3 seeds:", "",
              "| task | metric | family | lr | seed 0 | seed 1 | seed 2 | mean | 95% interval |",
              "|---|---|---|---|---|---|---|---|---|"]
    chosen = {(r["task"], r["family"]): float(r["lr"]) for r in rows if r["stage"] == "final"}
    for task in study.TASKS:
        metric = "accuracy" if task == "polarity" else "chunk F1"
        for family in FAMILIES:
            if (task, family) not in s:
                continue
            v = s[(task, family)]
            seeds = " | ".join(f"{x:.4f}" for x in v["scores"])
            lines.append(f"| {task} | {metric} | {family} | {chosen[(task, family)]:g} | {seeds} | {v['mean']:.4f} |"
                         f" [{v['mean'] - v['half']:.4f}, {v['mean'] + v['half']:.4f}] |")
    lines += ["", "## Conclusion", ""]
    for task in study.TASKS:
        ranked = sorted((f for f in FAMILIES if (task, f) in s), key=lambda f: -s[(task, f)]["mean"])
        if len(ranked) < 2:
            continue
        best, second = ranked[0], ranked[1]
        gap = s[(task, best)]["mean"] - s[(task, second)]["mean"]
        apart = s[(task, best)]["mean"] - s[(task, best)]["half"] > s[(task, second)]["mean"] + s[(task, second)]["half"]
        lines.append(f"- {task}: {best} is best ({s[(task, best)]['mean']:.4f}), {gap:+.4f} over {second}"
                     f" ({s[(task, second)]['mean']:.4f}); their intervals {'do not overlap' if apart else 'overlap'};"
                     f" order: {' > '.join(ranked)}.")
    encoder_first = all(sorted((f for f in FAMILIES if (t, f) in s), key=lambda f: -s[(t, f)]["mean"])[0] == "encoder_only"
                        for t in study.TASKS if any((t, f) in s for f in FAMILIES))
    lines += ["", "Limits: one pre-trained model per family (the intervals hold fine-tuning noise only); models of 18K-37K "
              "parameters whose polarity accuracy stays near 0.6 (chance is 0.5); each family at its own compute-optimal "
              "size, so the decoder and the encoder-decoder have more parameters than the encoder-only model at the "
              "same FLOPs."]
    lines += ["", ("At this scale and equal pre-training compute, the encoder-only model understands best on both tasks."
                   if encoder_first else
                   "At this scale and equal pre-training compute, the encoder-only model is not the best on both tasks: "
                   "the claim that encoders suit understanding does not hold here as stated (see the orders above).")]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--collect", action="store_true", help="rebuild results.csv from runs/understanding first")
    args = parser.parse_args(argv)
    if args.collect:
        write_table(collect())
    rows = read_table()
    text = render(rows)
    README.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
