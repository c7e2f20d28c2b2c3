"""Scaling-law study: results table, fits, plots, W&B log — one command.

    python experiments/scaling_laws/v1/analyze.py runs/scaling_decoder runs/scaling_seeds ...
        reads every finished run under the given directories (config.yaml, summary.json, the
        final checkpoint for continuation bits per byte), merges them into results.csv, then
        analyses.
    python experiments/scaling_laws/v1/analyze.py
        analyses the committed results.csv only (no run directories needed).

Writes results.csv, fits.json and plots/*.png next to this file, prints every number the
README quotes, and logs the plots and numbers to W&B (offline by default; --no-wandb to skip).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from archlab.errors import ConfigError  # noqa: E402
from archlab.scaling import (  # noqa: E402
    bootstrap, fit_isoflop_profiles, fit_power_law, plot_isoflop_profiles, plot_loss_vs_flops,
    plot_n_opt_vs_compute, predictability,
)
from archlab.scaling.records import (  # noqa: E402
    continuation_bpb, find_run_dirs, merge_records, read_records, read_run, write_records,
)

HERE = Path(__file__).resolve().parent
FAMILY_EXPERIMENTS = {"decoder_only": "scaling_decoder", "encoder_decoder": "scaling_encoder_decoder",
                      "encoder_only": "scaling_encoder"}
SEED_EXPERIMENT = "scaling_seeds"
# Chinchilla approach 3 from a reduced start grid (1,024 starts): the full 4,500 adds minutes, not accuracy here.
SMALL_GRID = {"alpha": (0.1, 0.3, 0.6, 1.0), "beta": (0.1, 0.3, 0.6, 1.0), "e": (-0.5, 0.5, 1.0, 1.5),
              "a": (0.0, 5.0, 10.0, 15.0), "b": (0.0, 5.0, 10.0, 15.0)}


def arrays(recs: list[dict], *keys: str) -> list[np.ndarray]:
    return [np.array([r[k] for r in recs], dtype=float) for k in keys]


def frontier(C: np.ndarray, loss: np.ndarray, budgets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(C, loss) of the best run at each budget, smallest budget first."""
    out = []
    for b in np.unique(budgets):
        idx = np.flatnonzero(budgets == b)
        best = idx[np.argmin(loss[idx])]
        out.append((C[best], loss[best]))
    out.sort()
    return np.array([c for c, _ in out]), np.array([l for _, l in out])


def fit_frontier(C, loss, budgets):
    """L(C) through each budget's best run: E + A/C^alpha from 4 budgets on, A/C^alpha below that."""
    c, l = frontier(C, loss, budgets)
    return fit_power_law(c, l, with_offset=c.size >= 4)


def ci(boot: dict, key: str) -> dict:
    est, lo, hi = boot[key]
    return {"value": est, "ci95": [lo, hi]}


def power_law_summary(fit, boot: dict, key: str = "alpha") -> dict:
    return {"exponent": ci(boot, key), "A": fit.A, "E": fit.E if fit.with_offset else 0.0,
            "with_offset": fit.with_offset, "r2": fit.r2, "rmse_log": fit.rmse_log, "n_points": fit.n}


def lr_of(r: dict) -> float | None:
    """The run's learning rate; None for records written before the CSV had the column."""
    lr = r.get("lr", math.nan)
    return None if lr is None or (isinstance(lr, float) and math.isnan(lr)) else float(lr)


def family_rows(recs: list[dict], family: str) -> list[dict]:
    exp = FAMILY_EXPERIMENTS[family]
    return [r for r in recs if r["family"] == family and r["experiment"] == exp and r["seed"] == 0]


def lr_sweep(recs: list[dict], family: str) -> dict:
    """Each size's learning rate: the lowest final loss among the rates tried at the smallest budget.

    The sweep is part of the family's own experiment (``run_sweep.py --lrs ... --budgets <smallest>``);
    a size tried at one rate only keeps that rate.
    """
    rows = family_rows(recs, family)
    if not rows:
        return {}
    smallest = min(r["budget_flops"] for r in rows)
    tried: dict = defaultdict(dict)
    for r in rows:
        if r["budget_flops"] == smallest:
            tried[r["size"]][lr_of(r)] = r["val_loss"]
    return {size: {"chosen": min(losses, key=losses.get), "budget": smallest, "loss_by_lr": losses}
            for size, losses in tried.items()}


