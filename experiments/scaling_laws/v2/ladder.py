"""Study v2's runner: each stage is a list of ``archlab-train`` trunks, run one after another, resumably.

    python experiments/scaling_laws/v2/ladder.py calibrate   # learning rate x 0.5/1/2/4 at 3 sizes, beta2 once
    python experiments/scaling_laws/v2/ladder.py fit         # one trunk per size, a branch per fit budget
    python experiments/scaling_laws/v2/ladder.py heldout     # extend the trunks around the locked prediction
    python experiments/scaling_laws/v2/ladder.py families    # encoder-only and encoder-decoder ladders
    python experiments/scaling_laws/v2/ladder.py STAGE --list   # print the commands only

A trunk whose every branch has a summary is skipped; one cut short resumes from its checkpoint
(rerun the same command). Runs go to ``runs/scaling_v2/<stage>/<name>``; their logs next to them.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
sys.path.insert(0, str(HERE))  # design.py, beside this script (run as a script, not a package)

import design  # noqa: E402

RUNS = REPO / "runs" / "scaling_v2"
LR_MULTIPLIERS = (0.5, 1.0, 2.0, 4.0)
CALIBRATION = {"d24": design.FIT_BUDGETS[:3], "d56": design.FIT_BUDGETS[1:4], "d80": design.FIT_BUDGETS[3:4]}
BETA2_SIZE, BETA2_ALTERNATIVE = "d24", 0.99
# Added after the first pass: d80's best rate was its largest (x4, 3.4066 vs 3.4084 at x2), so
# one more member at x8 makes its minimum interior or shows it is not.
FOLLOW_UP = {"d80": (8.0,)}


def budgets_arg(budgets) -> str:
    return "[" + ",".join(f"{b:g}" for b in budgets) + "]"


def trunk(name: str, size: str, budgets, extra: list[str], members: list[dict] | None = None,
          family: str = "decoder_only") -> dict:
    """One ``archlab-train`` job: a trunk of ``size`` with a branch at each of ``budgets``."""
    overrides = [*design.COMMON, f"model={family}", *design.size_overrides(size), f"run.name={name}",
                 f"run.flops={max(budgets):g}", f"run.branches={budgets_arg(budgets)}", *extra]
    if members:
        overrides.append("run.members=[" + ",".join("{" + ",".join(f"{k}:{v}" for k, v in m.items()) + "}"
                                                    for m in members) + "]")
    return {"name": name, "size": size, "budgets": list(budgets), "overrides": overrides, "members": members or []}


def prior_lr(size: str) -> float:
    from archlab.train.rules import apply_rules
    from archlab.trainer import compose

    job = trunk("probe", size, CALIBRATION[size], [*design.CALIBRATION_EVAL, "rules=ladder_v2_prior"])
    return apply_rules(compose(job["overrides"])).optimizer.lr


def calibrate_jobs() -> list[dict]:
    jobs = []
    for size, budgets in CALIBRATION.items():
        lrs = [{"lr": f"{prior_lr(size) * m:.3g}"} for m in LR_MULTIPLIERS]
        jobs.append(trunk(f"cal-{size}", size, budgets, [*design.CALIBRATION_EVAL, "rules=ladder_v2_prior"], lrs))
    lrs = [{"lr": f"{prior_lr(BETA2_SIZE) * m:.3g}"} for m in LR_MULTIPLIERS]
    jobs.append(trunk(f"cal-{BETA2_SIZE}-b2", BETA2_SIZE, CALIBRATION[BETA2_SIZE],
                      [*design.CALIBRATION_EVAL, "rules=ladder_v2_prior", f"rules.b2={BETA2_ALTERNATIVE}"], lrs))
    for size, multipliers in FOLLOW_UP.items():
        name = f"cal-{size}-x" + "-".join(f"{m:g}" for m in multipliers)
        lrs = [{"lr": f"{prior_lr(size) * m:.3g}"} for m in multipliers]
        jobs.append(trunk(name, size, CALIBRATION[size], [*design.CALIBRATION_EVAL, "rules=ladder_v2_prior"], lrs))
    return jobs


def fit_jobs() -> list[dict]:
    jobs = []
    for size in design.SIZES:
        budgets = design.budgets_of(size)
        if not budgets:
            continue
        seeds = [{"seed": s} for s in design.SEEDS] if size == design.SEED_SIZE else None
        jobs.append(trunk(f"fit-{size}", size, budgets, [*design.EVAL, "rules=ladder_v2"], seeds))
    for size in design.SIZES:  # the small budgets' extra seeds (design.SEEDED_BUDGETS)
        if design.seeded_budgets_of(size):
            # The rule's batch and warmup come from the smallest budget, as in the size's own trunk.
            jobs.append(trunk(f"fit-{size}-seeds", size, design.seeded_budgets_of(size),
                              [*design.EVAL, "rules=ladder_v2"], [{"seed": s} for s in design.SEEDS[1:]]))
    return jobs


def heldout_sizes(n_opt: float) -> list[str]:
    """The size nearest the locked N_opt (log scale) and its neighbours on either side."""
    ordered = sorted(design.SIZES, key=lambda s: design.size_plan(s)[0])
    nearest = min(range(len(ordered)), key=lambda i: abs(math.log(design.size_plan(ordered[i])[0] / n_opt)))
    return ordered[max(0, nearest - 1):nearest + 2]


def heldout_jobs() -> list[dict]:
    """Extend the fit trunks around the locked N_opt to the held-out budget (a fresh trunk where none exists)."""
    prediction = HERE / "prediction.json"
    if not prediction.is_file():
        raise SystemExit("error: no locked prediction (experiments/scaling_laws/v2/prediction.json); run "
                         "analyze.py --collect --lock and commit it before the held-out runs")
    n_opt = json.loads(prediction.read_text())["N_opt"]
    jobs = []
    for size in heldout_sizes(n_opt):
        budgets = [*design.budgets_of(size), design.HELD_OUT_BUDGET]
        name = f"fit-{size}" if design.budgets_of(size) else f"heldout-{size}"
        job = trunk(name, size, budgets, [*design.EVAL, "rules=ladder_v2"],
                    [{"seed": s} for s in design.SEEDS] if size == design.SEED_SIZE else None)
        job["stage_dir"] = "fit" if design.budgets_of(size) else "heldout"
        jobs.append(job)
    return jobs


# The first families stage (d24-d56) put the encoder-only minimum at its smallest size at every budget and
# the encoder-decoder's at it for 3 of 4, so no IsoFLOP exponent could be fitted: the ladder shift, as the
# decoder's fit stage had, adds d12, d16 and d20 (their own trunks; the first stage's runs are unchanged).
FAMILY_SIZES = ("d12", "d16", "d20", "d24", "d32", "d40", "d56")
FAMILY_BUDGETS = design.FIT_BUDGETS[1:5]
FAMILIES = {"encoder_only": "mlm", "encoder_decoder": "span_corruption"}


def families_jobs() -> list[dict]:
    """Encoder-only (MLM) and encoder-decoder (span corruption, L+L layers) ladders on the decoder's budgets."""
    return [trunk(f"{family}-{size}", size, FAMILY_BUDGETS, [*design.EVAL, "rules=ladder_v2", f"objective={objective}"],
                  family=family)
            for family, objective in FAMILIES.items() for size in FAMILY_SIZES]


