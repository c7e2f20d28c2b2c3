"""The memory estimate is a lower bound of what the compiled training step itself accounts for."""

from __future__ import annotations

import jax
import pytest

from archlab.errors import ConfigError
from archlab.train.memory import check_memory, estimate_bytes
from archlab.trainer import Trainer, compose


@pytest.mark.parametrize("overrides", [["run.batch_size=4"], ["run.batch_size=8", "data.seq_len=64"]])
def test_the_estimate_is_below_the_compiled_steps_memory(overrides):
    trainer = Trainer(compose(["size=nano", "logger=none", "data.vocab_size=512", "run.steps=2",
                               "data.seq_len=32", *overrides]))
    batch = trainer.device_batch(next(iter(trainer.iterator())))
    stats = jax.jit(trainer.train_step).lower(trainer.state, batch).compile().memory_analysis()
    compiled = stats.argument_size_in_bytes + stats.temp_size_in_bytes + stats.output_size_in_bytes
    need = estimate_bytes(trainer.cfg, trainer.plan)
    assert need["state"] >= 4 * 4 * trainer.plan.params.total  # parameters, gradients, two moments
    assert 0 < sum(need.values()) <= compiled


def test_an_impossible_model_is_refused_with_its_numbers():
    cfg = compose(["size=nano", "logger=none", "data.vocab_size=512", "run.steps=2", "model.n_layers=1000000"])
    from archlab.train.setup import make_plan

    with pytest.raises(ConfigError, match=r"needs at least [\d,.]+ GiB .* memory is [\d,.]+ GiB"):
        check_memory(cfg, make_plan(cfg, 512))