def main_runs(recs: list[dict], family: str) -> list[dict]:
    """One run per (size, budget): the one at the size's chosen learning rate (``lr_sweep``)."""
    chosen = {size: entry["chosen"] for size, entry in lr_sweep(recs, family).items()}
    picked: dict = {}
    for r in family_rows(recs, family):
        if r["size"] in chosen and lr_of(r) == chosen[r["size"]]:
            picked.setdefault((r["size"], r["budget_flops"]), r)  # a rerun of the same config: keep one
    return list(picked.values())


def runs_at_lr(recs: list[dict], family: str, lr: float) -> list[dict]:
    """The family's ladder at one learning rate for every size (e.g. the untuned 3e-3 of stage 1)."""
    picked: dict = {}
    for r in family_rows(recs, family):
        if lr_of(r) is not None and math.isclose(lr_of(r), lr):
            picked.setdefault((r["size"], r["budget_flops"]), r)
    return list(picked.values())


def decoder_analysis(recs: list[dict], resamples: int, plots: Path) -> dict:
    runs = main_runs(recs, "decoder_only")
    if not runs:
        raise ConfigError("results hold no scaling_decoder runs")
    out: dict = {"n_runs": len(runs), "budgets": sorted({r["budget_flops"] for r in runs}),
                 "sizes": sorted({r["size"] for r in runs}, key=lambda s: next(r["params_total"] for r in runs if r["size"] == s)),
                 "max_epochs": max(r["epochs"] for r in runs)}
    loss, budgets, tokens = arrays(runs, "val_loss", "budget_flops", "tokens")
    for conv in ("total", "non_embedding"):
        N, C = arrays(runs, f"params_{conv}", f"C_{conv}")
        # L(N): each size's best loss over the budgets (the data-rich end of its curve).
        sizes = np.unique(N)
        best_l = np.array([loss[N == n].min() for n in sizes])
        fit_n = fit_power_law(sizes, best_l)
        boot_n = bootstrap(lambda N, loss: fit_power_law(N, loss), {"N": sizes, "loss": best_l},
                           n_resamples=resamples, seed=0)
        fit_c = fit_frontier(C, loss, budgets)
        boot_c = bootstrap(lambda C, loss, budgets: fit_frontier(C, loss, budgets),
                           {"C": C, "loss": loss, "budgets": budgets}, n_resamples=resamples, seed=0,
                           group_key="budgets", min_distinct=1)
        out[conv] = {"L_of_N": power_law_summary(fit_n, boot_n), "L_of_C": power_law_summary(fit_c, boot_c),
                     "isoflop": isoflop_summary(N, C, loss, budgets, resamples, plots / f"isoflop_decoder_{conv}.png",
                                                plots / f"n_opt_vs_compute_{conv}.png")}
        if conv == "total":
            plot_loss_vs_flops(C, loss, N, plots / "loss_vs_flops_decoder.png", fit=fit_c)
    # Predictability: Chinchilla approach 3 on every budget but the largest, at the largest budget's optimum.
    N, C = arrays(runs, "params_total", "C_total")
    fpt_per_param = float(np.median([r["flops_per_token"] / r["params_total"] for r in runs]))
    out["predictability"] = []
    try:
        pred = predictability(N, C, loss, D=tokens, method="chinchilla", budgets=budgets,
                              flops_per_token=fpt_per_param, init_grid=SMALL_GRID)
        out["predictability"].append({
            "method": "chinchilla approach 3 (total convention)", "predicted": pred.predicted, "actual": pred.actual,
            "relative_error": pred.relative_error, "held_out_budget": max(budgets), "n_train_runs": pred.n_train})
    except ConfigError as error:  # e.g. a fitted exponent <= 0: no compute-optimal point to predict at
        out["predictability"].append({"method": "chinchilla approach 3 (total convention)", "error": str(error),
                                      "held_out_budget": max(budgets)})
    # The frontier's own power law through the smaller budgets' best runs, extrapolated (no offset:
    # two or three points cannot separate E).
    fc, fl = frontier(C, loss, budgets)
    if fc.size >= 3:
        below = budgets < budgets.max()
        predicted = float(fit_frontier(C[below], loss[below], budgets[below]).predict(fc[-1]))
        out["predictability"].append({
            "method": f"L(C) frontier power law through {fc.size - 1} smaller budgets", "predicted": predicted,
            "actual": float(fl[-1]), "relative_error": (predicted - fl[-1]) / fl[-1], "held_out_budget": max(budgets),
            "n_train_runs": int(fc.size - 1)})
    out["seed_spread"] = seed_spread(recs)
    return out


