"""Scaling fits recover known laws from synthetic runs; bad input is refused with ConfigError."""

from __future__ import annotations

import os

# scipy's L-BFGS-B calls OpenBLAS on 5-vectors; with OpenBLAS threads on a busy
# 2-core machine each Chinchilla fit ran 5-10x slower (measured). Effective only
# when this module is the first to load numpy, e.g. when run on its own.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import functools  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from archlab.errors import ConfigError  # noqa: E402
from archlab.scaling import (  # noqa: E402
    CHINCHILLA_GRID,
    bootstrap,
    count_parameters,
    fit_chinchilla,
    fit_isoflop_profiles,
    fit_power_law,
    plot_isoflop_profiles,
    plot_loss_vs_flops,
    plot_n_opt_vs_compute,
    predictability,
    runs_to_arrays,
)

# Hoffmann et al. 2022, approach 3 (see shared/NOTES.md "Reference numbers").
E, A, B, ALPHA, BETA = 1.69, 406.4, 410.7, 0.34, 0.28
EXP_A, EXP_B = BETA / (ALPHA + BETA), ALPHA / (ALPHA + BETA)
G = (ALPHA * A / (BETA * B)) ** (1 / (ALPHA + BETA))
# A few starts around the basin keep the tests fast; the full 4,500-point grid is the default.
SMALL_GRID = {"alpha": [0.5, 1.0], "beta": [0.5, 1.0], "e": [0.0, 0.5], "a": [5.0, 10.0], "b": [5.0, 10.0]}
ONE_START = {"alpha": [0.5], "beta": [0.5], "e": [0.5], "a": [6.0], "b": [6.0]}


def chinchilla_loss(N: np.ndarray, D: np.ndarray) -> np.ndarray:
    return E + A / N**ALPHA + B / D**BETA


def true_n_opt(C: float | np.ndarray) -> np.ndarray:
    return G * (np.asarray(C) / 6) ** EXP_A


def isoflop_runs(budgets=(1e18, 1e19, 1e20, 1e21, 1e22), sizes=9, noise=0.0, seed=0):
    """Runs spread log-symmetrically (N_opt/4 .. 4 N_opt) around each budget's true optimum."""
    rng = np.random.default_rng(seed)
    N = np.concatenate([true_n_opt(c) * np.logspace(-0.6, 0.6, sizes) for c in budgets])
    C = np.repeat(np.asarray(budgets, dtype=float), sizes)
    loss = chinchilla_loss(N, C / (6 * N)) * np.exp(rng.normal(0.0, noise, N.size))
    return N, C, loss


def power_law_points(noise=0.0, seed=0, n=15):
    rng = np.random.default_rng(seed)
    x = np.logspace(6, 11, n)
    return x, (1.7 + 400.0 / x**0.34) * np.exp(rng.normal(0.0, noise, n))


# ---------------------------------------------------------------- power law


def test_power_law_recovers_noiseless_parameters():
    x, loss = power_law_points()
    fit = fit_power_law(x, loss)
    assert fit.E == pytest.approx(1.7, rel=1e-6)
    assert fit.A == pytest.approx(400.0, rel=1e-5)
    assert fit.alpha == pytest.approx(0.34, rel=1e-6)
    assert fit.r2 == pytest.approx(1.0, abs=1e-10) and fit.rmse_log < 1e-8 and fit.n == 15
    np.testing.assert_allclose(fit.predict(x), loss, rtol=1e-8)


def test_power_law_recovers_parameters_under_small_noise():
    x, loss = power_law_points(noise=0.005, seed=1)
    fit = fit_power_law(x, loss)
    assert fit.E == pytest.approx(1.7, abs=0.05)
    assert fit.alpha == pytest.approx(0.34, abs=0.03)
    assert fit.r2 > 0.999 and fit.rmse_log < 0.01


def test_power_law_without_offset_is_a_line_in_log_space():
    x = np.logspace(15, 21, 10)  # FLOP-sized inputs must not upset the fit
    fit = fit_power_law(x, 50.0 / x**0.05, with_offset=False)
    assert fit.E == 0.0
    assert fit.alpha == pytest.approx(0.05, rel=1e-8) and fit.A == pytest.approx(50.0, rel=1e-6)


# ---------------------------------------------------------------- Chinchilla approach 3


def test_chinchilla_recovers_published_fit_from_noiseless_grid():
    N, D = (g.ravel() for g in np.meshgrid(np.logspace(6, 9, 7), np.logspace(7, 11, 7)))
    fit = fit_chinchilla(N, D, chinchilla_loss(N, D), init_grid=SMALL_GRID)
    assert fit.n_starts == 32 and fit.n == 49
    for got, want in [(fit.E, E), (fit.A, A), (fit.B, B), (fit.alpha, ALPHA), (fit.beta, BETA)]:
        assert got == pytest.approx(want, rel=1e-5)
    assert fit.a == pytest.approx(EXP_A, abs=1e-6) and fit.b == pytest.approx(EXP_B, abs=1e-6)
    n_opt, d_opt = fit.optimal_allocation(1e21)
    assert n_opt == pytest.approx(true_n_opt(1e21), rel=1e-4)
    assert 6 * n_opt * d_opt == pytest.approx(1e21)
    np.testing.assert_allclose(fit.predict(N, D), chinchilla_loss(N, D), rtol=1e-8)


