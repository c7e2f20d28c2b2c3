"""Loss fits: the single-variable power law (Kaplan 2020) and Chinchilla approach 3.

Both are fitted in log-loss space, where a run at 1e6 parameters and one at
1e9 weigh the same, and with a robust (Huber) loss so one diverged run does not
drag the curve (Hoffmann et al. 2022, appendix D.2; Besiroglu et al. 2024).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import least_squares, minimize
from scipy.special import expit, logsumexp

from archlab.errors import ConfigError

ArrayLike = Sequence[float] | np.ndarray

# Hoffmann et al. 2022, appendix D.2: the grid of L-BFGS starts for approach 3.
CHINCHILLA_GRID: dict[str, tuple[float, ...]] = {
    "alpha": (0.0, 0.5, 1.0, 1.5, 2.0),
    "beta": (0.0, 0.5, 1.0, 1.5, 2.0),
    "e": (-1.0, -0.5, 0.0, 0.5, 1.0),
    "a": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    "b": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
}

CONVENTIONS = ("total", "non_embedding")


def positive_array(name: str, values: ArrayLike) -> np.ndarray:
    """``values`` as a 1-D float array, refused unless every entry is finite and > 0."""
    arr = np.asarray(values, dtype=float).reshape(-1)
    if arr.size == 0:
        raise ConfigError(f"{name} is empty; a fit needs data points.")
    if not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        raise ConfigError(f"{name} must be finite and strictly positive, got min {np.nanmin(arr)!r}.")
    return arr


def same_length(**arrays: np.ndarray) -> int:
    """Common length of ``arrays``; raises ConfigError naming them when they differ."""
    lengths = {k: len(v) for k, v in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise ConfigError(f"inputs must have equal lengths, got {lengths}.")
    return next(iter(lengths.values()))


def count_parameters(record: Mapping[str, float], convention: str = "total") -> tuple[float, float]:
    """(N, C) of one run record under a parameter-counting convention.

    ``"total"``: all parameters and FLOPs per token including embeddings and the
    output head (Chinchilla, Porian et al. 2024). ``"non_embedding"``: Kaplan
    2020, embeddings excluded and C ~ 6 N D. C = FLOPs per token x ``tokens``.
    The record needs ``params_<convention>``, ``flops_per_token_<convention>``
    and ``tokens``.
    """
    if convention not in CONVENTIONS:
        raise ConfigError(f"convention {convention!r} is not one of {', '.join(CONVENTIONS)}.")
    keys = (f"params_{convention}", f"flops_per_token_{convention}", "tokens")
    missing = [k for k in keys if k not in record]
    if missing:
        raise ConfigError(f"run record lacks {', '.join(missing)} needed for the {convention!r} convention.")
    n, fpt, tokens = (float(record[k]) for k in keys)
    return n, fpt * tokens


def runs_to_arrays(
    records: Sequence[Mapping[str, float]], convention: str = "total", loss_key: str = "loss"
) -> dict[str, np.ndarray]:
    """Arrays ``N``, ``D``, ``C``, ``loss`` from run records, counted with ``convention``."""
    pairs = [count_parameters(r, convention) for r in records]
    if any(loss_key not in r for r in records):
        raise ConfigError(f"every run record needs a {loss_key!r} entry.")
    return {
        "N": np.array([p[0] for p in pairs]),
        "D": np.array([float(r["tokens"]) for r in records]),
        "C": np.array([p[1] for p in pairs]),
        "loss": np.array([float(r[loss_key]) for r in records]),
    }


def _huber_sum(r: np.ndarray, delta: float) -> float:
    a = np.abs(r)
    return float(np.sum(np.where(a <= delta, 0.5 * r**2, delta * (a - 0.5 * delta))))


@dataclass(frozen=True)
class PowerLawFit:
    """``L(x) = E + A / x**alpha``; ``r2`` is on the loss itself, ``rmse_log`` on log loss."""

    E: float
    A: float
    alpha: float
    r2: float
    rmse_log: float
    n: int
    with_offset: bool

    def predict(self, x: ArrayLike | float) -> np.ndarray:
        logx = np.log(np.asarray(x, dtype=float))
        return self.E + np.exp(np.log(self.A) - self.alpha * logx)

    def scalars(self) -> dict[str, float]:
        """Fitted values a bootstrap reports intervals for."""
        return {"E": self.E, "A": self.A, "alpha": self.alpha}


def fit_power_law(
    x: ArrayLike, loss: ArrayLike, *, with_offset: bool = True, delta: float = 1e-3
) -> PowerLawFit:
    """Fit ``L(x) = E + A / x**alpha`` (``E = 0`` without offset) to log loss.

    Huber residuals with threshold ``delta`` on log loss, minimised by
    ``scipy.optimize.least_squares`` from several starts; the best is kept.
    """
    x_arr, l_arr = positive_array("x", x), positive_array("loss", loss)
    n = same_length(x=x_arr, loss=l_arr)
    n_params = 3 if with_offset else 2
    if n < n_params:
        raise ConfigError(f"a power law with{'' if with_offset else 'out'} offset needs >= {n_params} points, got {n}.")
    if delta <= 0:
        raise ConfigError(f"delta must be > 0, got {delta}.")
    # Centre log x so the intercept and the slope are not nearly collinear
    # (log C ~ 45 for FLOPs would make them so).
    log_x0 = float(np.mean(np.log(x_arr)))
    u, y = np.log(x_arr) - log_x0, np.log(l_arr)

    if with_offset:
        def resid(p: np.ndarray) -> np.ndarray:
            return np.logaddexp(p[0], p[1] - p[2] * u) - y

        def jac(p: np.ndarray) -> np.ndarray:
            w = expit(p[1] - p[2] * u - p[0])  # the power term's share of the loss
            return np.column_stack([1.0 - w, w, -u * w])

        l_min, l_gm = float(l_arr.min()), float(np.exp(y.mean()))
        grid = []
        fracs, alphas = (0.1, 0.3, 0.5, 0.7, 0.9, 0.97), (0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.7, 1.0)
        for frac, alpha in itertools.product(fracs, alphas):
            e0 = frac * l_min
            grid.append([np.log(e0), np.log(max(l_gm - e0, 1e-3 * l_gm)), alpha])
        # Screen a wide grid by its objective and refine only the best few:
        # least_squares dominates the cost, and bootstraps call this hundreds of times.
        costs = [_huber_sum(resid(np.array(p0)), delta) for p0 in grid]
        starts = [grid[i] for i in np.argsort(costs)[:3]]
        bounds = ([-50.0, -50.0, 0.0], [50.0, 50.0, 10.0])
    else:
        def resid(p: np.ndarray) -> np.ndarray:
            return p[0] - p[1] * u - y

        def jac(p: np.ndarray) -> np.ndarray:
            return np.column_stack([np.ones_like(u), -u])

        slope, intercept = np.polyfit(u, y, 1) if np.ptp(u) > 0 else (0.0, y.mean())
        starts = [[intercept, max(-slope, 0.0)]]
        bounds = ([-50.0, 0.0], [50.0, 10.0])

    best = None
    for p0 in starts:
        p0 = np.clip(p0, np.array(bounds[0]) + 1e-9, np.array(bounds[1]) - 1e-9)
        res = least_squares(resid, p0, jac=jac, bounds=bounds, loss="huber", f_scale=delta,
                            xtol=1e-12, ftol=1e-12, gtol=1e-12, max_nfev=2000)
        if best is None or res.cost < best.cost:
            best = res
    p = best.x
    e_log, a_c, alpha = (p[0], p[1], p[2]) if with_offset else (-np.inf, p[0], p[1])
    E = float(np.exp(e_log))
    A = float(np.exp(a_c + alpha * log_x0))
    pred = E + np.exp(a_c - alpha * u)
    ss_tot = float(np.sum((l_arr - l_arr.mean()) ** 2))
    r2 = 1.0 - float(np.sum((l_arr - pred) ** 2)) / ss_tot if ss_tot > 0 else float("nan")
    rmse = float(np.sqrt(np.mean((np.log(pred) - y) ** 2)))
    return PowerLawFit(E=E, A=A, alpha=float(alpha), r2=r2, rmse_log=rmse, n=n, with_offset=with_offset)


@dataclass(frozen=True)
class ChinchillaFit:
    """``L(N, D) = E + A / N**alpha + B / D**beta`` (Hoffmann et al. 2022, approach 3).

    ``objective`` is the summed Huber loss at the optimum; ``n_starts`` how many
    grid starts were run.
    """

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    objective: float
    n: int
    n_starts: int

    @property
    def a(self) -> float:
        """Exponent of N_opt ~ C**a."""
        return self.beta / (self.alpha + self.beta)

    @property
    def b(self) -> float:
        """Exponent of D_opt ~ C**b."""
        return self.alpha / (self.alpha + self.beta)

    @property
    def G(self) -> float:
        """N_opt = G (C / k)**a with k FLOPs per parameter-token (Hoffmann et al., eq. 4)."""
        return (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / (self.alpha + self.beta))

    def predict(self, N: ArrayLike | float, D: ArrayLike | float) -> np.ndarray:
        logn, logd = np.log(np.asarray(N, dtype=float)), np.log(np.asarray(D, dtype=float))
        return self.E + np.exp(np.log(self.A) - self.alpha * logn) + np.exp(np.log(self.B) - self.beta * logd)

    def optimal_allocation(
        self, C: ArrayLike | float, flops_per_token: float = 6.0
    ) -> tuple[np.ndarray, np.ndarray]:
        """(N_opt, D_opt) minimising the fitted loss under ``C = flops_per_token * N * D``."""
        if not (self.alpha > 0 and self.beta > 0 and self.A > 0 and self.B > 0):
            raise ConfigError(
                f"the fit has alpha={self.alpha:.3g}, beta={self.beta:.3g}, A={self.A:.3g}, B={self.B:.3g}: "
                "without two positive terms the loss has no compute-optimal allocation"
            )
        c = np.asarray(C, dtype=float) / flops_per_token
        n_opt = self.G * c**self.a
        return n_opt, c / n_opt

    def scalars(self) -> dict[str, float]:
        """Fitted values a bootstrap reports intervals for."""
        return {"E": self.E, "A": self.A, "B": self.B, "alpha": self.alpha,
                "beta": self.beta, "a": self.a, "b": self.b}


def _grid_starts(init_grid: Mapping[str, Sequence[float]] | None) -> np.ndarray:
    grid = CHINCHILLA_GRID if init_grid is None else init_grid
    keys = ("a", "b", "e", "alpha", "beta")  # the optimiser's parameter order
    if set(grid) != set(keys) or any(len(grid[k]) == 0 for k in keys):
        raise ConfigError(f"init_grid needs non-empty value lists for exactly {', '.join(keys)}.")
    return np.array(list(itertools.product(*(grid[k] for k in keys))), dtype=float)


def fit_chinchilla(
    N: ArrayLike,
    D: ArrayLike,
    loss: ArrayLike,
    *,
    delta: float = 1e-3,
    init_grid: Mapping[str, Sequence[float]] | None = None,
) -> ChinchillaFit:
    """Chinchilla approach 3: minimise ``sum Huber_delta(LSE(a - alpha log N, b - beta log D, e) - log L)``.

    ``a, b, e`` are log A, log B, log E. L-BFGS-B runs from every point of
    ``init_grid`` (keys ``a, b, e, alpha, beta``; default Chinchilla's 4,500-point
    grid, ~2 minutes for 50 runs on one CPU core: pass a smaller one for
    bootstraps) and the lowest objective wins.
    """
    n_arr, d_arr, l_arr = positive_array("N", N), positive_array("D", D), positive_array("loss", loss)
    n = same_length(N=n_arr, D=d_arr, loss=l_arr)
    if n < 5:
        raise ConfigError(f"the Chinchilla law has 5 parameters and needs >= 5 runs, got {n}.")
    if delta <= 0:
        raise ConfigError(f"delta must be > 0, got {delta}.")
    starts = _grid_starts(init_grid)
    log_n, log_d, log_l = np.log(n_arr), np.log(d_arr), np.log(l_arr)

    def objective(p: np.ndarray) -> tuple[float, np.ndarray]:
        terms = np.stack([p[0] - p[3] * log_n, p[1] - p[4] * log_d, np.full(n, p[2])])
        lse = logsumexp(terms, axis=0)
        r = lse - log_l
        value = _huber_sum(r, delta)
        psi = np.clip(r, -delta, delta)
        w = np.exp(terms - lse)  # d lse / d term
        grad = np.array([
            np.sum(psi * w[0]), np.sum(psi * w[1]), np.sum(psi * w[2]),
            -np.sum(psi * w[0] * log_n), -np.sum(psi * w[1] * log_d),
        ])
        return value, grad

    # The summed Huber loss is tiny near the optimum (residuals ~ delta), so the
    # default ftol/gtol would stop L-BFGS-B early (Besiroglu et al. 2024).
    options = {"ftol": 1e-15, "gtol": 1e-12, "maxiter": 2000}
    best_p, best_f = None, np.inf
    with np.errstate(over="ignore", invalid="ignore"):
        for p0 in starts:
            res = minimize(objective, p0, jac=True, method="L-BFGS-B", options=options)
            if np.isfinite(res.fun) and res.fun < best_f:
                best_p, best_f = res.x, float(res.fun)
    if best_p is None:
        raise ConfigError("every Chinchilla fit start diverged; check the data for extreme values.")
    a, b, e, alpha, beta = best_p
    return ChinchillaFit(E=float(np.exp(e)), A=float(np.exp(a)), B=float(np.exp(b)), alpha=float(alpha),
                         beta=float(beta), objective=best_f, n=n, n_starts=len(starts))
