"""Study v2's fits, as pure functions of the results table's rows (no I/O, no plots).

- ``profiles``: per fit budget, a parabola in log10 N over the WINDOW sizes nearest the observed
  minimum (Chinchilla approach 2); the minimum must be interior (flagged otherwise).
- ``frontier``: N_opt = k C^a and D_opt = k_D C^b through the interior minima; L(C) = E + A C^-alpha
  through their losses.
- ``bootstrap_frontier``: resample each budget's points with replacement, add the measured seed
  noise to every loss, refit: percentile intervals for a, b and the held-out predictions.
- ``approach3``: L(N, D) = E + A/N^alpha + B/D^beta over every point (Besiroglu et al. 2024: Huber
  1e-3 on log loss, L-BFGS-B from a grid, tight tolerances), with its compute-optimal allocation
  under the study's exact FLOPs per token.

Counting conventions: ``total`` (every parameter, FLOPs per token with attention and the output
head: Chinchilla, Porian et al.) and ``non_embedding`` (Kaplan et al.: embeddings excluded).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from archlab.scaling import fit_chinchilla, fit_power_law

WINDOW = 5  # sizes per parabola, centred on the observed minimum
CONVENTIONS = ("total", "non_embedding")
# Approach 3's start grid: 432 starts (Chinchilla's own grid is 4,500: ~8 minutes per fit on this
# machine); bootstrap refits start from the full fit's optimum and two neighbours (warm_grid).
GRID = {"a": [0.0, 5.0, 10.0, 20.0], "b": [0.0, 5.0, 10.0, 20.0], "e": [-1.0, 0.0, 1.0],
        "alpha": [0.2, 0.5, 1.0], "beta": [0.2, 0.5, 1.0]}


def counted(row: dict, convention: str) -> tuple[float, float]:
    """(N, FLOPs per token) of a row under ``convention``."""
    if convention == "total":
        return float(row["params_total"]), float(row["flops_per_token"])
    return float(row["params_non_embedding"]), float(row["flops_per_token_non_embedding"])


@dataclass(frozen=True)
class Point:
    size: str
    N: float
    D: float
    C: float
    loss: float  # the mean over the point's seeds
    seeds: int = 1


@dataclass(frozen=True)
class Profile:
    budget: float  # the budget label: planned total training FLOPs
    C: float  # under the convention: geometric mean of the window's FLOPs
    points: tuple[Point, ...]  # every size at this budget, by N
    window: tuple[Point, ...]  # the ones the parabola is fitted to
    coeffs: tuple[float, float, float]
    N_opt: float
    D_opt: float
    L_opt: float
    interior: bool  # observed minimum not at the edge of the sizes, vertex inside the window

    @property
    def observed_min(self) -> Point:
        return min(self.points, key=lambda p: p.loss)

    def sides(self) -> tuple[int, int]:
        """Sizes strictly below and above the observed minimum."""
        n_min = self.observed_min.N
        return sum(p.N < n_min for p in self.points), sum(p.N > n_min for p in self.points)


def points_by_budget(rows: list[dict], convention: str) -> dict[float, list[Point]]:
    """One point per (budget, size): its seeds' mean loss."""
    groups: dict[tuple[float, str], list[dict]] = defaultdict(list)
    for r in rows:
        groups[(float(r["budget_flops"]), r["size"])].append(r)
    out: dict[float, list[Point]] = defaultdict(list)
    for (budget, size), group in groups.items():
        n, fpt = counted(group[0], convention)
        tokens = float(group[0]["tokens"])
        out[budget].append(Point(size, n, tokens, fpt * tokens, float(np.mean([r["val_loss"] for r in group])),
                                 len(group)))
    return {b: sorted(ps, key=lambda p: p.N) for b, ps in sorted(out.items())}


