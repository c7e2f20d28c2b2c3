"""AdamW with linear warmup and cosine/linear decay, clipping, and a weight-decay mask (optax)."""

from __future__ import annotations

import jax
import optax

from archlab.schema import OptimizerConfig


def warmup_steps(cfg: OptimizerConfig, total_steps: int, tokens_per_step: int) -> int:
    """Warmup length in updates: from ``warmup_tokens`` if set, else a fraction of the run."""
    if cfg.warmup_tokens is not None:
        steps = cfg.warmup_tokens // max(tokens_per_step, 1)
    else:
        steps = int(cfg.warmup_fraction * total_steps)
    return max(0, min(steps, total_steps - 1))


def learning_rate_schedule(cfg: OptimizerConfig, total_steps: int, tokens_per_step: int) -> optax.Schedule:
    warmup = warmup_steps(cfg, total_steps, tokens_per_step)
    decay_steps = max(total_steps - warmup, 1)
    final = cfg.lr * cfg.final_lr_fraction
    if cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.final_lr_fraction)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(cfg.lr, final, decay_steps)
    else:
        decay = optax.constant_schedule(cfg.lr)
    if warmup == 0:
        return decay
    # Warmup starts at lr/warmup rather than 0 so the first update is not wasted.
    ramp = optax.linear_schedule(cfg.lr / warmup, cfg.lr, warmup)
    return optax.join_schedules([ramp, decay], [warmup])


DECAYED_LEAVES = ("kernel", "embedding")


def decay_mask(params):
    """Weight decay on weight matrices and tables only, not on biases or norm scales.

    Decided by leaf name, not rank: layer stacking gives biases a leading layer axis.
    """

    def is_decayed(path, _leaf) -> bool:
        names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        return any(name in DECAYED_LEAVES for name in names)

    return jax.tree_util.tree_map_with_path(is_decayed, params)


def make_optimizer(cfg: OptimizerConfig, total_steps: int, tokens_per_step: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = learning_rate_schedule(cfg, total_steps, tokens_per_step)
    adamw = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask)
    chain = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
    return optax.chain(*chain, adamw), schedule