STAGES = {"calibrate": calibrate_jobs, "fit": fit_jobs, "heldout": heldout_jobs, "families": families_jobs}


def branch_dirs(job: dict, run_dir: Path) -> list[Path]:
    roots = [run_dir / "members" / f"{job['name']}-lr{float(m.get('lr', 0)):g}-s{m.get('seed', 0)}"
             for m in job["members"]] if job["members"] else [run_dir]
    return [root / "branches" / f"C{b:g}" for root in roots for b in job["budgets"]]


def member_roots(run_dir: Path) -> list[Path]:
    members = run_dir / "members"
    return sorted(p for p in members.iterdir() if p.is_dir()) if members.is_dir() else [run_dir]


def is_finished(job: dict, run_dir: Path) -> bool:
    roots = member_roots(run_dir)
    expected = len(job["members"]) or 1
    return len(roots) == expected and all(
        (root / "branches" / f"C{b:g}" / "summary.json").is_file() for root in roots for b in job["budgets"])


def run_stage(stage: str, jobs: list[dict], list_only: bool) -> None:
    failed: list[str] = []
    for job in jobs:
        run_dir = RUNS / job.get("stage_dir", stage) / job["name"]  # held-out extensions live in their fit trunk
        command = [sys.executable, "-c", "from archlab.cli import train_main; train_main()",
                   *job["overrides"], f"run.dir={run_dir}"]
        if list_only:
            print(" ".join(f"'{a}'" if any(c in a for c in "[]{}, ") else a for a in command[3:]))
            continue
        if is_finished(job, run_dir):
            print(json.dumps({"job": job["name"], "status": "finished"}), flush=True)
            continue
        log = RUNS / stage / "_logs" / f"{job['name']}.log"  # the stage's own log, even for an extension
        log.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with log.open("a") as out:
            rc = subprocess.run(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT).returncode
        print(json.dumps({"job": job["name"], "rc": rc, "seconds": round(time.perf_counter() - start, 1),
                          "finished": is_finished(job, run_dir)}), flush=True)
        if rc != 0:
            failed.append(f"{job['name']} exited {rc}; see {log}")
    if failed:  # the other jobs ran; rerunning the stage retries only these
        raise SystemExit("error: " + "; ".join(failed))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=sorted(STAGES))
    parser.add_argument("--list", action="store_true", help="print each job's overrides and exit")
    parser.add_argument("--only", help="comma-separated job names")
    args = parser.parse_args(argv)
    jobs = STAGES[args.stage]()
    if args.only:
        jobs = [j for j in jobs if j["name"] in args.only.split(",")]
    run_stage(args.stage, jobs, args.list)


if __name__ == "__main__":
    main()
