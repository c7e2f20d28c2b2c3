"""AdamW with linear warmup and cosine/linear/WSD decay, clipping, and a weight-decay mask (optax)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from archlab.schema import OptimizerConfig


def warmup_steps(cfg: OptimizerConfig, total_steps: int, tokens_per_step: int) -> int:
    """Warmup length in updates: from ``warmup_tokens`` if set, else a fraction of the run."""
    if cfg.warmup_tokens is not None:
        steps = cfg.warmup_tokens // max(tokens_per_step, 1)
    else:
        steps = int(cfg.warmup_fraction * total_steps)
    return max(0, min(steps, total_steps - 1))


def cooldown_start(cfg: OptimizerConfig, total_steps: int, warmup: int) -> int:
    """Update count (0-based) where the wsd cooldown begins.

    The cooldown is the last ``round(cooldown_fraction * total_steps)`` updates (at least one),
    cut short where it would reach into the warmup. ``round``, not ``int``: 0.29 * 100 is
    28.999999999999996 in floats.
    """
    return max(warmup, total_steps - max(1, round(cfg.cooldown_fraction * total_steps)))


def _cooldown(cfg: OptimizerConfig, steps: int) -> optax.Schedule:
    """Peak to ``final_lr_fraction`` x peak over ``steps`` updates, in ``cfg.cooldown_shape``."""
    floor = cfg.lr * cfg.final_lr_fraction
    if cfg.cooldown_shape == "linear":
        return optax.linear_schedule(cfg.lr, floor, steps)
    if cfg.cooldown_shape == "cosine":
        return optax.cosine_decay_schedule(cfg.lr, steps, alpha=cfg.final_lr_fraction)

    def one_minus_sqrt(count):
        # clipped like optax's schedules: the floor holds after the cooldown, and join_schedules
        # also evaluates this piece at negative counts (and discards the result)
        progress = jnp.clip(count / steps, 0.0, 1.0)
        return floor + (cfg.lr - floor) * (1.0 - jnp.sqrt(progress))

    return one_minus_sqrt


def learning_rate_schedule(cfg: OptimizerConfig, total_steps: int, tokens_per_step: int) -> optax.Schedule:
    """The learning rate of each update, as a function of the 0-based update count ``c``.

    The loop's step ``s`` (1-based) applies update ``c = s - 1``. With ``w`` warmup updates,
    ``c < w`` ramps linearly from ``lr / w`` toward ``lr``; the decay then runs on ``c - w``.
    Every decay reaches the floor (``final_lr_fraction`` x ``lr``) at ``c = total_steps``, one
    past the last update, as optax's decay schedules do: the final update is one decay step
    above the floor. wsd holds ``lr`` until :func:`cooldown_start` ``k``, then over
    ``T = total_steps - k`` updates gives ``floor + (lr - floor) * g((c - k) / T)`` with
    ``g(x)`` = ``1 - x`` (linear), ``(1 + cos(pi x)) / 2`` (cosine) or ``1 - sqrt(x)``
    (1-sqrt, Hägele et al. 2024), so update ``k`` is still at the peak.
    """
    warmup = warmup_steps(cfg, total_steps, tokens_per_step)
    decay_steps = max(total_steps - warmup, 1)
    final = cfg.lr * cfg.final_lr_fraction
    if cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.final_lr_fraction)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(cfg.lr, final, decay_steps)
    elif cfg.schedule == "wsd":
        start = cooldown_start(cfg, total_steps, warmup)
        cooldown = _cooldown(cfg, total_steps - start)
        decay = optax.join_schedules([optax.constant_schedule(cfg.lr), cooldown], [start - warmup])
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
