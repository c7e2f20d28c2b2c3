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


COOLDOWNS = {  # g(x): the share of (peak - floor) left at cooldown progress x in [0, 1]
    "linear": lambda x: 1.0 - x,
    "cosine": lambda x: 0.5 * (1.0 + jnp.cos(jnp.pi * x)),
    "1-sqrt": lambda x: 1.0 - jnp.sqrt(x),
}
# Where a trunk's "cooldown" starts: never (a trunk runs at the peak; its branches cool down).
TRUNK_COOLDOWN = (2.0**30, 2.0**30 + 1)


def wsd_rate(cfg: OptimizerConfig, warmup: int):
    """``rate(count, args)``: the wsd learning rate, ``args = (cooldown start, end, peak)`` given as
    (traced) values, so one compiled step serves a run, its trunk, every branch and every packed member."""
    final, g = cfg.final_lr_fraction, COOLDOWNS[cfg.cooldown_shape]

    def rate(count, args):
        c = jnp.asarray(count, jnp.float32)
        start, end, peak = (jnp.asarray(a, jnp.float32) for a in (args[0], args[1], args[2]))
        floor = peak * final
        progress = jnp.clip((c - start) / jnp.maximum(end - start, 1.0), 0.0, 1.0)
        lr = jnp.where(c < start, peak, floor + (peak - floor) * g(progress))
        if warmup:
            # Warmup starts at lr/warmup rather than 0 so the first update is not wasted.
            lr = jnp.where(c < warmup, peak / warmup + (peak - peak / warmup) * c / warmup, lr)
        return lr

    return rate


def schedule_points(cfg: OptimizerConfig, total_steps: int, tokens_per_step: int, *, trunk: bool = False):
    """The wsd step's ``(cooldown start, end, peak)`` as a float32 array; None for other schedules."""
    if cfg.schedule != "wsd":
        return None
    if trunk:
        return jnp.asarray((*TRUNK_COOLDOWN, cfg.lr), jnp.float32)
    warmup = warmup_steps(cfg, total_steps, tokens_per_step)
    return jnp.asarray((cooldown_start(cfg, total_steps, warmup), total_steps, cfg.lr), jnp.float32)


def scale_by_rate(rate) -> optax.GradientTransformationExtraArgs:
    """``-rate(count, schedule_points) * updates``, the points given to ``update``; keeps optax's
    ``ScaleByScheduleState`` (one count), so the optimizer state has adamw's structure."""

    def init(params):
        del params
        return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

    def update(updates, state, params=None, *, schedule_points, **extra):
        del params, extra
        lr = rate(state.count, schedule_points)
        updates = jax.tree.map(lambda g: (-lr).astype(g.dtype) * g, updates)
        return updates, optax.ScaleByScheduleState(count=optax.safe_int32_increment(state.count))

    return optax.GradientTransformationExtraArgs(init, update)


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
        rate, points = wsd_rate(cfg, warmup), schedule_points(cfg, total_steps, tokens_per_step)
        return lambda count: rate(count, points)
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
    """``(tx, schedule)``; a wsd ``tx`` takes ``schedule_points`` (``schedule_points()``) in ``update``."""
    schedule = learning_rate_schedule(cfg, total_steps, tokens_per_step)
    chain = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
    if cfg.schedule == "wsd":
        # adamw's own pieces, with the learning rate computed from traced cooldown points.
        rate = wsd_rate(cfg, warmup_steps(cfg, total_steps, tokens_per_step))
        return optax.chain(
            *chain, optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps),
            optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask), scale_by_rate(rate),
        ), schedule
    adamw = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask)
    return optax.chain(*chain, adamw), schedule