def isoflop_summary(N, C, loss, budgets, resamples: int, iso_png: Path, n_opt_png: Path) -> dict:
    """Chinchilla approach 2 with a bootstrap CI on ``a``; 'measurable' is False when fewer than two
    budgets have a loss minimum inside the sampled sizes (``a`` is then an extrapolation, or absent)."""
    try:
        iso = fit_isoflop_profiles(N, C, loss, budgets=budgets)
    except ConfigError as error:
        iso, reason = None, str(error)
    profiles = [] if iso is None else [
        {"budget": p.budget, "C": p.C, "N_opt": p.N_opt, "L_opt": p.L_opt, "curvature_ok": p.curvature_ok,
         "vertex_in_range": p.vertex_in_range, "N_range": list(p.N_range)} for p in iso.profiles]
    in_range = sum(p["vertex_in_range"] for p in profiles)
    out = {"measurable": in_range >= 2, "budgets_with_minimum_in_range": in_range, "profiles": profiles,
           "a": {"value": math.nan, "ci95": [math.nan, math.nan]}, "b": {"value": math.nan, "ci95": [math.nan, math.nan]}}
    if iso is None:
        out["reason"] = reason
        for stale in (iso_png, n_opt_png):  # a plot of an earlier analysis would contradict this one
            stale.unlink(missing_ok=True)
        return out
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            boot = bootstrap(lambda N, C, loss, budgets: fit_isoflop_profiles(N, C, loss, budgets=budgets),
                             {"N": N, "C": C, "loss": loss, "budgets": budgets}, n_resamples=resamples,
                             seed=0, group_key="budgets")
        out["a"], out["b"] = ci(boot, "a"), ci(boot, "b")
        # Two vertices inside the range are not enough if resampling moves a outside (0, 1).
        lo, hi = out["a"]["ci95"]
        out["measurable"] = out["measurable"] and 0.0 < lo and hi < 1.0
    except ConfigError as error:
        out["a"]["value"], out["b"]["value"], out["reason"] = iso.a, iso.b, str(error)
    plot_isoflop_profiles(N, C, loss, iso_png, result=iso, budgets=budgets)
    usable = [p for p in iso.profiles if p.curvature_ok]
    plot_n_opt_vs_compute([p.C for p in usable], [p.N_opt for p in usable], n_opt_png, a=iso.a, k=iso.k)
    return out


def seed_spread(recs: list[dict]) -> list[dict]:
    """Spread of the final loss over seeds at each (size, budget, learning rate) run with several seeds."""
    groups = defaultdict(list)
    for r in recs:
        if r["family"] == "decoder_only" and r["experiment"] in (FAMILY_EXPERIMENTS["decoder_only"], SEED_EXPERIMENT):
            groups[(r["size"], r["budget_flops"], lr_of(r))].append(r)
    out = []
    for (size, budget, lr), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] or 0.0)):
        seeds = sorted({r["seed"] for r in rs})
        if len(seeds) < 2:
            continue
        vals = np.array([next(r["val_loss"] for r in rs if r["seed"] == s) for s in seeds])
        out.append({"size": size, "budget": budget, "lr": lr, "seeds": seeds, "losses": vals.tolist(), "mean": float(vals.mean()),
                    "std": float(vals.std(ddof=1)), "range": float(np.ptp(vals)),
                    "relative_std": float(vals.std(ddof=1) / vals.mean())})
    return out


