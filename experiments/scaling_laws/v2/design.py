"""Study v2's design as data: the sizes, the budgets, which sizes serve which budget, the stages.

Decided before any run, from the plan's own FLOP counts (no training): a size serves a budget
when it lies within a factor SPAN of that budget's prior compute-optimal size (PRIOR_TOKENS_PER_PARAM
tokens per parameter), so each budget's profile brackets its prior optimum; the test of the design
(tests/test_scaling_v2_design.py) reads the committed table.

    python experiments/scaling_laws/v2/design.py      # prints the design table
"""

from __future__ import annotations

import functools
import math

# name: (d_model, n_layers, n_heads); d_ff = 4 d_model, vocabulary 512, context 128, learned positions.
SIZES: dict[str, tuple[int, int, int]] = {
    "d12": (12, 2, 2), "d16": (16, 2, 2), "d20": (20, 2, 2), "d24": (24, 2, 2), "d32": (32, 2, 2), "d40": (40, 2, 2),
    "d48": (48, 2, 4),
    "d56": (56, 3, 4), "d64": (64, 3, 4), "d80": (80, 3, 4), "d96": (96, 4, 4), "d128": (128, 4, 4),
}
FIT_BUDGETS: tuple[float, ...] = (2e11, 4e11, 8e11, 1.6e12, 3.2e12, 6.4e12)  # 1.5 decades, 2x apart
HELD_OUT_BUDGET = 2e13  # 3.1x the largest fit budget
PRIOR_TOKENS_PER_PARAM = 20.0
SPAN = 3.6  # sizes within N_opt / SPAN .. N_opt * SPAN of the prior optimum serve a budget
# The ladder shift, after the first fit stage: its interior minima sat at 39-68 tokens per parameter
# (N_opt 28K at 4e11 to 126K at 6.4e12) and the 2e11 and 8e11 minima at the smallest size served, so
# the sizes also serve the budgets around a 50-tokens-per-parameter optimum: d12 and d20 join, d16
# and d24 extend to larger budgets (a trunk only gains later branches; none it served is dropped).
SHIFTED_TOKENS_PER_PARAM = 50.0
# One seed's standard deviation (d32, 3 seeds) was 0.15 nats at 2e11 and 0.05 at 4e11, against 0.04 at
# 8e11 and 0.01-0.02 above: every size serving the two smallest budgets gets seeds 1 and 2 there too,
# and each point is its seeds' mean.
SEEDED_BUDGETS = (2e11, 4e11)
SEED_SIZE, SEEDS = "d32", (0, 1, 2)  # the noise floor: 3 seeds of one size at every budget it serves (d32: 5 budgets)
COMMON = ["data=english", "logger=none", "optimizer.schedule=wsd", "optimizer.cooldown_shape=1-sqrt",
          "run.eval_every=1000000", "run.checkpoint_every=400", "run.keep_checkpoints=1",
          "run.progress=false", "run.samples=0"]
# Every fit, held-out and family point is scored on the same 512 validation rows (65,536 tokens) spread
# over the whole held-out split, whatever its batch; the calibration ran before run.eval_rows existed and
# compares learning rates within a size only, on its batch's first 16 batches.
EVAL = ["run.eval_rows=512"]
CALIBRATION_EVAL = ["run.eval_batches=16"]


def size_overrides(size: str) -> list[str]:
    d, layers, heads = SIZES[size]
    return [f"model.d_model={d}", f"model.n_layers={layers}", f"model.n_heads={heads}", f"model.d_ff={4 * d}",
            f"size_name={size}"]


@functools.cache
def size_plan(size: str, family: str = "decoder_only") -> tuple[int, float]:
    """(total parameters, training FLOPs per token) of ``size`` from the plan archlab will run."""
    from archlab.train.setup import make_plan
    from archlab.trainer import compose

    cfg = compose([*COMMON, *size_overrides(size), f"model={family}", "run.flops=1e12"])
    plan = make_plan(cfg, cfg.data.vocab_size)
    return plan.params.total, plan.flops.train / plan.row_length


def prior_n_opt(budget: float, tokens_per_param: float = PRIOR_TOKENS_PER_PARAM) -> float:
    """The size that would read ``tokens_per_param`` tokens per parameter at ``budget`` (log-interpolated)."""
    points = sorted((math.log(size_plan(s)[0]), math.log(size_plan(s)[0] * tokens_per_param * size_plan(s)[1]))
                    for s in SIZES)
    log_c = math.log(budget)
    for (n0, c0), (n1, c1) in zip(points, points[1:]):
        if log_c <= c1 or (n1, c1) == points[-1]:
            return math.exp(n0 + (log_c - c0) * (n1 - n0) / (c1 - c0))
    raise AssertionError("unreachable")


def served(budget: float) -> list[str]:
    """Sizes whose IsoFLOP profile at ``budget`` they belong to: around the prior optimum or the shifted one."""
    optima = [prior_n_opt(budget, t) for t in (PRIOR_TOKENS_PER_PARAM, SHIFTED_TOKENS_PER_PARAM)]
    return [s for s in SIZES if any(n / SPAN <= size_plan(s)[0] <= n * SPAN for n in optima)]


def seeded_budgets_of(size: str) -> list[float]:
    """The budgets at which ``size`` also trains seeds 1 and 2 (in a trunk of its own)."""
    return [b for b in budgets_of(size) if b in SEEDED_BUDGETS] if size != SEED_SIZE else []


def budgets_of(size: str) -> list[float]:
    return [b for b in FIT_BUDGETS if size in served(b)]


def table() -> list[dict]:
    rows = []
    for size in SIZES:
        n, fpt = size_plan(size)
        for b in budgets_of(size):
            tokens = b / fpt
            rows.append({"size": size, "params": n, "budget": b, "tokens": int(tokens),
                         "tokens_per_param": tokens / n, "n_over_prior_opt": n / prior_n_opt(b)})
    return rows


if __name__ == "__main__":
    for b in (*FIT_BUDGETS, HELD_OUT_BUDGET):
        print(f"C={b:.3g}  prior N_opt={prior_n_opt(b):,.0f}  sizes: {' '.join(served(b))}")
    for row in table():
        print(f"{row['size']:>5} N={row['params']:>7,} C={row['budget']:.3g} D={row['tokens']:>10,} "
              f"D/N={row['tokens_per_param']:6.1f} N/N_opt={row['n_over_prior_opt']:.2f}")
