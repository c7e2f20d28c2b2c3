"""Study v2's plots and README, written from the results table and the fits analyze.py computed."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

import analysis
import design

HERE = Path(__file__).resolve().parent
A_TARGET_WIDTH, LOSS_TARGET = 0.5, 0.03


def held_out_observed(rows: list[dict], prediction: dict | None) -> dict | None:
    """The held-out budget's best loss (parabola vertex when >= 3 sizes bracket it, else the lowest point)."""
    pts = [r for r in rows if r["stage"] == "heldout" and r["family"] == "decoder_only" and int(r["seed"]) == 0]
    if not pts:
        return None
    prof = analysis.profiles(pts, "total")[0]
    best = prof.observed_min
    observed = {"sizes": [p.size for p in prof.points], "losses": [p.loss for p in prof.points],
                "best_observed_size": best.size, "best_observed_loss": best.loss,
                "parabola_interior": prof.interior, "parabola_L_opt": prof.L_opt, "parabola_N_opt": prof.N_opt}
    if prediction is not None:
        observed["relative_error"] = (prediction["L_opt"] - best.loss) / best.loss
        observed["within_target"] = abs(observed["relative_error"]) <= LOSS_TARGET
    return observed


def _save(fig: Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")


def plots(rows: list[dict], fits: dict, prediction: dict | None, out: Path) -> None:
    from analyze import fit_rows

    pts = fit_rows(rows)
    held = [r for r in rows if r["stage"] == "heldout" and r["family"] == "decoder_only" and int(r["seed"]) == 0]
    sizes = sorted({r["size"] for r in pts + held}, key=lambda s: design.SIZES[s][0])
    colours = {s: f"C{i % 10}" for i, s in enumerate(sizes)}

    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    by_size: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for points in analysis.points_by_budget(pts + held, "total").values():
        for q in points:
            by_size[q.size].append((q.C, q.loss))
    for s in sizes:
        own = sorted(by_size[s])
        ax.plot([c for c, _ in own], [loss for _, loss in own], "o-", ms=3, color=colours[s], label=s)
    law = fits["conventions"]["total"]["L_of_C"]
    grid = np.logspace(np.log10(min(design.FIT_BUDGETS)), np.log10(design.HELD_OUT_BUDGET), 100)
    ax.plot(grid, law["E"] + law["A"] * grid ** -law["alpha"], "k--", lw=1, label="L(C) frontier fit")
    ax.set(xscale="log", xlabel="training FLOPs C (total)", ylabel="validation loss (nats/token)",
           title="Loss vs compute: one trunk per size, a cooldown branch per budget")
    ax.legend(fontsize=7, ncol=2)
    _save(fig, out / "loss_vs_flops.png")

    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    for i, p in enumerate(analysis.profiles(pts, "total")):
        colour = f"C{i % 10}"
        ax.scatter([q.N for q in p.points], [q.loss for q in p.points], s=14, color=colour, label=f"C={p.budget:.2g}")
        x = np.linspace(math.log10(p.window[0].N) - 0.05, math.log10(p.window[-1].N) + 0.05, 60)
        if not math.isnan(p.coeffs[0]):
            ax.plot(10**x, np.polyval(p.coeffs, x), color=colour, lw=1)
        if p.interior:
            ax.plot(p.N_opt, p.L_opt, "*", ms=11, color=colour)
    ax.set(xscale="log", xlabel="parameters N (total)", ylabel="validation loss",
           title="IsoFLOP profiles (parabola over the 5 sizes around each minimum; star: vertex)")
    ax.legend(fontsize=7)
    _save(fig, out / "isoflop.png")

    total = fits["conventions"]["total"]
    good = [p for p in total["profiles"] if p["interior"]]
    fig = Figure(figsize=(10, 4.2))
    for j, (key, coef, exp, label) in enumerate((("N_opt", "k", "a", "N_opt"), ("D_opt", "k_D", "b", "D_opt"))):
        ax = fig.add_subplot(1, 2, j + 1)
        ax.scatter([p["C"] for p in good], [p[key] for p in good], color="C0", zorder=3, label="IsoFLOP minima")
        ax.plot(grid, total[coef] * grid ** total[exp], "k--", lw=1,
                label=f"{label} = {total[coef]:.3g} C^{total[exp]:.3f}")
        if key == "N_opt" and prediction is not None:
            lo, hi = prediction["N_opt_95"]
            ax.errorbar([design.HELD_OUT_BUDGET], [prediction["N_opt"]], yerr=[[prediction["N_opt"] - lo],
                        [hi - prediction["N_opt"]]], fmt="s", color="C3", label="locked prediction (95%)")
        ax.set(xscale="log", yscale="log", xlabel="training FLOPs C (total)", ylabel=label)
        ax.legend(fontsize=7)
    _save(fig, out / "frontier.png")

    fam = fits.get("families") or {}
    if fam:
        fig = Figure(figsize=(10, 4.2))
        ax = fig.add_subplot(1, 2, 1)
        for i, name in enumerate(n for n in ("decoder_only", "encoder_only", "encoder_decoder") if n in fam):
            f = fam[name]
            ax.plot(f["budgets"], f["L_min"], "o-", color=f"C{i}",
                    label=f"{name}: alpha {f['alpha']:.3f} [{f['alpha_95'][0]:.3f}, {f['alpha_95'][1]:.3f}]")
        ax.set(xscale="log", yscale="log", xlabel="training FLOPs C (total)", ylabel="lowest loss (own objective)",
               title="Each family's frontier")
        ax.legend(fontsize=7)
        if fam.get("continuation"):
            ax = fig.add_subplot(1, 2, 2)
            pairs = fam["continuation"]
            ax.scatter([p["decoder_bpb"] for p in pairs], [p["encoder_decoder_bpb"] for p in pairs], s=16)
            lo = min(min(p["decoder_bpb"], p["encoder_decoder_bpb"]) for p in pairs)
            hi = max(max(p["decoder_bpb"], p["encoder_decoder_bpb"]) for p in pairs)
            ax.plot([lo, hi], [lo, hi], "k--", lw=1)
            ax.set(xlabel="decoder-only continuation bits/byte", ylabel="encoder-decoder continuation bits/byte",
                   title="Same size and budget (above the line: decoder better)")
        _save(fig, out / "families.png")

    observed = fits.get("held_out_observed")
    if prediction is not None and observed is not None:
        fig = Figure(figsize=(6, 4.2))
        ax = fig.add_subplot()
        ax.scatter([design.SIZES[s][0] for s in observed["sizes"]], observed["losses"], color="C0", label="observed")
        lo, hi = prediction["L_opt_95"]
        ax.axhspan(lo, hi, color="C3", alpha=0.2, label="predicted best loss, 95%")
        ax.axhline(prediction["L_opt"], color="C3", lw=1)
        ax.set(xlabel="d_model", ylabel="validation loss", title=f"Held-out budget C={design.HELD_OUT_BUDGET:.2g}")
        ax.legend(fontsize=7)
        _save(fig, out / "heldout.png")


def _interval(values: list[float], fmt: str = ".3f") -> str:
    return f"[{values[0]:{fmt}}, {values[1]:{fmt}}]"


def readme(rows: list[dict], fits: dict, prediction: dict | None) -> str:
    from analyze import fit_rows

    d = fits["design"]
    total, kaplan = fits["conventions"]["total"], fits["conventions"]["non_embedding"]
    a_lo, a_hi = total["bootstrap"]["a"]
    a_ok = (a_lo > 0 or a_hi < 0) and (a_hi - a_lo) <= A_TARGET_WIDTH
    noise = fits["seed_noise"]
    calibration = json.loads((HERE / "calibration.json").read_text())
    law = calibration["lr_law"]
    lines = [
        "# Scaling study v2: the decoder-only compute-optimal frontier, and a held-out budget",
        "",
        "Every number here is printed by `python experiments/scaling_laws/v2/analyze.py` from the committed",
        "`results.csv` (and `calibration.csv` through `calibration.json`); this file is written by it.",
        "",
        "## Question",
        "",
        "Do decoder-only Transformers, trained compute-optimally on a 2-core CPU, follow an IsoFLOP",
        "frontier N_opt ~ C^a that can be measured (a 95% interval for `a` that excludes 0 and is at",
        "most 0.5 wide) and that predicts the best loss at a budget 3x beyond the fitted ones to 3%?",
        "",
        "## Design",
        "",
        "- Data: `data=english` (Shakespeare minus 3 plays, the King James Bible minus 4 books, GCIDE",
        "  definitions minus 4 letters; byte-level BPE of vocabulary 512, context 128).",
        f"- Sizes: {', '.join(f'{s} ({int(p)})' for s, p in _sizes(rows))} total parameters;",
        "  >= 2 layers, d_ff = 4 d_model.",
        f"- Budgets: {d['fit_budgets']} fit budgets ({', '.join(f'{b:.3g}' for b in design.FIT_BUDGETS)} FLOPs,"
        f" {d['decades']:.2f} decades), held-out {design.HELD_OUT_BUDGET:.3g}"
        f" ({d['held_out_over_largest_fit']:.2f}x the largest).",
        "- Each size is one constant-rate trunk with a (1-sqrt) cooldown branch (20% of the budget) at every",
        f"  budget it serves: those within {design.SPAN}x of a prior optimum of {design.PRIOR_TOKENS_PER_PARAM:g}"
        " tokens per parameter, and, after the first fit stage put the minima at 39-68 tokens per parameter"
        f" (the ladder shift), of {design.SHIFTED_TOKENS_PER_PARAM:g} tokens per parameter.",
        f"- Measured on the table: >= {d['min_sizes_per_budget']} sizes per fit budget, >= "
        f"{d['min_sizes_each_side_of_minimum']} on each side of every observed minimum, >= {d['min_updates']} updates"
        f" per point, at most {d['max_epochs']:.2f} epochs.",
        f"- Hyperparameters from `archlab/conf/rules/ladder_v2.yaml` (the calibration sweep: lr x0.5/1/2/4 at d24, d56,"
        f" d80, beta2 0.95 vs 0.99 at d24): lr = {law['lr']:.3g} (N/1e5)^{law['lr_exponent']:.3f}"
        f" (batch/{law['lr_batch']})^{law['lr_batch_exponent']:g},"
        f" beta2 {calibration['b2']}; warmup min(N, 10% of the smallest budget) tokens; batch the largest power",
        "  of two giving the smallest budget >= 300 updates.",
        f"- Noise floor: {noise['seeds']} seeds of {design.SEED_SIZE} at every budget it serves, and of every size at"
        f" the two smallest budgets ({', '.join(f'{b:.2g}' for b in design.SEEDED_BUDGETS)}), where one seed's"
        " spread was largest.",
        "",
        "## Commands",
        "",
        "```bash",
        'pip install -e ".[study]"',
        "python experiments/scaling_laws/v2/ladder.py calibrate && python experiments/scaling_laws/v2/calibration.py",
        "python experiments/scaling_laws/v2/ladder.py fit",
        "python experiments/scaling_laws/v2/analyze.py --collect --lock   # locks prediction.json (commit it)",
        "python experiments/scaling_laws/v2/ladder.py heldout              # extends trunks around the prediction",
        "python experiments/scaling_laws/v2/ladder.py families",
        "python experiments/scaling_laws/v2/analyze.py --collect",
        "```",
        "",
        "## Results",
        "",
        "### IsoFLOP profiles (total parameters)",
        "",
        "| budget C | sizes | observed min | below/above | N_opt | D_opt | D/N | L_opt | interior |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in total["profiles"]:
        lines.append(f"| {p['budget']:.3g} | {len(p['sizes'])} | {p['observed_min']} | {p['below_above'][0]}/"
                     f"{p['below_above'][1]} | {p['N_opt']:,.0f} | {p['D_opt']:,.0f} | {p['D_opt'] / p['N_opt']:.1f} |"
                     f" {p['L_opt']:.4f} | {'yes' if p['interior'] else 'NO'} |")
    lines += [
        "",
        "### The frontier",
        "",
        "| convention | a | a 95% | b | b 95% | L(C) = E + A C^-alpha |",
        "|---|---|---|---|---|---|",
    ]
    for name, conv in (("total (with head FLOPs)", total), ("non-embedding (Kaplan)", kaplan)):
        lc = conv["L_of_C"]
        lines.append(f"| {name} | {conv['a']:.3f} | {_interval(conv['bootstrap']['a'])} | {conv['b']:.3f} |"
                     f" {_interval(conv['bootstrap']['b'])} | E={lc['E']:.3f}, A={lc['A']:.3g}, alpha={lc['alpha']:.3f} |")
    a3 = fits["approach3"]
    lines += [
        "",
        f"Intervals: {total['bootstrap']['resamples']} bootstrap resamples within budgets, each loss perturbed by"
        " one seed's standard deviation at its budget (pooled over the sizes trained with 3 seeds there; the"
        " nearest measured budget's where none was), divided by the square root of the point's seeds: "
        + ", ".join(f"{b:.2g}: {s:.4f} ({noise['sizes_per_budget'][b]} sizes)" for b, s in noise["per_budget_sd"].items())
        + f" nats (pooled {noise['pooled_sd']:.4f}); {total['bootstrap']['failed']} resamples without >= 3 interior"
        " minima were dropped. A point with several seeds is their mean.",
        "",
        f"Chinchilla approach 3 over all {len(fit_rows(rows))} points: L = {a3['E']:.3f} + {a3['A']:.3g}/N^{a3['alpha']:.3f}"
        f" + {a3['B']:.3g}/D^{a3['beta']:.3f}, so a = {a3['a']:.3f} {_interval(a3['bootstrap'].get('a', [math.nan] * 2))},"
        f" b = {a3['b']:.3f} ({a3['bootstrap']['resamples']} resamples, warm-started).",
        "",
        "### The held-out budget",
        "",
    ]
    if prediction is None:
        lines.append("No prediction is locked yet (`analyze.py --lock`).")
    else:
        lines += [
            f"Locked before any held-out run (`prediction.json`): at C = {prediction['budget_flops']:.3g},"
            f" N_opt = {prediction['N_opt']:,.0f} {_interval(prediction['N_opt_95'], ',.0f')},"
            f" best loss {prediction['L_opt']:.4f} {_interval(prediction['L_opt_95'], '.4f')}"
            f" (approach 3: {prediction['approach3']['L_opt']:.4f} at N = {prediction['approach3']['N_opt']:,.0f}).",
        ]
        observed = fits.get("held_out_observed")
        if observed is None:
            lines.append("The held-out runs have not been run yet.")
        else:
            lines.append(
                f"Observed: best {observed['best_observed_loss']:.4f} ({observed['best_observed_size']}) over"
                f" {', '.join(observed['sizes'])}; error of the prediction {100 * observed['relative_error']:+.2f}%"
                f" (target 3%: {'met' if observed['within_target'] else 'NOT met'}); seed spread at"
                f" the largest seed budget {_last_range(noise)}. The observed best is"
                f" {'inside' if prediction['L_opt_95'][0] <= observed['best_observed_loss'] <= prediction['L_opt_95'][1] else 'OUTSIDE'}"
                f" the locked 95% interval; approach 3's locked value misses by"
                f" {100 * (prediction['approach3']['L_opt'] - observed['best_observed_loss']) / observed['best_observed_loss']:+.2f}%;"
                f" the best observed size ({observed['best_observed_size']}) is"
                f" {'inside' if prediction['N_opt_95'][0] <= design.size_plan(observed['best_observed_size'])[0] <= prediction['N_opt_95'][1] else 'OUTSIDE'}"
                " the locked N_opt interval.")
    lines += ["", "### The three families at equal compute", ""]
    fam = fits.get("families") or {}
    if not fam:
        lines.append("The family ladders (`ladder.py families`) have not been run yet.")
    else:
        lines += [
            "Each family on its own objective (decoder: causal LM; encoder-only: MLM; encoder-decoder: span",
            "corruption with L+L layers against the decoder's L) at the family ladder's budgets; the encoder",
            "families over the family ladder's sizes (d12-d56: the first families stage, d24-d56, put the",
            "encoder-only minimum at its smallest size at every budget, so d12-d20 were added), the decoder",
            "over every size its fit stage trained there. Frontier: the lowest loss per budget,",
            "L_min = A C^-alpha; IsoFLOP a: log N_opt against log C through the interior parabola minima.",
            "95% intervals resample sizes within budgets and add the decoder's seed noise at each budget.",
            "",
            "| family | sizes | budgets | alpha | alpha 95% | lowest-loss size per budget | IsoFLOP a |",
            "|---|---|---|---|---|---|---|",
        ]
        for name in ("decoder_only", "encoder_only", "encoder_decoder"):
            if name not in fam:
                continue
            f = fam[name]
            if "a_95" in f:
                a_text = f"{f['a']:.2f} {_interval(f['a_95'])} ({f['interior_budgets']} interior minima)"
            elif "a" in f:
                a_text = f"{f['a']:.2f} (2 interior minima: no interval)"
            else:
                a_text = f"not measured ({f['interior_budgets']} interior minima)"
            lines.append(f"| {name} | {', '.join(f['sizes'])} | {len(f['budgets'])} | {f['alpha']:.3f} |"
                         f" {_interval(f['alpha_95'])} | {', '.join(f['argmin'])} | {a_text} |")
        if fam.get("continuation"):
            lines += ["", "Continuation bits per byte (the same held-out windows; lower is better):", "",
                      "| size | budget | decoder-only | encoder-decoder |", "|---|---|---|---|"]
            for p in fam["continuation"]:
                lines.append(f"| {p['size']} | {p['budget']:.3g} | {p['decoder_bpb']:.4f} |"
                             f" {p['encoder_decoder_bpb']:.4f} |")
            wins = sum(p["decoder_bpb"] < p["encoder_decoder_bpb"] for p in fam["continuation"])
            lines += ["", f"The decoder scores lower at {wins} of {len(fam['continuation'])} matched points."]
    lines += [
        "",
        "## Targets",
        "",
        f"- `a`'s 95% interval (total) {_interval(total['bootstrap']['a'])}: width {a_hi - a_lo:.3f}, "
        f"{'excludes' if a_lo > 0 or a_hi < 0 else 'does not exclude'} 0: **{'met' if a_ok else 'NOT met'}**.",
    ]
    observed = fits.get("held_out_observed")
    if prediction is not None and observed is not None:
        lines.append(f"- Held-out best loss within 3% of the locked prediction: "
                     f"**{'met' if observed['within_target'] else 'NOT met'}** "
                     f"({100 * observed['relative_error']:+.2f}%).")
    else:
        lines.append("- Held-out best loss within 3% of the locked prediction: not yet measured.")
    lines += ["", "## Plots", "", "![loss vs FLOPs](plots/loss_vs_flops.png)", "![IsoFLOP](plots/isoflop.png)",
              "![frontier](plots/frontier.png)"]
    if fits.get("families"):
        lines.append("![families](plots/families.png)")
    if (HERE / "plots" / "heldout.png").exists() and observed is not None:
        lines.append("![held-out](plots/heldout.png)")
    lines += ["", "## Conclusion", "", conclusion(total, a_ok, prediction, observed), ""]
    return "\n".join(lines)


def _sizes(rows: list[dict]) -> list[tuple[str, float]]:
    seen = {r["size"]: r["params_total"] for r in rows if r["family"] == "decoder_only"}
    return sorted(seen.items(), key=lambda kv: kv[1])


def _last_range(noise: dict) -> str:
    if not noise["per_budget_range"]:
        return "not measured"
    b, ranges = max(noise["per_budget_range"].items())
    return ", ".join(f"{r:.4f} nats for {s}" for s, r in ranges.items()) + f" (max - min of its seeds at C={b:.2g})"


def conclusion(total: dict, a_ok: bool, prediction: dict | None, observed: dict | None) -> str:
    lo, hi = total["bootstrap"]["a"]
    parts = [f"The IsoFLOP exponent is a = {total['a']:.2f} (95% {lo:.2f} to {hi:.2f}) over "
             f"{total['n_budgets']} budgets with interior minima: "
             + ("measured to the precision the study set itself." if a_ok else
                "not measured to the precision the study set itself (see Targets).")]
    if prediction is not None and observed is not None:
        parts.append(f"The locked prediction of the held-out best loss was {prediction['L_opt']:.3f}; the runs gave "
                     f"{observed['best_observed_loss']:.3f} ({100 * observed['relative_error']:+.1f}%), "
                     + ("within" if observed["within_target"] else "outside") + " the 3% target.")
    return " ".join(parts)


def family_rows(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        if r["stage"] == "families":
            out[r["family"]].append(r)
    return out
