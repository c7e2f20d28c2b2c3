"""Scaling-law fits: Kaplan power laws, Chinchilla approaches 2 and 3, bootstrap intervals, plots.

Methods follow Kaplan et al. 2020, Hoffmann et al. 2022 (Chinchilla) and the
Besiroglu et al. 2024 replication. Two modules that need JAX are imported on their own:
``archlab.scaling.records`` (one record per finished run directory, the rows of a study's CSV)
and ``archlab.scaling.continuation`` (continuation bits per byte, the generative metric shared
by decoder-only and encoder-decoder models).
"""

from archlab.scaling.bootstrap import bootstrap
from archlab.scaling.fits import (
    CHINCHILLA_GRID,
    CONVENTIONS,
    ChinchillaFit,
    PowerLawFit,
    count_parameters,
    fit_chinchilla,
    fit_power_law,
    runs_to_arrays,
)
from archlab.scaling.isoflop import (
    IsoFlopProfile,
    IsoFlopResult,
    Predictability,
    fit_isoflop_profiles,
    group_by_budget,
    predictability,
)
from archlab.scaling.plots import plot_isoflop_profiles, plot_loss_vs_flops, plot_n_opt_vs_compute

__all__ = [
    "CHINCHILLA_GRID",
    "CONVENTIONS",
    "ChinchillaFit",
    "IsoFlopProfile",
    "IsoFlopResult",
    "PowerLawFit",
    "Predictability",
    "bootstrap",
    "count_parameters",
    "fit_chinchilla",
    "fit_isoflop_profiles",
    "fit_power_law",
    "group_by_budget",
    "plot_isoflop_profiles",
    "plot_loss_vs_flops",
    "plot_n_opt_vs_compute",
    "predictability",
    "runs_to_arrays",
]
