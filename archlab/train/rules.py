"""Per-size hyperparameter rules as data: ``rules=<name>`` reads ``conf/rules/<name>.yaml``.

A rule maps a run's size (total parameters N of its plan, at the configured vocabulary) and
its smallest budget (the smallest branch, else the run's own budget, in tokens D_min) to

- ``optimizer.lr = lr * (N / lr_params) ** lr_exponent * (batch / lr_batch) ** lr_batch_exponent``
  (a power law fitted by a calibration sweep; the batch term lets sizes whose smallest budget forces
  a smaller batch take a proportionally smaller rate, e.g. Adam's square-root rule, Malladi et al. 2022),
- ``optimizer.b2 = b2``,
- ``optimizer.warmup_tokens = min(warmup_tokens_per_param * N, max_warmup_fraction * D_min)``
  (Porian et al. 2024: a warmup of about N tokens; capped so a short budget is not all warmup),
- ``run.batch_size``: the largest power of two, within [min_batch, max_batch], that still gives
  D_min ``min_updates`` updates; a budget too small for that at ``min_batch`` is refused.

The values are written into the config (and ``rules.applied`` records what they were computed
from), so ``config.yaml`` shows what ran; ``run.members`` learning rates still override the
rule's. A config whose ``rules.applied`` is set is taken as it is (a branch's or a member's
config carries the trunk's values; re-deriving them from its own budget would change them).
"""

from __future__ import annotations

import dataclasses
import math

from archlab.errors import ConfigError
from archlab.schema import TrainConfig


def smallest_budget_tokens(cfg: TrainConfig, plan) -> int:
    """Tokens of the run's smallest budget (its first branch when it has branches); ``plan`` is the run's."""
    from archlab.train.branches import budget_key

    if not cfg.run.branches:
        return plan.token_budget
    smallest = float(min(cfg.run.branches))
    if budget_key(cfg) == "tokens":
        return int(smallest)
    return int(smallest * plan.row_length / plan.flops.train)  # make_plan's conversion of run.flops


def rule_batch(cfg: TrainConfig, tokens: int, row_length: int) -> int:
    r = cfg.rules
    rows = tokens / (r.min_updates * row_length)  # rows per update that give exactly min_updates
    batch = min(r.max_batch, 2 ** math.floor(math.log2(rows))) if rows >= 1 else 0
    if batch < r.min_batch:
        raise ConfigError(
            f"rules={r.name}: the smallest budget ({tokens:,} tokens) gives fewer than rules.min_updates="
            f"{r.min_updates} updates even at rules.min_batch={r.min_batch} rows of {row_length} tokens"
        )
    return batch


def apply_rules(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with the rule's learning rate, beta2, warmup and batch (unchanged without a rule)."""
    from archlab.train.setup import make_plan

    r = cfg.rules
    if r.name is None or r.applied:
        return cfg
    plan = make_plan(cfg, cfg.data.vocab_size)
    n_params = plan.params.total
    tokens = smallest_budget_tokens(cfg, plan)
    batch = rule_batch(cfg, tokens, plan.row_length)
    lr = r.lr * (n_params / r.lr_params) ** r.lr_exponent * (batch / r.lr_batch) ** r.lr_batch_exponent
    warmup = int(min(r.warmup_tokens_per_param * n_params, r.max_warmup_fraction * tokens))
    applied = {"params": n_params, "smallest_budget_tokens": tokens, "lr": lr, "b2": r.b2,
               "warmup_tokens": warmup, "batch_size": batch}
    return dataclasses.replace(
        cfg,
        optimizer=dataclasses.replace(cfg.optimizer, lr=lr, b2=r.b2, warmup_tokens=warmup),
        run=dataclasses.replace(cfg.run, batch_size=batch),
        rules=dataclasses.replace(r, applied=applied),
    )
