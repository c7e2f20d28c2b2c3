"""Study v2's analysis: from the committed results table to fits.json, the plots and README.md.

    python experiments/scaling_laws/v2/analyze.py --collect   # read runs/scaling_v2/* into results.csv first
    python experiments/scaling_laws/v2/analyze.py --collect --stages families   # only that stage's rows
    python experiments/scaling_laws/v2/analyze.py             # everything from the committed results.csv
    python experiments/scaling_laws/v2/analyze.py --lock      # also write prediction.json (refused if it exists)

Every number in README.md is printed here; the README is written from them (see report.py).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import analysis  # noqa: E402
import design  # noqa: E402
import ladder  # noqa: E402

TABLE = HERE / "results.csv"
FITS = HERE / "fits.json"
PREDICTION = HERE / "prediction.json"
PLOTS = HERE / "plots"
EXTRA = ("stage", "trunk", "b2", "batch_size", "warmup_tokens", "continuation_bpb")
TABLE_STAGES = ("fit", "heldout", "families")  # calibration has its own table (calibration.csv)
TEXT_FIELDS = ("experiment", "run", "family", "objective", "size", "data_source", "stage", "trunk")


def collect(stages: list[str]) -> list[dict]:
    """One row per finished branch under runs/scaling_v2/<stage>/ (members included)."""
    import yaml

    from archlab.scaling.records import read_run

    rows = []
    for stage in stages:
        for summary in sorted((ladder.RUNS / stage).glob("**/branches/*/summary.json")):
            branch = summary.parent
            record = read_run(branch, continuation=False)
            if record is None:
                continue
            saved = yaml.safe_load((branch / "config.yaml").read_text())
            values = json.loads(summary.read_text())
            trunk = branch.parents[1]
            # a fit trunk extended to the held-out budget keeps that branch in its own directory
            own_stage = "heldout" if float(record["budget_flops"]) == design.HELD_OUT_BUDGET else stage
            record.update(stage=own_stage, trunk=trunk.name, b2=saved["optimizer"]["b2"],
                          batch_size=saved["run"]["batch_size"], warmup_tokens=saved["optimizer"]["warmup_tokens"],
                          continuation_bpb=values.get("continuation/bits_per_byte", math.nan))
            rows.append(record)
    return rows


def merge(committed: list[dict], collected: list[dict], stages: list[str]) -> list[dict]:
    """The committed table with every collected trunk's rows replaced by what its run directory holds now.

    A trunk's rows are only ever replaced from its own runs, so a machine that holds some trunks' run
    directories (a fresh clone that ran ``ladder.py families --only ...``) keeps the committed rows of
    every other trunk, of this stage and the others. A fit trunk extended to the held-out budget yields
    its held-out branches too, so they are replaced with it."""
    replaced = {r["trunk"] for r in collected}
    return [r for r in committed if r["trunk"] not in replaced] + collected


def fields() -> tuple[str, ...]:
    from archlab.scaling.records import FIELDS

    return tuple(dict.fromkeys((*FIELDS, *EXTRA)))  # continuation_bpb is in both


def write_table(rows: list[dict]) -> None:
    rows = sorted(rows, key=lambda r: (r["stage"], r["family"], float(r["budget_flops"]), float(r["params_total"]),
                                       int(r["seed"])))
    with TABLE.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields())
        writer.writeheader()
        writer.writerows({k: r.get(k, "") for k in fields()} for r in rows)


def read_table(path: Path = TABLE, raw: bool = False) -> list[dict]:
    """The table's rows, numbers parsed (``raw``: as written, so a merge rewrites them unchanged)."""
    with path.open(newline="") as f:
        if raw:
            return list(csv.DictReader(f))
        return [{k: (v if k in TEXT_FIELDS else float(v) if v != "" else math.nan) for k, v in row.items()}
                for row in csv.DictReader(f)]


def fit_rows(rows: list[dict]) -> list[dict]:
    """The IsoFLOP points: the fit stage's decoder-only branches, every seed (a point is its seeds' mean)."""
    return [r for r in rows if r["stage"] == "fit" and r["family"] == "decoder_only"]


