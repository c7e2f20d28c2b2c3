"""The learning-rate schedules of archlab.train.optim against closed forms computed in float64."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from archlab.errors import ConfigError
from archlab.schema import OptimizerConfig
from archlab.train.optim import cooldown_start, learning_rate_schedule, warmup_steps

LR = 2e-3
SHAPES = {
    "linear": lambda x: 1 - x,
    "cosine": lambda x: 0.5 * (1 + np.cos(np.pi * x)),
    "1-sqrt": lambda x: 1 - np.sqrt(x),
}
# (total steps, warmup_fraction, cooldown_fraction, final_lr_fraction, the cooldown's first update count)
RUNS = [
    (100, 0.05, 0.2, 0.1, 80),
    (10, 0.0, 1.0, 0.1, 0),  # no warmup, all cooldown
    (50, 0.2, 1.0, 0.1, 10),  # all cooldown: it starts where the warmup ends
    (37, 0.1, 0.29, 0.0, 26),  # 3 warmup updates; round(10.73) = 11 cooldown updates; floor 0
    (100, 0.0, 0.29, 0.1, 71),  # 0.29 * 100 is 28.999999999999996: rounded, not truncated
    (7, 0.0, 0.01, 0.1, 6),  # round(0.07) = 0, but a cooldown has at least one update
]


def wsd_config(warmup_fraction: float, cooldown_fraction: float, final: float, shape: str) -> OptimizerConfig:
    return OptimizerConfig(lr=LR, schedule="wsd", warmup_fraction=warmup_fraction, final_lr_fraction=final,
                           cooldown_fraction=cooldown_fraction, cooldown_shape=shape)


def closed_form(total: int, warmup: int, start: int, final: float, shape: str) -> np.ndarray:
    """lr at update counts 0..total (the last one past the run) in float64."""
    count = np.arange(total + 1, dtype=np.float64)
    floor = LR * final
    lr = np.full(total + 1, LR)
    if warmup:
        lr[:warmup] = LR / warmup + (LR - LR / warmup) * count[:warmup] / warmup
    progress = (count[start:] - start) / (total - start)
    lr[start:] = floor + (LR - floor) * SHAPES[shape](progress)
    return lr


def values(schedule, total: int) -> np.ndarray:
    # traced counts under jit, as inside optax's update
    return np.asarray(jax.jit(jax.vmap(schedule))(jnp.arange(total + 1)), dtype=np.float64)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("total", "warmup_fraction", "cooldown_fraction", "final", "start"), RUNS)
def test_wsd_matches_its_closed_form_at_every_step(total, warmup_fraction, cooldown_fraction, final, start, shape):
    cfg = wsd_config(warmup_fraction, cooldown_fraction, final, shape)
    warmup = warmup_steps(cfg, total, tokens_per_step=1)
    assert cooldown_start(cfg, total, warmup) == start
    schedule = learning_rate_schedule(cfg, total, tokens_per_step=1)
    want = closed_form(total, warmup, start, final, shape)
    np.testing.assert_allclose(values(schedule, total), want, rtol=1e-5, atol=1e-6 * LR)
    # the first cooldown update is at the peak; the floor is reached one past the last update
    assert want[start] == LR and want[total] == LR * final
    assert float(schedule(start)) == pytest.approx(LR, rel=1e-6)
    assert float(schedule(total)) == pytest.approx(LR * final, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("shape", ["linear", "cosine"])
def test_wsd_that_is_all_cooldown_is_the_plain_decay(shape):
    total = 40
    wsd = learning_rate_schedule(wsd_config(0.1, 1.0, 0.1, shape), total, tokens_per_step=1)
    plain = learning_rate_schedule(OptimizerConfig(lr=LR, schedule=shape, warmup_fraction=0.1), total, tokens_per_step=1)
    np.testing.assert_allclose(values(wsd, total), values(plain, total), rtol=1e-6)


@pytest.mark.parametrize(("override", "message"), [
    ({"cooldown_fraction": 0.0}, r"^optimizer\.cooldown_fraction must be in \(0, 1\], got 0\.0$"),
    ({"cooldown_fraction": 1.5}, r"^optimizer\.cooldown_fraction must be in \(0, 1\], got 1\.5$"),
    ({"cooldown_fraction": -0.2}, r"^optimizer\.cooldown_fraction must be in \(0, 1\], got -0\.2$"),
    ({"cooldown_shape": "exp"}, r"^optimizer\.cooldown_shape='exp' is not one of linear, cosine, 1-sqrt$"),
    ({"schedule": "step"}, r"^optimizer\.schedule='step' is not one of cosine, linear, constant, wsd$"),
])
def test_bad_wsd_settings_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        OptimizerConfig(**{"schedule": "wsd", **override})