def family_analysis(recs: list[dict], resamples: int, plots: Path) -> dict:
    out: dict = {}
    fig = Figure(figsize=(11, 4.2))
    ax_own, ax_gen = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for i, family in enumerate(FAMILY_EXPERIMENTS):
        runs = main_runs(recs, family)
        if len({r["budget_flops"] for r in runs}) < 2:
            continue
        loss, C, budgets = arrays(runs, "val_loss", "C_total", "budget_flops")
        entry = {"objective": runs[0]["objective"], "n_runs": len(runs),
                 "runs": [{"budget": r["budget_flops"], "size": r["size"], "lr": lr_of(r), "steps": r["total_steps"],
                           "loss": r["val_loss"], "continuation_bpb": r["continuation_bpb"]}
                          for r in sorted(runs, key=lambda r: (r["budget_flops"], r["params_total"]))]}
        fit = fit_frontier(C, loss, budgets)
        boot = bootstrap(lambda C, loss, budgets: fit_frontier(C, loss, budgets),
                         {"C": C, "loss": loss, "budgets": budgets}, n_resamples=resamples, seed=0,
                         group_key="budgets", min_distinct=1)
        entry["own_objective_L_of_C"] = power_law_summary(fit, boot)
        colour = f"C{i}"
        fc, fl = frontier(C, loss, budgets)
        ax_own.scatter(C, loss, color=colour, s=10, alpha=0.35)
        ax_own.plot(fc, fl, "o-", color=colour, label=f"{family} ({entry['objective']}): alpha_C={fit.alpha:.3f}")
        bpb = arrays(runs, "continuation_bpb")[0]
        if np.isfinite(bpb).all():
            gfit = fit_frontier(C, bpb, budgets)
            gboot = bootstrap(lambda C, loss, budgets: fit_frontier(C, loss, budgets),
                              {"C": C, "loss": bpb, "budgets": budgets}, n_resamples=resamples, seed=0,
                              group_key="budgets", min_distinct=1)
            gc, gl = frontier(C, bpb, budgets)
            entry["continuation_bpb_of_C"] = power_law_summary(gfit, gboot)
            entry["continuation_bpb_frontier"] = [{"C": float(c), "bpb": float(v)} for c, v in zip(gc, gl)]
            ax_gen.scatter(C, bpb, color=colour, s=10, alpha=0.35)
            ax_gen.plot(gc, gl, "o-", color=colour, label=f"{family}: exponent {gfit.alpha:.3f}")
        out[family] = entry
    ax_own.set(xscale="log", xlabel="training FLOPs C (total convention)", ylabel="validation loss (own objective)",
               title="each family's own objective")
    ax_gen.set(xscale="log", xlabel="training FLOPs C (total convention)", ylabel="continuation bits per byte",
               title="shared generative metric (lower is better)")
    for ax in (ax_own, ax_gen):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    FigureCanvasAgg(fig)
    (plots).mkdir(parents=True, exist_ok=True)
    fig.savefig(plots / "family_comparison.png", dpi=120)
    return out


UNTUNED_LR = 3e-3  # stage 1's one rate for every size, before the learning-rate sweep


def untuned_comparison(recs: list[dict], resamples: int) -> dict:
    """Each family's frontier with the untuned rate at every size, where a full ladder of it exists."""
    out = {}
    for family in FAMILY_EXPERIMENTS:
        tuned = {(r["size"], r["budget_flops"]) for r in main_runs(recs, family)}
        runs = runs_at_lr(recs, family, UNTUNED_LR)
        if len({r["budget_flops"] for r in runs}) < 2 or {(r["size"], r["budget_flops"]) for r in runs} != tuned:
            continue
        loss, C, budgets = arrays(runs, "val_loss", "C_total", "budget_flops")
        fit = fit_frontier(C, loss, budgets)
        boot = bootstrap(lambda C, loss, budgets: fit_frontier(C, loss, budgets),
                         {"C": C, "loss": loss, "budgets": budgets}, n_resamples=resamples, seed=0,
                         group_key="budgets", min_distinct=1)
        best = {b: min(runs, key=lambda r: r["val_loss"] if r["budget_flops"] == b else math.inf)
                for b in sorted({r["budget_flops"] for r in runs})}
        out[family] = {"lr": UNTUNED_LR, "L_of_C": power_law_summary(fit, boot),
                       "frontier": [{"budget": b, "size": r["size"], "loss": r["val_loss"]} for b, r in best.items()]}
    return out


def fmt_ci(d: dict) -> str:
    lo, hi = d["ci95"]
    return f"{d['value']:.3f} [{lo:.3f}, {hi:.3f}]"