def test_chinchilla_default_grid_is_the_papers():
    assert np.prod([len(v) for v in CHINCHILLA_GRID.values()]) == 4500
    assert CHINCHILLA_GRID["a"] == (0.0, 5.0, 10.0, 15.0, 20.0, 25.0)


# ---------------------------------------------------------------- IsoFLOP (approach 2)


def test_isoflop_vertices_sit_at_the_true_optimum_and_exponent_matches():
    N, C, loss = isoflop_runs()
    result = fit_isoflop_profiles(N, C, loss)
    assert len(result.profiles) == 5 and result.flagged == []
    for prof in result.profiles:
        # A parabola in log N is only an approximation of the law: a ~1.5% bias.
        assert prof.N_opt == pytest.approx(true_n_opt(prof.C), rel=0.03)
        assert prof.D_opt == pytest.approx(prof.C / (6 * prof.N_opt))
        assert prof.L_opt == pytest.approx(chinchilla_loss(prof.N_opt, prof.D_opt), rel=1e-3)
    assert result.a == pytest.approx(EXP_A, abs=0.01)
    assert result.b == pytest.approx(EXP_B, abs=0.01)
    assert result.n_opt(1e20) == pytest.approx(true_n_opt(1e20), rel=0.03)


def test_isoflop_groups_by_labels_and_flags_bad_profiles():
    N, C, loss = isoflop_runs(budgets=(1e18, 1e19, 1e20))
    jitter = np.random.default_rng(0).uniform(0.99, 1.01, C.size)
    labels = np.repeat(["small", "mid", "large"], 9)
    result = fit_isoflop_profiles(N, C * jitter, loss, budgets=labels)
    assert [p.budget for p in result.profiles] == ["small", "mid", "large"]
    assert result.a == pytest.approx(EXP_A, abs=0.02)

    # Only sizes far above the optimum at one budget: the vertex is extrapolated.
    n_hi = true_n_opt(1e18) * np.logspace(0.8, 1.6, 5)
    N2 = np.concatenate([N[9:], n_hi])
    C2 = np.concatenate([C[9:], np.full(5, 1e18)])
    loss2 = np.concatenate([loss[9:], chinchilla_loss(n_hi, 1e18 / (6 * n_hi))])
    assert fit_isoflop_profiles(N2, C2, loss2).flagged == [1e18]

    # A concave profile has no minimum: flagged, and left out of the line fit.
    concave = loss.copy()
    concave[:9] = 3.0 - (np.log10(N[:9]) - np.log10(N[4])) ** 2
    res = fit_isoflop_profiles(N, C, concave)
    assert not res.profiles[0].curvature_ok and np.isnan(res.profiles[0].N_opt)
    assert res.a == pytest.approx(EXP_A, abs=0.01)


# ---------------------------------------------------------------- bootstrap


def test_bootstrap_power_law_contains_truth():
    x, loss = power_law_points(noise=0.01, seed=2, n=20)
    out = bootstrap(fit_power_law, {"x": x, "loss": loss}, n_resamples=30, seed=7)
    assert set(out) == {"E", "A", "alpha"}
    for name, truth in [("E", 1.7), ("alpha", 0.34), ("A", 400.0)]:
        est, lo, hi = out[name]
        assert lo <= est <= hi and lo <= truth <= hi, (name, out[name])


def test_bootstrap_isoflop_within_budgets_contains_true_exponent_and_is_deterministic():
    N, C, loss = isoflop_runs(noise=0.003, seed=3)
    data = {"N": N, "C": C, "loss": loss}
    out = bootstrap(fit_isoflop_profiles, data, n_resamples=60, seed=0, group_key="C")
    est, lo, hi = out["a"]
    assert lo < EXP_A < hi and hi - lo < 0.2
    assert set(out) == {"a", "b", "k", "k_D"}
    assert bootstrap(fit_isoflop_profiles, data, n_resamples=60, seed=0, group_key="C") == out
    assert bootstrap(fit_isoflop_profiles, data, n_resamples=60, seed=1, group_key="C") != out


def test_bootstrap_chinchilla_contains_true_exponents():
    rng = np.random.default_rng(4)
    N, D = (g.ravel() for g in np.meshgrid(np.logspace(6, 9, 6), np.logspace(7, 11, 6)))
    loss = chinchilla_loss(N, D) * np.exp(rng.normal(0.0, 0.002, N.size))
    fit_fn = functools.partial(fit_chinchilla, init_grid=ONE_START)
    out = bootstrap(fit_fn, {"N": N, "D": D, "loss": loss}, n_resamples=15, seed=0, ci=0.9)
    for name, truth in [("alpha", ALPHA), ("beta", BETA), ("a", EXP_A), ("E", E)]:
        _, lo, hi = out[name]
        assert lo <= truth <= hi, (name, out[name])


