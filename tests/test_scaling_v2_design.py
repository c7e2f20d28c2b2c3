"""Study v2's committed results table meets the design it was planned to (experiments/scaling_laws/v2)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments" / "scaling_laws" / "v2"))

import analyze  # noqa: E402
import design  # noqa: E402


def test_the_committed_table_meets_the_design():
    rows = analyze.read_table()
    checks = analyze.design_checks(rows)
    assert checks["fit_budgets"] >= 6 and checks["decades"] >= 1.5 - 1e-9
    assert checks["min_sizes_per_budget"] >= 5
    assert checks["min_sizes_each_side_of_minimum"] >= 2
    assert checks["min_updates"] >= 300
    assert checks["max_epochs"] <= 4.0
    assert checks["held_out_over_largest_fit"] >= 3.0


def test_every_point_spent_its_budget_and_has_its_scores():
    rows = [r for r in analyze.read_table() if r["stage"] in ("fit", "heldout")]
    assert rows and all(r["data_source"] == "english" for r in rows)
    budgets = {float(r["budget_flops"]) for r in rows}
    assert budgets <= {*design.FIT_BUDGETS, design.HELD_OUT_BUDGET}
    for r in rows:  # each point spent its budget (within one batch) and no more
        tokens_per_step = r["tokens"] / r["total_steps"]
        assert r["C_total"] <= r["budget_flops"] + r["flops_per_token"] * tokens_per_step
        assert r["C_total"] >= r["budget_flops"] - r["flops_per_token"] * tokens_per_step
        assert math.isfinite(r["val_loss"]) and math.isfinite(r["continuation_bpb"])


def test_collecting_some_trunks_keeps_the_committed_rows_of_every_other_trunk():
    committed = analyze.read_table(raw=True)
    trunk = next(r["trunk"] for r in committed if r["stage"] == "families")
    new_row = {**next(r for r in committed if r["trunk"] == trunk), "run": "new"}
    merged = analyze.merge(committed, [new_row], ["families"])
    kept = [r for r in committed if r["trunk"] != trunk]
    assert merged[:len(kept)] == kept and merged[len(kept):] == [new_row]
    assert any(r["stage"] == "families" for r in kept)  # the stage's other trunks stay
    # a fit trunk extended to the held-out budget: its held-out rows are its own, replaced with it
    extended = next(r["trunk"] for r in committed if r["stage"] == "heldout" and r["trunk"].startswith("fit-"))
    fresh = [{**r, "run": "new"} for r in committed if r["trunk"] == extended and r["stage"] == "fit"]
    assert not any(r["trunk"] == extended and r["stage"] == "heldout" for r in analyze.merge(committed, fresh, ["fit"]))
