"""PNG plots for scaling studies: loss vs FLOPs, IsoFLOP parabolas, N_opt vs C.

Figures are built on ``matplotlib.figure.Figure`` directly and saved through the
Agg canvas, so nothing touches pyplot's global state or the session's backend.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from archlab.scaling.fits import ArrayLike, PowerLawFit, positive_array, same_length
from archlab.scaling.isoflop import IsoFlopResult, fit_isoflop_profiles


def _save(fig: Figure, path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(out, dpi=120, format="png")
    return out


def plot_loss_vs_flops(
    C: ArrayLike, loss: ArrayLike, N: ArrayLike, path: str | Path, *, fit: PowerLawFit | None = None
) -> Path:
    """Scatter of loss against training FLOPs (log x), coloured by model size; optional L(C) curve."""
    c, l, n = positive_array("C", C), positive_array("loss", loss), positive_array("N", N)
    same_length(C=c, loss=l, N=n)
    fig = Figure(figsize=(6, 4.2))
    ax = fig.add_subplot()
    points = ax.scatter(c, l, c=n, cmap="viridis", norm=LogNorm(n.min(), max(n.max(), n.min() * 1.01)), s=18)
    fig.colorbar(points, ax=ax, label="parameters N")
    if fit is not None:
        grid = np.logspace(np.log10(c.min()), np.log10(c.max()), 200)
        ax.plot(grid, fit.predict(grid), "k--", lw=1,
                label=f"L = {fit.E:.3g} + {fit.A:.3g}/C^{fit.alpha:.3g}")
        ax.legend(fontsize=8)
    ax.set(xscale="log", xlabel="training FLOPs C", ylabel="loss")
    return _save(fig, path)


def plot_isoflop_profiles(
    N: ArrayLike,
    C: ArrayLike,
    loss: ArrayLike,
    path: str | Path,
    *,
    result: IsoFlopResult | None = None,
    budgets: ArrayLike | None = None,
) -> Path:
    """Loss vs N per budget with each fitted parabola and its vertex; fits the profiles if ``result`` is None."""
    n, c, l = positive_array("N", N), positive_array("C", C), positive_array("loss", loss)
    same_length(N=n, C=c, loss=l)
    result = result or fit_isoflop_profiles(n, c, l, budgets=budgets)
    labels = c if budgets is None else np.asarray(budgets).reshape(-1)
    fig = Figure(figsize=(6, 4.2))
    ax = fig.add_subplot()
    for i, prof in enumerate(result.profiles):
        colour = f"C{i % 10}"
        mask = labels == prof.budget
        ax.scatter(n[mask], l[mask], color=colour, s=16, label=f"C = {prof.C:.2g}")
        x = np.linspace(np.log10(prof.N_range[0]) - 0.1, np.log10(prof.N_range[1]) + 0.1, 100)
        ax.plot(10**x, np.polyval(prof.coeffs, x), color=colour, lw=1)
        if prof.curvature_ok:
            ax.plot(prof.N_opt, prof.L_opt, marker="*" if prof.vertex_in_range else "x", color=colour, ms=10)
    ax.set(xscale="log", xlabel="parameters N", ylabel="loss")
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_n_opt_vs_compute(
    C: ArrayLike, N_opt: ArrayLike, path: str | Path, *, a: float | None = None, k: float | None = None
) -> Path:
    """Compute-optimal sizes against budget on log-log axes with the line ``N_opt = k C**a``.

    Without ``a`` and ``k`` the line is fitted here by least squares in log-log.
    """
    c, n = positive_array("C", C), positive_array("N_opt", N_opt)
    same_length(C=c, N_opt=n)
    if a is None or k is None:
        a, log_k = np.polyfit(np.log10(c), np.log10(n), 1) if c.size > 1 else (1.0, np.log10(n[0] / c[0]))
        k = 10**log_k
    fig = Figure(figsize=(6, 4.2))
    ax = fig.add_subplot()
    ax.scatter(c, n, color="C0", zorder=3, label="IsoFLOP minima")
    grid = np.logspace(np.log10(c.min()) - 0.3, np.log10(c.max()) + 0.3, 50)
    ax.plot(grid, k * grid**a, "k--", lw=1, label=f"N_opt = {k:.3g} C^{a:.3f}")
    ax.set(xscale="log", yscale="log", xlabel="training FLOPs C", ylabel="N_opt")
    ax.legend(fontsize=8)
    return _save(fig, path)