# ---------------------------------------------------------------- predictability, conventions


def test_predictability_of_the_largest_budget():
    N, C, loss = isoflop_runs()
    pl = predictability(N, C, loss)
    assert pl.held_out_C == pytest.approx(1e22) and pl.n_train == 4
    assert pl.actual == pytest.approx(loss[C == 1e22].min())
    assert abs(pl.relative_error) < 0.01

    ch = predictability(N, C, loss, method="chinchilla", init_grid=SMALL_GRID)
    assert ch.n_train == 36
    # The law's optimum is a little below the best sampled run.
    assert -0.001 < ch.relative_error <= 1e-9


def test_count_parameters_conventions():
    run = {"params_total": 1.2e6, "params_non_embedding": 1.0e6, "flops_per_token_total": 7.4e6,
           "flops_per_token_non_embedding": 6.0e6, "tokens": 2e7, "loss": 3.1}
    assert count_parameters(run, "total") == (1.2e6, 7.4e6 * 2e7)
    assert count_parameters(run, "non_embedding") == (1.0e6, 6.0e6 * 2e7)
    arrays = runs_to_arrays([run, run], "non_embedding")
    np.testing.assert_array_equal(arrays["C"], [1.2e14, 1.2e14])
    assert arrays["loss"].tolist() == [3.1, 3.1]
    with pytest.raises(ConfigError, match="convention"):
        count_parameters(run, "kaplan")
    with pytest.raises(ConfigError, match="tokens"):
        count_parameters({"params_total": 1.0, "flops_per_token_total": 6.0}, "total")


# ---------------------------------------------------------------- bad input


def test_bad_input_raises_config_error():
    N, C, loss = isoflop_runs(sizes=3)
    with pytest.raises(ConfigError, match="distinct model sizes"):
        fit_isoflop_profiles(N[1:], C[1:], loss[1:])
    with pytest.raises(ConfigError, match="positive"):
        fit_power_law([1.0, 2.0, -3.0], [1.0, 2.0, 3.0])
    with pytest.raises(ConfigError, match="positive"):
        fit_chinchilla(N, C, -loss, init_grid=ONE_START)
    with pytest.raises(ConfigError, match="equal lengths"):
        fit_power_law([1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0])
    with pytest.raises(ConfigError, match="equal lengths"):
        fit_isoflop_profiles(N, C[:-1], loss)
    with pytest.raises(ConfigError, match="positive"):
        fit_isoflop_profiles(N, C, np.where(C == C[0], 0.0, loss))
    with pytest.raises(ConfigError, match=">= 5 runs"):
        fit_chinchilla([1e6, 1e7], [1e9, 1e9], [3.0, 2.5], init_grid=ONE_START)
    with pytest.raises(ConfigError, match="init_grid"):
        fit_chinchilla(N, C, loss, init_grid={"alpha": [0.5]})
    with pytest.raises(ConfigError, match=">= 2 budgets"):
        fit_isoflop_profiles(N[:3], C[:3], loss[:3])
    with pytest.raises(ConfigError, match="ci"):
        bootstrap(fit_power_law, {"x": N, "loss": loss}, ci=1.5)
    with pytest.raises(ConfigError, match="one length"):
        bootstrap(fit_power_law, {"x": N, "loss": loss[:-1]})
    with pytest.raises(ConfigError, match="method"):
        predictability(N, C, loss, method="magic")


# ---------------------------------------------------------------- plots


def _is_png(path) -> bool:
    return path.stat().st_size > 1000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_write_png_files(tmp_path):
    N, C, loss = isoflop_runs(budgets=(1e18, 1e19, 1e20), sizes=5)
    result = fit_isoflop_profiles(N, C, loss)
    frontier = [min(loss[C == c]) for c in (1e18, 1e19, 1e20)]
    fit = fit_power_law([1e18, 1e19, 1e20], frontier)

    p1 = plot_loss_vs_flops(C, loss, N, tmp_path / "loss.png", fit=fit)
    p2 = plot_isoflop_profiles(N, C, loss, tmp_path / "sub" / "isoflop.png", result=result)
    p3 = plot_n_opt_vs_compute([p.C for p in result.profiles], [p.N_opt for p in result.profiles],
                               tmp_path / "nopt.png")
    p4 = plot_isoflop_profiles(N, C, loss, tmp_path / "isoflop_refit.png")
    for path in (p1, p2, p3, p4):
        assert _is_png(path), path


def test_no_compute_optimal_allocation_without_two_positive_terms():
    """A fit whose data term has a negative exponent has no finite optimum: a clear error, not NaN."""
    from archlab.scaling.fits import ChinchillaFit

    good = ChinchillaFit(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28, objective=0.0, n=10, n_starts=1)
    n_opt, d_opt = good.optimal_allocation(1e21)
    assert n_opt > 0 and d_opt > 0
    bad = ChinchillaFit(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=-0.05, objective=0.0, n=10, n_starts=1)
    with pytest.raises(ConfigError, match="no compute-optimal allocation"):
        bad.optimal_allocation(1e21)
