"""Analyses over compute budgets: IsoFLOP profiles (Chinchilla approach 2) and
how well the smaller budgets predict the largest one."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from archlab.errors import ConfigError
from archlab.scaling.fits import ArrayLike, fit_chinchilla, fit_power_law, positive_array, same_length


def group_by_budget(C: np.ndarray, budgets: ArrayLike | None = None) -> list[tuple[object, float, np.ndarray]]:
    """``(label, budget FLOPs, run indices)`` per budget, smallest budget first.

    Without ``budgets`` runs group by exact equality of ``C``; with labels the
    budget's FLOPs are the geometric mean of its runs' ``C`` (realised FLOPs of
    runs planned for one budget differ slightly).
    """
    labels = C if budgets is None else np.asarray(budgets).reshape(-1)
    same_length(C=C, budgets=labels)
    uniq, inverse = np.unique(labels, return_inverse=True)
    groups = []
    for i, label in enumerate(uniq):
        idx = np.flatnonzero(inverse == i)
        groups.append((label.item() if hasattr(label, "item") else label, float(np.exp(np.log(C[idx]).mean())), idx))
    return sorted(groups, key=lambda g: g[1])


@dataclass(frozen=True)
class IsoFlopProfile:
    """One budget's parabola ``loss = c2 x**2 + c1 x + c0`` with ``x = log10 N``.

    ``N_opt``/``D_opt``/``L_opt`` are NaN when the curvature is not positive
    (no minimum); ``vertex_in_range`` is False when the minimum is extrapolated
    beyond the sampled sizes.
    """

    budget: object
    C: float
    coeffs: tuple[float, float, float]
    N_opt: float
    D_opt: float
    L_opt: float
    n_points: int
    N_range: tuple[float, float]
    curvature_ok: bool
    vertex_in_range: bool

    @property
    def flagged(self) -> bool:
        return not (self.curvature_ok and self.vertex_in_range)


@dataclass(frozen=True)
class IsoFlopResult:
    """Per-budget profiles and the fitted ``N_opt = k C**a``, ``D_opt = k_D C**b``.

    Budgets without a minimum are left out of the line fits; extrapolated
    vertices are kept but flagged in their profile.
    """

    profiles: tuple[IsoFlopProfile, ...]
    a: float
    k: float
    b: float
    k_D: float
    flops_per_token: float

    def n_opt(self, C: ArrayLike | float) -> np.ndarray:
        return self.k * np.asarray(C, dtype=float) ** self.a

    def d_opt(self, C: ArrayLike | float) -> np.ndarray:
        return self.k_D * np.asarray(C, dtype=float) ** self.b

    @property
    def flagged(self) -> list[object]:
        """Budget labels whose vertex is missing or outside the sampled sizes."""
        return [p.budget for p in self.profiles if p.flagged]

    def scalars(self) -> dict[str, float]:
        """Fitted values a bootstrap reports intervals for."""
        return {"a": self.a, "b": self.b, "k": self.k, "k_D": self.k_D}


def _profile(label: object, c: float, n: np.ndarray, loss: np.ndarray, fpt: float) -> IsoFlopProfile:
    x = np.log10(n)
    if np.unique(x).size < 3:
        raise ConfigError(f"budget {label!r} has {np.unique(x).size} distinct model sizes; a parabola needs >= 3.")
    c2, c1, c0 = (float(v) for v in np.polyfit(x, loss, 2))
    curvature_ok = c2 > 0
    # A nearly flat parabola can put its vertex absurdly far away (10**x_opt under- or
    # overflowing): no usable minimum either.
    x_opt = -c1 / (2 * c2) if curvature_ok else float("nan")
    with np.errstate(over="ignore", under="ignore"):
        n_vertex = float(np.power(10.0, x_opt))
    curvature_ok = curvature_ok and 0.0 < n_vertex < np.inf
    if curvature_ok:
        n_opt, l_opt = n_vertex, float(np.polyval([c2, c1, c0], x_opt))
        in_range = bool(x.min() <= x_opt <= x.max())
    else:
        n_opt, l_opt, in_range = float("nan"), float("nan"), False
    return IsoFlopProfile(budget=label, C=c, coeffs=(c2, c1, c0), N_opt=n_opt, D_opt=c / (fpt * n_opt),
                          L_opt=l_opt, n_points=int(n.size), N_range=(float(n.min()), float(n.max())),
                          curvature_ok=curvature_ok, vertex_in_range=in_range)


def fit_isoflop_profiles(
    N: ArrayLike,
    C: ArrayLike,
    loss: ArrayLike,
    *,
    budgets: ArrayLike | None = None,
    flops_per_token: float = 6.0,
) -> IsoFlopResult:
    """Chinchilla approach 2: a parabola in log10 N per budget, then power laws through the minima.

    ``D_opt = C / (flops_per_token * N_opt)``; ``budgets`` optionally labels
    which runs share a budget (default: exact equality of ``C``).
    """
    n_arr, c_arr, l_arr = positive_array("N", N), positive_array("C", C), positive_array("loss", loss)
    same_length(N=n_arr, C=c_arr, loss=l_arr)
    if flops_per_token <= 0:
        raise ConfigError(f"flops_per_token must be > 0, got {flops_per_token}.")
    profiles = tuple(_profile(label, c, n_arr[idx], l_arr[idx], flops_per_token)
                     for label, c, idx in group_by_budget(c_arr, budgets))
    usable = [p for p in profiles if p.curvature_ok]
    if len({p.C for p in usable}) < 2:
        raise ConfigError(f"IsoFLOP needs >= 2 budgets with a loss minimum, got {len(usable)}.")
    log_c = np.log10([p.C for p in usable])
    a, log_k = np.polyfit(log_c, np.log10([p.N_opt for p in usable]), 1)
    b, log_kd = np.polyfit(log_c, np.log10([p.D_opt for p in usable]), 1)
    return IsoFlopResult(profiles=profiles, a=float(a), k=float(10**log_k), b=float(b), k_D=float(10**log_kd),
                         flops_per_token=flops_per_token)


@dataclass(frozen=True)
class Predictability:
    """Best loss at the held-out largest budget: fitted from smaller budgets vs observed.

    ``relative_error = (predicted - actual) / actual``.
    """

    predicted: float
    actual: float
    relative_error: float
    held_out_C: float
    n_train: int
    method: str


def predictability(
    N: ArrayLike,
    C: ArrayLike,
    loss: ArrayLike,
    *,
    D: ArrayLike | None = None,
    method: str = "power_law",
    budgets: ArrayLike | None = None,
    flops_per_token: float = 6.0,
    **fit_kwargs: object,
) -> Predictability:
    """Fit on every budget but the largest, predict the largest budget's best loss.

    ``"power_law"``: ``L(C) = E + A / C**alpha`` through each smaller budget's
    lowest loss (the compute frontier, Kaplan 2020). ``"chinchilla"``: approach 3
    on the smaller budgets' runs, evaluated at the compute-optimal (N, D) of the
    largest budget; D defaults to ``C / (flops_per_token * N)``. ``fit_kwargs``
    go to the fit function.
    """
    if method not in ("power_law", "chinchilla"):
        raise ConfigError(f"method {method!r} is not one of power_law, chinchilla.")
    n_arr, c_arr, l_arr = positive_array("N", N), positive_array("C", C), positive_array("loss", loss)
    same_length(N=n_arr, C=c_arr, loss=l_arr)
    groups = group_by_budget(c_arr, budgets)
    if len(groups) < 2:
        raise ConfigError("predictability needs runs at >= 2 compute budgets.")
    *train, (_, c_max, held) = groups
    actual = float(l_arr[held].min())
    if method == "power_law":
        if len(train) < 3:
            raise ConfigError(f"predicting the largest budget from L(C) needs >= 3 smaller budgets, got {len(train)}.")
        frontier = np.array([l_arr[idx].min() for _, _, idx in train])
        fit = fit_power_law([c for _, c, _ in train], frontier, **fit_kwargs)
        predicted, n_train = float(fit.predict(c_max)), len(train)
    else:
        d_arr = c_arr / (flops_per_token * n_arr) if D is None else positive_array("D", D)
        same_length(N=n_arr, D=d_arr)
        idx = np.concatenate([g[2] for g in train])
        fit = fit_chinchilla(n_arr[idx], d_arr[idx], l_arr[idx], **fit_kwargs)
        n_opt, d_opt = fit.optimal_allocation(c_max, flops_per_token)
        predicted, n_train = float(fit.predict(n_opt, d_opt)), int(idx.size)
    return Predictability(predicted=predicted, actual=actual, relative_error=(predicted - actual) / actual,
                          held_out_C=c_max, n_train=n_train, method=method)