def report(results: dict) -> str:
    lines = []
    for family, sweep in results.get("lr_sweep", {}).items():
        if not sweep:
            continue
        budget = next(iter(sweep.values()))["budget"]
        cells = []
        for size, entry in sweep.items():
            tried = ", ".join(f"{lr:g}: {loss:.3f}" if lr is not None else f"?: {loss:.3f}"
                              for lr, loss in sorted(entry["loss_by_lr"].items(), key=lambda kv: kv[0] or 0.0))
            chosen = f"{entry['chosen']:g}" if entry["chosen"] is not None else "?"
            cells.append(f"{size} -> {chosen} ({tried})")
        lines.append(f"learning rate per size, {family} (lowest final loss at {budget:.0e} FLOPs): " + "; ".join(cells))
    dec = results.get("decoder_only")
    if dec:
        lines.append(f"decoder-only: {dec['n_runs']} runs, sizes {', '.join(dec['sizes'])}, budgets "
                     f"{', '.join(f'{b:.0e}' for b in dec['budgets'])} FLOPs, at most {dec['max_epochs']:.2f} epochs")
        for conv in ("total", "non_embedding"):
            d = dec[conv]
            ln, lc, iso = d["L_of_N"], d["L_of_C"], d["isoflop"]
            lines.append(f"  [{conv}] L(N) = {ln['E']:.3f} + {ln['A']:.3g}/N^alpha_N, alpha_N = {fmt_ci(ln['exponent'])}, "
                         f"R2 {ln['r2']:.3f}, rmse(log L) {ln['rmse_log']:.4f}, {ln['n_points']} sizes")
            off = f"{lc['E']:.3f} + " if lc["with_offset"] else ""
            lines.append(f"  [{conv}] L(C) = {off}{lc['A']:.3g}/C^alpha_C, alpha_C = {fmt_ci(lc['exponent'])}, "
                         f"R2 {lc['r2']:.3f}, rmse(log L) {lc['rmse_log']:.4f}, {lc['n_points']} budgets")
            verdict = "measured" if iso["measurable"] else (
                f"NOT measured ({iso['budgets_with_minimum_in_range']} budget(s) with a minimum inside the sampled "
                "sizes; measured needs >= 2 and a 95% CI inside (0, 1))")
            lines.append(f"  [{conv}] IsoFLOP N_opt ~ C^a: a = {fmt_ci(iso['a'])}; D_opt ~ C^b: b = {fmt_ci(iso['b'])}; "
                         f"{verdict}{'; ' + iso['reason'] if 'reason' in iso else ''}")
            for p in iso["profiles"]:
                where = "inside" if p["vertex_in_range"] else ("outside" if p["curvature_ok"] else "no minimum:")
                lines.append(f"      C={p['C']:.3g}: N_opt={p['N_opt']:.3g} L_opt={p['L_opt']:.4f} ({where} "
                             f"the sampled sizes {p['N_range'][0]:.3g}-{p['N_range'][1]:.3g})")
        for p in dec["predictability"]:
            if "error" in p:
                lines.append(f"  predictability ({p['method']}) at {p['held_out_budget']:.0e}: not defined ({p['error']})")
                continue
            lines.append(f"  predictability ({p['method']}, {p['n_train_runs']} runs below {p['held_out_budget']:.0e}): "
                         f"predicted {p['predicted']:.4f}, observed best {p['actual']:.4f}, "
                         f"relative error {100 * p['relative_error']:+.2f}%")
        for s in dec["seed_spread"]:
            lr = f" lr={s['lr']:g}" if s.get("lr") is not None else ""
            lines.append(f"  seed spread at {s['size']} C={s['budget']:.0e}{lr} (seeds {s['seeds']}): mean {s['mean']:.4f}, "
                         f"std {s['std']:.4f} ({100 * s['relative_std']:.2f}%), range {s['range']:.4f}")
    for family, entry in results.get("untuned_lr", {}).items():
        lc = entry["L_of_C"]
        best = ", ".join(f"{x['budget']:.0e}: {x['size']} {x['loss']:.4f}" for x in entry["frontier"])
        lines.append(f"{family} with lr {entry['lr']:g} at every size (untuned): alpha_C = {fmt_ci(lc['exponent'])}, "
                     f"R2 {lc['r2']:.3f}; best per budget {best}")
    for family, entry in results.get("families", {}).items():
        lc = entry["own_objective_L_of_C"]
        lines.append(f"{family} ({entry['objective']}, {entry['n_runs']} runs; per budget: size loss[/continuation "
                     f"bits per byte] (updates)): own-objective alpha_C = "
                     f"{fmt_ci(lc['exponent'])}, R2 {lc['r2']:.3f}")
        for budget in sorted({r["budget"] for r in entry["runs"]}):
            cells = [f"{r['size']} {r['loss']:.3f}" + (f"/{r['continuation_bpb']:.3f}" if math.isfinite(r["continuation_bpb"]) else "")
                     + f" ({r['steps']} steps)" for r in entry["runs"] if r["budget"] == budget]
            lines.append(f"  C={budget:.0e}: " + ", ".join(cells))
        if "continuation_bpb_of_C" in entry:
            g = entry["continuation_bpb_of_C"]
            frontier_txt = ", ".join(f"{x['C']:.2g}: {x['bpb']:.3f}" for x in entry["continuation_bpb_frontier"])
            lines.append(f"  continuation bits/byte exponent {fmt_ci(g['exponent'])}; best per budget {frontier_txt}")
        else:
            lines.append("  no continuation bits/byte: a masked LM has no left-to-right distribution")
    return "\n".join(lines)