def design_checks(rows: list[dict]) -> dict:
    """The constraints the study was designed to meet, measured on the table."""
    pts = fit_rows(rows)
    profs = analysis.profiles(pts, "total")
    budgets = sorted({float(r["budget_flops"]) for r in pts})
    return {
        "fit_budgets": len(budgets),
        "decades": math.log10(budgets[-1] / budgets[0]) if budgets else 0.0,
        "min_sizes_per_budget": min(len(p.points) for p in profs),
        "min_sizes_each_side_of_minimum": min(min(p.sides()) for p in profs),
        "min_updates": int(min(r["total_steps"] for r in rows)),
        "max_epochs": float(max(r["epochs"] for r in rows)),
        "held_out_over_largest_fit": design.HELD_OUT_BUDGET / budgets[-1] if budgets else 0.0,
    }


def analyse(rows: list[dict], resamples: int) -> dict:
    pts = fit_rows(rows)
    noise = analysis.seed_noise(pts)
    out = {"design": design_checks(rows), "seed_noise": noise, "conventions": {}}
    for convention in analysis.CONVENTIONS:
        profs = analysis.profiles(pts, convention)
        front = analysis.frontier(profs)
        c_held = analysis.held_out_c(pts, convention, design.HELD_OUT_BUDGET)
        boot = analysis.bootstrap_frontier(pts, convention, design.HELD_OUT_BUDGET,
                                           noise_sd=noise["per_budget_sd"], n_resamples=resamples)
        out["conventions"][convention] = {
            "profiles": [{"budget": p.budget, "C": p.C, "N_opt": p.N_opt, "D_opt": p.D_opt, "L_opt": p.L_opt,
                          "interior": p.interior, "sizes": [q.size for q in p.points],
                          "window": [q.size for q in p.window], "below_above": list(p.sides()),
                          "observed_min": p.observed_min.size} for p in profs],
            "a": front["a"], "k": front["k"], "b": front["b"], "k_D": front["k_D"], "n_budgets": front["n_budgets"],
            "L_of_C": {"E": front["L_E"], "A": front["L_A"], "alpha": front["L_alpha"]},
            "held_out": {"C": c_held, "N_opt": front["k"] * c_held ** front["a"],
                         "L_opt": float(front["law"].predict(c_held))},
            "bootstrap": boot,
        }
    a3 = analysis.approach3(pts)
    n3, d3, l3 = analysis.approach3_optimum(a3, design.HELD_OUT_BUDGET)
    boot3 = approach3_bootstrap(pts, a3, min(resamples, 100))
    out["approach3"] = {k: a3[k] for k in ("E", "A", "B", "alpha", "beta", "a", "b")}
    out["approach3"].update(held_out={"N_opt": n3, "D_opt": d3, "L_opt": l3}, bootstrap=boot3)
    out["families"] = families(rows, noise["per_budget_sd"], resamples)
    return out


def families(rows: list[dict], noise_sd: dict[float, float], resamples: int) -> dict:
    """Each family's frontier on the family ladder's sizes and budgets, and decoder vs encoder-decoder
    continuation bits per byte at the points both trained."""
    from ladder import FAMILIES, FAMILY_BUDGETS, FAMILY_SIZES

    family = [r for r in rows if r["stage"] == "families"]
    if not family:
        return {}
    # The decoder's frontier over every size its fit stage trained at these budgets (the fuller ladder:
    # its IsoFLOP minima are interior there); the continuation pairs need the same sizes in both families.
    decoder = [r for r in fit_rows(rows) if float(r["budget_flops"]) in FAMILY_BUDGETS]
    out = {"decoder_only": analysis.family_frontier(decoder, noise_sd=noise_sd, n_resamples=resamples)}
    for name in FAMILIES:
        own = [r for r in family if r["family"] == name]
        if own:
            out[name] = analysis.family_frontier(own, noise_sd=noise_sd, n_resamples=resamples)
    pairs = []
    by_point = {(r["size"], float(r["budget_flops"])): r for r in decoder if int(r["seed"]) == 0}
    for r in family:
        twin = by_point.get((r["size"], float(r["budget_flops"])))
        if r["family"] == "encoder_decoder" and twin is not None and r["size"] in FAMILY_SIZES:
            pairs.append({"size": r["size"], "budget": float(r["budget_flops"]),
                          "decoder_bpb": twin["continuation_bpb"], "encoder_decoder_bpb": r["continuation_bpb"]})
    out["continuation"] = pairs
    return out