def fit_profile(budget: float, points: list[Point], window: int = WINDOW) -> Profile:
    """The parabola through the ``window`` sizes around the observed minimum of one budget."""
    i = int(np.argmin([p.loss for p in points]))
    lo = max(0, min(i - window // 2, len(points) - window))
    chosen = points[lo:lo + window]
    x = np.log10([p.N for p in chosen])
    y = np.array([p.loss for p in chosen])
    c_mean = float(np.exp(np.mean(np.log([p.C for p in chosen]))))
    if len(chosen) < 3 or np.unique(x).size < 3:
        return Profile(budget, c_mean, tuple(points), tuple(chosen), (math.nan,) * 3, math.nan, math.nan, math.nan,
                       False)
    c2, c1, c0 = (float(v) for v in np.polyfit(x, y, 2))
    edge = i == 0 or i == len(points) - 1
    if c2 <= 0:
        return Profile(budget, c_mean, tuple(points), tuple(chosen), (c2, c1, c0), math.nan, math.nan, math.nan,
                       False)
    x_opt = -c1 / (2 * c2)
    if not x.min() - 1 <= x_opt <= x.max() + 1:  # a nearly flat parabola: no usable vertex (and 10**x overflows)
        return Profile(budget, c_mean, tuple(points), tuple(chosen), (c2, c1, c0), math.nan, math.nan, math.nan,
                       False)
    # D at the vertex: D = C / fpt(N) along the budget, interpolated in log-log over the window.
    slope, intercept = np.polyfit(x, np.log10([p.D for p in chosen]), 1)
    return Profile(budget, c_mean, tuple(points), tuple(chosen), (c2, c1, c0), float(10**x_opt),
                   float(10 ** (intercept + slope * x_opt)), float(np.polyval([c2, c1, c0], x_opt)),
                   bool(not edge and x.min() <= x_opt <= x.max()))


def profiles(rows: list[dict], convention: str = "total") -> list[Profile]:
    return [fit_profile(b, ps) for b, ps in points_by_budget(rows, convention).items()]


def line(c: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(exponent, coefficient) of y = coefficient * c^exponent, least squares in log-log."""
    slope, intercept = np.polyfit(np.log(c), np.log(y), 1)
    return float(slope), float(math.exp(intercept))


def frontier(profs: list[Profile]) -> dict:
    """a, b and L(C) through the interior minima."""
    good = [p for p in profs if p.interior]
    if len(good) < 3:
        raise ValueError(f"{len(good)} interior IsoFLOP minima; the frontier needs >= 3")
    c = np.array([p.C for p in good])
    a, k = line(c, np.array([p.N_opt for p in good]))
    b, k_d = line(c, np.array([p.D_opt for p in good]))
    lc = fit_power_law(c, np.array([p.L_opt for p in good]))
    return {"a": a, "k": k, "b": b, "k_D": k_d, "L_E": lc.E, "L_A": lc.A, "L_alpha": lc.alpha,
            "n_budgets": len(good), "law": lc}


def seed_noise(rows: list[dict]) -> dict:
    """The standard deviation of one seed's final loss, per budget: pooled over the sizes trained with
    several seeds there (the root mean within-size variance); also its overall pooled value."""
    groups: dict[tuple[float, str], list[float]] = defaultdict(list)
    for r in rows:
        groups[(float(r["budget_flops"]), r["size"])].append(float(r["val_loss"]))
    variances: dict[float, list[float]] = defaultdict(list)
    spread: dict[float, dict[str, float]] = defaultdict(dict)
    for (budget, size), losses in sorted(groups.items()):
        if len(losses) > 1:
            variances[budget].append(float(np.var(losses, ddof=1)))
            spread[budget][size] = float(np.ptp(losses))
    per = {b: float(np.sqrt(np.mean(v))) for b, v in sorted(variances.items())}
    pooled = float(np.sqrt(np.mean([v for vs in variances.values() for v in vs]))) if variances else 0.0
    return {"per_budget_sd": per, "pooled_sd": pooled, "per_budget_range": dict(spread),
            "sizes_per_budget": {b: len(v) for b, v in sorted(variances.items())},
            "seeds": max((len(v) for v in groups.values()), default=0)}


def noise_at(noise_sd: float | dict[float, float], budget: float) -> float:
    """The seed noise at ``budget``: a constant, or the measured value at the nearest budget (log scale)."""
    if not isinstance(noise_sd, dict):
        return float(noise_sd)
    if not noise_sd:
        return 0.0
    nearest = min(noise_sd, key=lambda b: abs(math.log(b / budget)))
    return float(noise_sd[nearest])


def resampled_profiles(by_budget: dict[float, list[Point]], rng: np.random.Generator,
                       noise_sd: float | dict[float, float]) -> list[Profile]:
    """One bootstrap draw: each budget's sizes resampled with replacement, each loss plus seed noise."""
    profs = []
    for budget, points in by_budget.items():
        for _ in range(100):  # a parabola needs 3 distinct sizes
            idx = np.sort(rng.choice(len(points), size=len(points), replace=True))
            if np.unique(idx).size >= 3:
                break
        sd = noise_at(noise_sd, budget)  # one seed's; a mean of k seeds has sd / sqrt(k)
        noisy = [Point(points[j].size, points[j].N, points[j].D, points[j].C,
                       points[j].loss + rng.normal(0.0, sd / math.sqrt(points[j].seeds)), points[j].seeds)
                 for j in idx]
        profs.append(fit_profile(budget, noisy))
    return profs


def bootstrap_exponent(rows: list[dict], *, noise_sd: float | dict[float, float], n_resamples: int = 1000,
                       seed: int = 0) -> tuple[list[float], int]:
    """The 95% percentile interval of the IsoFLOP exponent ``a`` alone (no L(C) fit per draw), and how many
    draws had fewer than 3 interior minima (dropped)."""
    rng = np.random.default_rng(seed)
    by_budget = points_by_budget(rows, "total")
    draws, failed = [], 0
    for _ in range(n_resamples):
        interior = [p for p in resampled_profiles(by_budget, rng, noise_sd) if p.interior]
        if len(interior) < 3:
            failed += 1
            continue
        draws.append(line(np.array([p.C for p in interior]), np.array([p.N_opt for p in interior]))[0])
    return [float(v) for v in np.percentile(draws, [2.5, 97.5])] if draws else [math.nan, math.nan], failed


def bootstrap_frontier(rows: list[dict], convention: str, held_out: float, *, noise_sd: float | dict[float, float],
                       n_resamples: int = 1000, seed: int = 0) -> dict:
    """Percentile 95% intervals of a, b, N_opt and L_opt at ``held_out`` (total FLOPs).

    ``noise_sd``: the seed standard deviation added to every loss, one value or one per budget.
    """
    rng = np.random.default_rng(seed)
    by_budget = points_by_budget(rows, convention)
    c_scale = held_out_c(rows, convention, held_out)
    draws: dict[str, list[float]] = defaultdict(list)
    failed = 0
    for _ in range(n_resamples):
        profs = resampled_profiles(by_budget, rng, noise_sd)
        try:
            f = frontier(profs)
        except (ValueError, np.linalg.LinAlgError):
            failed += 1
            continue
        draws["a"].append(f["a"])
        draws["b"].append(f["b"])
        draws["N_opt_held_out"].append(f["k"] * c_scale ** f["a"])
        draws["L_opt_held_out"].append(float(f["law"].predict(c_scale)))
    out = {k: [float(v) for v in np.percentile(vals, [2.5, 97.5])] for k, vals in draws.items()}
    out["resamples"], out["failed"] = n_resamples, failed
    return out


def held_out_c(rows: list[dict], convention: str, held_out: float) -> float:
    """The held-out budget in the convention's FLOPs (total: itself; non-embedding: scaled like the fit points)."""
    if convention == "total":
        return held_out
    ratio = [counted(r, "non_embedding")[1] / counted(r, "total")[1] for r in rows]
    return held_out * float(np.exp(np.mean(np.log(ratio))))


def fpt_of_n(rows: list[dict]):
    """FLOPs per token as a function of total N, log-log interpolated over the sizes (extrapolated linearly)."""
    pairs = sorted({(float(r["params_total"]), float(r["flops_per_token"])) for r in rows})
    log_n, log_f = np.log([p[0] for p in pairs]), np.log([p[1] for p in pairs])
    slope_hi = (log_f[-1] - log_f[-2]) / (log_n[-1] - log_n[-2])
    slope_lo = (log_f[1] - log_f[0]) / (log_n[1] - log_n[0])

    def fpt(n: np.ndarray) -> np.ndarray:
        ln = np.log(n)
        inside = np.interp(ln, log_n, log_f)
        inside = np.where(ln > log_n[-1], log_f[-1] + slope_hi * (ln - log_n[-1]), inside)
        inside = np.where(ln < log_n[0], log_f[0] + slope_lo * (ln - log_n[0]), inside)
        return np.exp(inside)

    return fpt


def warm_grid(result: dict) -> dict:
    """Starts at a previous fit's optimum (log A, log B, log E, alpha, beta) and two scaled copies of it."""
    fit = result["fit"]
    best = {"a": math.log(fit.A), "b": math.log(fit.B), "e": math.log(fit.E), "alpha": fit.alpha, "beta": fit.beta}
    return {k: [v] if k in ("a", "b", "e") else [0.8 * v, v, 1.25 * v] for k, v in best.items()}


def approach3(rows: list[dict], *, grid: dict | None = None) -> dict:
    """Chinchilla approach 3 on every point (total convention), and its optimum along C = fpt(N) D."""
    n = np.array([float(r["params_total"]) for r in rows])
    d = np.array([float(r["tokens"]) for r in rows])
    loss = np.array([float(r["val_loss"]) for r in rows])
    fit = fit_chinchilla(n, d, loss, init_grid=GRID if grid is None else grid)
    return {"fit": fit, "E": fit.E, "A": fit.A, "B": fit.B, "alpha": fit.alpha, "beta": fit.beta,
            "a": fit.a, "b": fit.b, "fpt": fpt_of_n(rows)}


def approach3_optimum(result: dict, budget: float) -> tuple[float, float, float]:
    """(N_opt, D_opt, L_opt) minimising the fitted law at total FLOPs ``budget`` with the study's fpt(N)."""
    log_n = np.linspace(np.log(1e3), np.log(1e8), 20001)
    n = np.exp(log_n)
    d = budget / result["fpt"](n)
    loss = result["fit"].predict(n, d)
    i = int(np.argmin(loss))
    return float(n[i]), float(d[i]), float(loss[i])


def family_frontier(rows: list[dict], *, noise_sd: float | dict[float, float], n_resamples: int = 1000,
                    seed: int = 0) -> dict:
    """One family's own-objective frontier: the lowest loss per budget, L_min = A C^-alpha (no offset: 4 points),
    the IsoFLOP a where the minima are interior, and bootstrap intervals (resampling sizes, adding seed noise)."""
    by_budget = points_by_budget(rows, "total")
    profs = [fit_profile(b, ps) for b, ps in by_budget.items()]

    def slope(points_of: dict[float, list[Point]]) -> float:
        best = [min(ps, key=lambda p: p.loss) for ps in points_of.values()]
        return -line(np.array([float(b) for b in points_of]), np.array([p.loss for p in best]))[0]

    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n_resamples):
        sample = {}
        for b, ps in by_budget.items():
            idx = rng.choice(len(ps), size=len(ps), replace=True)
            sd = noise_at(noise_sd, b)
            sample[b] = [Point(ps[j].size, ps[j].N, ps[j].D, ps[j].C,
                               ps[j].loss + rng.normal(0.0, sd / math.sqrt(ps[j].seeds)), ps[j].seeds) for j in idx]
        draws.append(slope(sample))
    interior = [p for p in profs if p.interior]
    out = {"budgets": list(by_budget), "sizes": sorted({p.size for ps in by_budget.values() for p in ps}),
           "L_min": [min(p.loss for p in ps) for ps in by_budget.values()],
           "argmin": [min(ps, key=lambda p: p.loss).size for ps in by_budget.values()],
           "alpha": slope(by_budget), "alpha_95": [float(v) for v in np.percentile(draws, [2.5, 97.5])],
           "interior_budgets": len(interior)}
    if len(interior) >= 2:
        out["a"] = line(np.array([p.C for p in interior]), np.array([p.N_opt for p in interior]))[0]
    if len(interior) >= 3:  # the IsoFLOP exponent's interval, resampled as the decoder's is
        out["a_95"], out["a_failed"] = bootstrap_exponent(rows, noise_sd=noise_sd, n_resamples=n_resamples, seed=seed)
    return out