def log_to_wandb(results: dict, plots: Path, csv_path: Path, mode: str) -> None:
    try:
        import wandb
    except ImportError:
        print("wandb is not installed; plots are not logged", file=sys.stderr)
        return
    run_dir = Path("runs/scaling_laws_analysis")
    run_dir.mkdir(parents=True, exist_ok=True)
    run = wandb.init(project="archlab", group="scaling_laws", job_type="analysis", name="scaling_laws-analysis",
                     mode=mode, dir=str(run_dir), config={"results_csv": str(csv_path)}, reinit="create_new")
    run.log({f"plots/{p.stem}": wandb.Image(str(p)) for p in sorted(plots.glob("*.png"))})
    rows = read_records(csv_path)
    if rows:
        run.log({"results": wandb.Table(columns=list(rows[0]), data=[list(r.values()) for r in rows])})
    flat = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}/{k}" if prefix else str(k), v)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[prefix] = value

    walk("", results)
    run.summary.update(flat)
    run.finish()


def collect(run_dirs: list[Path], old: list[dict]) -> list[dict]:
    """Records of the finished runs; continuation bits per byte only where the analysis uses it.

    Scoring a continuation restores the final checkpoint (seconds per run), so it is computed
    for the generative families' main runs and untuned ladder only, not for every rate of the
    learning-rate sweep; a score already in the CSV for the same run is kept.
    """
    known = {(r["experiment"], r["run"]): r.get("continuation_bpb", math.nan) for r in old}
    pairs = [(d, rec) for d in run_dirs if (rec := read_run(d, continuation=False)) is not None]
    merged = merge_records(old, [rec for _, rec in pairs])
    wanted = {(r["experiment"], r["run"]) for family in ("decoder_only", "encoder_decoder")
              for r in (*main_runs(merged, family), *runs_at_lr(merged, family, UNTUNED_LR))}
    wanted |= {(r["experiment"], r["run"]) for r in merged if r["experiment"] == SEED_EXPERIMENT}
    for run_dir, rec in pairs:
        key = (rec["experiment"], rec["run"])
        if key not in wanted:
            continue
        known_score = known.get(key, math.nan)
        rec["continuation_bpb"] = known_score if math.isfinite(known_score) else continuation_bpb(run_dir)
    return [rec for _, rec in pairs]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", help="run or sweep directories to (re)collect into the CSV")
    parser.add_argument("--out", type=Path, default=HERE, help="where results.csv, fits.json and plots/ go")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples")
    parser.add_argument("--no-wandb", action="store_true", help="do not log to W&B")
    parser.add_argument("--wandb-mode", default="offline", choices=("offline", "online"))
    args = parser.parse_args(argv)
    csv_path, plots = args.out / "results.csv", args.out / "plots"
    old = read_records(csv_path) if csv_path.is_file() else []
    if args.runs:
        new = collect(find_run_dirs(args.runs), old)
        write_records(csv_path, merge_records(old, new))
        print(f"collected {len(new)} finished runs into {csv_path}")
    recs = read_records(csv_path)
    results: dict = {"lr_sweep": {family: lr_sweep(recs, family) for family in FAMILY_EXPERIMENTS}}
    results["untuned_lr"] = untuned_comparison(recs, resamples=args.resamples)
    if main_runs(recs, "decoder_only"):
        results["decoder_only"] = decoder_analysis(recs, args.resamples, plots)
    results["families"] = family_analysis(recs, args.resamples, plots)
    (args.out / "fits.json").write_text(json.dumps(results, indent=2, default=float) + "\n")
    print(report(results))
    if not args.no_wandb:
        log_to_wandb(results, plots, csv_path, args.wandb_mode)
    return results


if __name__ == "__main__":
    main()