def approach3_bootstrap(pts: list[dict], full: dict, n_resamples: int, seed: int = 0) -> dict:
    """Percentile intervals of approach 3's a, b and held-out loss over resampled points (warm starts)."""
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {"a": [], "b": [], "L_opt_held_out": []}
    for _ in range(n_resamples):
        sample = [pts[i] for i in rng.choice(len(pts), size=len(pts), replace=True)]
        try:
            res = analysis.approach3(sample, grid=analysis.warm_grid(full))
            loss = analysis.approach3_optimum(res, design.HELD_OUT_BUDGET)[2]
        except Exception:  # noqa: BLE001 - a degenerate resample (e.g. no positive term) is skipped
            continue
        draws["a"].append(res["a"])
        draws["b"].append(res["b"])
        draws["L_opt_held_out"].append(loss)
    out = {k: [float(v) for v in np.percentile(vals, [2.5, 97.5])] for k, vals in draws.items() if vals}
    out["resamples"] = n_resamples
    return out


def lock_prediction(fits: dict) -> dict:
    """The held-out prediction, written once: before any held-out run, committed on its own."""
    if PREDICTION.exists():
        raise SystemExit(f"error: {PREDICTION} exists; a locked prediction is never rewritten")
    total = fits["conventions"]["total"]
    prediction = {
        "budget_flops": design.HELD_OUT_BUDGET,
        "N_opt": total["held_out"]["N_opt"], "N_opt_95": total["bootstrap"]["N_opt_held_out"],
        "L_opt": total["held_out"]["L_opt"], "L_opt_95": total["bootstrap"]["L_opt_held_out"],
        "approach3": fits["approach3"]["held_out"],
        "method": "N_opt = k C^a through the fit budgets' IsoFLOP minima (total convention); L_opt = E + A C^-alpha "
                  "through their losses; intervals: bootstrap within budgets plus the measured seed noise",
        "from": "experiments/scaling_laws/v2/results.csv (fit stage)",
    }
    PREDICTION.write_text(json.dumps(prediction, indent=2) + "\n")
    return prediction


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--collect", action="store_true", help="rebuild results.csv from runs/scaling_v2 first")
    parser.add_argument("--stages", help="comma-separated stages --collect reads (default: every stage with a "
                        "directory under runs/scaling_v2); the committed rows of the other stages are kept")
    parser.add_argument("--lock", action="store_true", help="write prediction.json (refused if it exists)")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples")
    args = parser.parse_args(argv)
    if args.collect:
        stages = args.stages.split(",") if args.stages else [s for s in TABLE_STAGES if (ladder.RUNS / s).is_dir()]
        unknown = [s for s in stages if s not in TABLE_STAGES]
        missing = [s for s in stages if s not in unknown and not (ladder.RUNS / s).is_dir()]
        if unknown or missing or not stages:
            problem = (f"unknown stage(s) {unknown}; choose from {list(TABLE_STAGES)}" if unknown else
                       f"no run directory for stage(s) {missing} under {ladder.RUNS}" if missing else
                       f"nothing to collect: no stage directory under {ladder.RUNS}")
            raise SystemExit(f"error: --collect: {problem}")
        committed = read_table(raw=True) if TABLE.is_file() else []
        write_table(merge(committed, collect(stages), stages))
    rows = read_table()
    fits = analyse(rows, args.resamples)
    if args.lock:
        lock_prediction(fits)
    import report

    prediction = json.loads(PREDICTION.read_text()) if PREDICTION.exists() else None
    fits["held_out_observed"] = report.held_out_observed(rows, prediction)
    FITS.write_text(json.dumps(fits, indent=2, default=float) + "\n")
    report.plots(rows, fits, prediction, PLOTS)
    text = report.readme(rows, fits, prediction)
    (HERE / "README.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
