"""Study v2's calibration: from the calibration runs to the rule file every later run reads.

    python experiments/scaling_laws/v2/calibration.py            # reads runs/scaling_v2/calibrate
    python experiments/scaling_laws/v2/calibration.py --table    # from the committed calibration.csv only

Per (size, beta2, budget) the best learning rate is the vertex of a parabola in log lr through
the best of the x0.5/x1/x2/x4 members and its two neighbours (the best member itself when it is
at an edge, flagged); moved to batch 16 by the square-root rule; per size, the geometric mean
over its budgets; the rule's law ``lr = lr0 * (N / 1e5) ** k * (batch / 16) ** 0.5`` is the
least-squares line through the sizes in log-log. beta2 is
the one whose best losses are lower on average over the beta2 size's budgets. Writes
``calibration.csv`` (every branch), ``calibration.json`` (the fits) and ``archlab/conf/rules/ladder_v2.yaml``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
sys.path.insert(0, str(HERE))

import ladder  # noqa: E402

TABLE = HERE / "calibration.csv"
FITS = HERE / "calibration.json"
RULE = REPO / "archlab" / "conf" / "rules" / "ladder_v2.yaml"
COLUMNS = ("job", "size", "params_total", "budget_flops", "lr", "b2", "batch_size", "warmup_tokens",
           "total_steps", "val_loss", "val_bits_per_byte")
LR_ANCHOR = 1e5
# Sizes whose smallest budget forces a smaller batch take a smaller rate: best rates are moved to
# batch BATCH_ANCHOR by Adam's square-root rule (Malladi et al. 2022) before the law in N is fitted,
# and the rule applies the same term to the batch it picks.
BATCH_ANCHOR, BATCH_EXPONENT = 16, 0.5


def collect(root: Path) -> list[dict]:
    """One row per finished calibration branch."""
    rows = []
    for config in sorted(root.glob("*/members/*/branches/*/config.yaml")):
        branch = config.parent
        cfg = yaml.safe_load(config.read_text())
        summary = json.loads((branch / "summary.json").read_text())
        rows.append({
            "job": branch.parents[3].name, "size": cfg["size_name"], "params_total": summary["params_total"],
            "budget_flops": cfg["run"]["flops"], "lr": cfg["optimizer"]["lr"], "b2": cfg["optimizer"]["b2"],
            "batch_size": cfg["run"]["batch_size"], "warmup_tokens": cfg["optimizer"]["warmup_tokens"],
            "total_steps": summary["total_steps"], "val_loss": summary["val/loss"],
            "val_bits_per_byte": summary["val/bits_per_byte"],
        })
    return rows


def write_table(rows: list[dict]) -> None:
    rows = sorted(rows, key=lambda r: (r["job"], r["budget_flops"], r["lr"]))
    with TABLE.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def read_table() -> list[dict]:
    with TABLE.open(newline="") as f:
        return [{k: (v if k in ("job", "size") else float(v)) for k, v in row.items()} for row in csv.DictReader(f)]


def best_lr(lrs: np.ndarray, losses: np.ndarray) -> tuple[float, float, bool]:
    """(lr at the minimum, loss there, whether the minimum is interior) from one lr sweep."""
    order = np.argsort(lrs)
    x, y = np.log(lrs[order]), losses[order]
    i = int(np.argmin(y))
    if i == 0 or i == len(x) - 1:
        return float(np.exp(x[i])), float(y[i]), False
    a, b, c = np.polyfit(x[i - 1:i + 2], y[i - 1:i + 2], 2)
    vertex = -b / (2 * a)
    return float(np.exp(vertex)), float(np.polyval([a, b, c], vertex)), True


def fit(rows: list[dict]) -> dict:
    sweeps = defaultdict(list)
    for r in rows:
        sweeps[(r["size"], r["b2"], r["budget_flops"])].append(r)
    per_sweep = []
    for (size, b2, budget), group in sorted(sweeps.items(), key=lambda kv: (kv[1][0]["params_total"], kv[0][1:])):
        lr, loss, interior = best_lr(np.array([g["lr"] for g in group]), np.array([g["val_loss"] for g in group]))
        batch = int(group[0]["batch_size"])
        per_sweep.append({"size": size, "params_total": int(group[0]["params_total"]), "b2": b2, "budget": budget,
                          "batch_size": batch, "best_lr": lr,
                          "best_lr_at_anchor_batch": lr * (BATCH_ANCHOR / batch) ** BATCH_EXPONENT,
                          "best_loss": loss, "interior": interior, "members": len(group)})
    default_b2 = min(s["b2"] for s in per_sweep)
    sizes = defaultdict(list)
    for s in per_sweep:
        if s["b2"] == default_b2:
            sizes[(s["params_total"], s["size"])].append(s["best_lr_at_anchor_batch"])
    n = np.array([k[0] for k in sorted(sizes)], dtype=float)
    lr = np.array([math.exp(np.mean(np.log(sizes[k]))) for k in sorted(sizes)])
    k, log_lr0 = np.polyfit(np.log(n / LR_ANCHOR), np.log(lr), 1)
    b2_losses = defaultdict(dict)
    for s in per_sweep:
        b2_losses[(s["size"], s["budget"])][s["b2"]] = s["best_loss"]
    paired = [v for v in b2_losses.values() if len(v) > 1]
    b2_mean = {b2: float(np.mean([v[b2] for v in paired])) for b2 in (paired[0] if paired else {default_b2: 0})}
    chosen_b2 = min(b2_mean, key=b2_mean.get) if paired else default_b2
    return {"per_sweep": per_sweep, "per_size_lr": {s: float(v) for (_, s), v in zip(sorted(sizes), lr)},
            "lr_law": {"lr": float(math.exp(log_lr0)), "lr_params": LR_ANCHOR, "lr_exponent": float(k),
                       "lr_batch": BATCH_ANCHOR, "lr_batch_exponent": BATCH_EXPONENT},
            "b2_mean_best_loss": {str(b): v for b, v in b2_mean.items()}, "b2": float(chosen_b2)}


def write_rule(fits: dict) -> None:
    prior = yaml.safe_load((REPO / "archlab" / "conf" / "rules" / "ladder_v2_prior.yaml").read_text())
    rule = {**prior, "name": "ladder_v2", **fits["lr_law"], "b2": fits["b2"], "calibration": {
        "command": "python experiments/scaling_laws/v2/ladder.py calibrate && "
                   "python experiments/scaling_laws/v2/calibration.py",
        "results": "experiments/scaling_laws/v2/calibration.csv",
        "fits": "experiments/scaling_laws/v2/calibration.json",
        "per_size_lr": fits["per_size_lr"], "b2_mean_best_loss": fits["b2_mean_best_loss"],
        "prior": "ladder_v2_prior",
    }}
    header = ("# Scaling study v2's per-size hyperparameters, written by experiments/scaling_laws/v2/calibration.py\n"
              "# from the calibration sweep (see calibration.command); every field is read by archlab/train/rules.py.\n")
    RULE.write_text(header + yaml.safe_dump(rule, sort_keys=False))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", action="store_true", help="use the committed calibration.csv")
    args = parser.parse_args(argv)
    if not args.table:
        write_table(collect(ladder.RUNS / "calibrate"))
    fits = fit(read_table())
    FITS.write_text(json.dumps(fits, indent=2) + "\n")
    write_rule(fits)
    for s in fits["per_sweep"]:
        print(f"{s['size']:>4} b2={s['b2']} C={s['budget']:.3g} batch {s['batch_size']}: best lr {s['best_lr']:.3g} "
              f"({'interior' if s['interior'] else 'EDGE'}) loss {s['best_loss']:.4f}")
    law = fits["lr_law"]
    print(f"lr = {law['lr']:.3g} * (N/1e5)^{law['lr_exponent']:.3f} * (batch/16)^0.5; beta2 {fits['b2']} "
          f"(mean best loss {fits['b2_mean_best_loss']})")


if __name__ == "__main__":
    main()
