"""Study v2's fits recover a known law: IsoFLOP minima, the frontier exponents, approach 3's optimum."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments" / "scaling_laws" / "v2"))

import analysis  # noqa: E402
import design  # noqa: E402

E, A, B, ALPHA, BETA = 2.0, 200.0, 410.7, 0.34, 0.28


def law(n, d):
    return E + A / np.asarray(n) ** ALPHA + B / np.asarray(d) ** BETA


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    out = []
    for row in design.table():
        n, fpt = design.size_plan(row["size"])
        d = row["budget"] / fpt
        out.append({"size": row["size"], "params_total": n, "params_non_embedding": 0.6 * n, "flops_per_token": fpt,
                    "flops_per_token_non_embedding": 0.7 * fpt, "tokens": d, "budget_flops": row["budget"],
                    "val_loss": float(law(n, d))})
    return out


def true_optimum(rows: list[dict], budget: float) -> float:
    n = np.logspace(3.5, 7, 20001)
    return float(n[np.argmin(law(n, budget / analysis.fpt_of_n(rows)(n)))])


def test_isoflop_minima_and_the_frontier_recover_the_law(rows):
    profs = analysis.profiles(rows, "total")
    interior = [p for p in profs if p.interior]
    assert len(interior) >= 4
    for p in interior:
        assert p.N_opt == pytest.approx(true_optimum(rows, p.budget), rel=0.1)
    front = analysis.frontier(profs)
    truth = np.polyfit(np.log([p.C for p in interior]), np.log([true_optimum(rows, p.budget) for p in interior]), 1)[0]
    assert front["a"] == pytest.approx(truth, abs=0.05)
    assert front["a"] + front["b"] == pytest.approx(1.0, abs=0.15)  # C = fpt(N) D, fpt close to 6N


def test_an_edge_minimum_is_flagged_not_fitted():
    points = [analysis.Point(f"s{i}", 10.0 ** (4 + 0.2 * i), 1e6, 1e12, 3.0 - 0.1 * i) for i in range(5)]
    assert not analysis.fit_profile(1e12, points).interior  # loss still falling at the largest size


def test_bootstrap_intervals_cover_the_estimate_and_widen_with_noise(rows):
    front = analysis.frontier(analysis.profiles(rows, "total"))
    quiet = analysis.bootstrap_frontier(rows, "total", 2e13, noise_sd=1e-4, n_resamples=60)
    noisy = analysis.bootstrap_frontier(rows, "total", 2e13, noise_sd=0.05, n_resamples=60)
    assert quiet["a"][0] <= front["a"] + 0.02 and front["a"] - 0.02 <= quiet["a"][1]
    assert np.ptp(noisy["a"]) > np.ptp(quiet["a"])
    assert quiet["failed"] < 60 // 2


def test_approach3_optimum_follows_the_studys_flops_per_token(rows):
    result = analysis.approach3(rows, grid={"a": [5.0], "b": [6.0], "e": [0.5], "alpha": [0.3, 0.4], "beta": [0.3]})
    assert result["alpha"] == pytest.approx(ALPHA, abs=1e-3) and result["beta"] == pytest.approx(BETA, abs=1e-3)
    n_opt, d_opt, loss = analysis.approach3_optimum(result, 2e13)
    assert n_opt == pytest.approx(true_optimum(rows, 2e13), rel=0.01)
    assert d_opt * analysis.fpt_of_n(rows)(np.array(n_opt)) == pytest.approx(2e13, rel=1e-9)
    assert loss == pytest.approx(float(law(n_opt, d_opt)), rel=1e-3)


def test_seed_noise_is_taken_per_budget_from_the_nearest_measured_one():
    measured = {2e11: 0.2, 1.6e12: 0.02}
    assert analysis.noise_at(measured, 2e11) == 0.2 and analysis.noise_at(measured, 4e11) == 0.2
    assert analysis.noise_at(measured, 6.4e12) == 0.02 and analysis.noise_at(0.03, 1e20) == 0.03
    assert analysis.noise_at({}, 1e12) == 0.0


def test_a_point_is_its_seeds_mean_and_the_noise_is_pooled_within_sizes():
    base = {"params_total": 1e4, "params_non_embedding": 5e3, "flops_per_token": 6e4,
            "flops_per_token_non_embedding": 3e4, "tokens": 1e6, "budget_flops": 6e10}
    rows = [{**base, "size": "a", "val_loss": v} for v in (3.0, 3.2, 3.4)]
    rows += [{**base, "size": "b", "params_total": 2e4, "val_loss": v} for v in (2.9, 3.1)]
    (a, b), = analysis.points_by_budget(rows, "total").values()
    assert (a.size, a.seeds, b.seeds) == ("a", 3, 2) and a.loss == pytest.approx(3.2) and b.loss == pytest.approx(3.0)
    noise = analysis.seed_noise(rows)
    assert noise["per_budget_sd"][6e10] == pytest.approx(np.sqrt((0.04 + 0.02) / 2))  # variances 0.04 and 0.02
    assert noise["per_budget_range"][6e10] == {"a": pytest.approx(0.4), "b": pytest.approx(0.2)}
