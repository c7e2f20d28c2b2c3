"""Non-parametric bootstrap over runs, for any of the scaling fits."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from archlab.errors import ConfigError
from archlab.scaling.fits import ArrayLike


def _scalars(result: Any) -> dict[str, float]:
    if hasattr(result, "scalars"):
        return {k: float(v) for k, v in result.scalars().items()}
    if isinstance(result, Mapping):
        return {k: float(v) for k, v in result.items()}
    raise ConfigError(f"fit_fn returned {type(result).__name__}, which has no scalars() and is not a mapping.")


def _resample(rng: np.random.Generator, groups: list[np.ndarray], min_distinct: int) -> np.ndarray:
    picks = []
    for idx in groups:
        need = min(min_distinct, idx.size)
        # Redraw a group that lost too many distinct runs (an IsoFLOP parabola
        # needs 3 sizes); bounded so a pathological group cannot loop forever.
        for _ in range(100):
            draw = rng.choice(idx, size=idx.size, replace=True)
            if np.unique(draw).size >= need:
                break
        picks.append(draw)
    return np.concatenate(picks)


def bootstrap(
    fit_fn: Callable[..., Any],
    data: Mapping[str, ArrayLike],
    *,
    n_resamples: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
    group_key: str | None = None,
    min_distinct: int = 3,
) -> dict[str, tuple[float, float, float]]:
    """``name -> (estimate, lo, hi)``: percentile intervals of every scalar ``fit_fn`` reports.

    ``fit_fn(**data)`` must return an object with ``scalars()`` (all fits here
    do) or a mapping; bind other arguments with ``functools.partial``. Runs are
    drawn with replacement, within each value of ``data[group_key]`` when given
    (e.g. the budget for IsoFLOP), keeping >= ``min_distinct`` distinct runs per
    group. The estimate is the fit on the full data. Resamples whose fit raises
    ConfigError are skipped with a warning; same ``seed``, same intervals.
    """
    if not data:
        raise ConfigError("bootstrap needs at least one data array.")
    arrays = {k: np.asarray(v) for k, v in data.items()}
    lengths = {k: (v.shape[0] if v.ndim else -1) for k, v in arrays.items()}
    if len(set(lengths.values())) != 1 or -1 in lengths.values():
        raise ConfigError(f"bootstrap data must be 1-D arrays of one length, got lengths {lengths}.")
    if n_resamples < 1:
        raise ConfigError(f"n_resamples must be >= 1, got {n_resamples}.")
    if not 0 < ci < 1:
        raise ConfigError(f"ci must lie strictly between 0 and 1, got {ci}.")
    if group_key is not None and group_key not in arrays:
        raise ConfigError(f"group_key {group_key!r} is not one of the data keys {sorted(arrays)}.")

    estimate = _scalars(fit_fn(**arrays))
    n = next(iter(lengths.values()))
    if group_key is None:
        groups = [np.arange(n)]
    else:
        _, inverse = np.unique(arrays[group_key], return_inverse=True)
        groups = [np.flatnonzero(inverse == g) for g in range(inverse.max() + 1)]

    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {k: [] for k in estimate}
    failed = 0
    for _ in range(n_resamples):
        idx = _resample(rng, groups, min_distinct)
        try:
            values = _scalars(fit_fn(**{k: v[idx] for k, v in arrays.items()}))
        except ConfigError:
            failed += 1
            continue
        for k in samples:
            samples[k].append(values.get(k, np.nan))
    if failed > n_resamples // 2:
        raise ConfigError(f"{failed} of {n_resamples} bootstrap fits failed; the data cannot support intervals.")
    if failed:
        warnings.warn(f"{failed} of {n_resamples} bootstrap fits failed and were skipped.", stacklevel=2)

    q = 100 * np.array([(1 - ci) / 2, 1 - (1 - ci) / 2])
    out = {}
    for k, est in estimate.items():
        vals = np.asarray(samples[k], dtype=float)
        lo, hi = np.nanpercentile(vals, q) if np.isfinite(vals).any() else (np.nan, np.nan)
        out[k] = (est, float(lo), float(hi))
    return out
