"""Dropout (model.embedding_dropout, attention_dropout, residual_dropout): off unless training asks.

Rates of 0 (the default) leave every path as it was (the parity tests hold them to Hugging Face);
with rates set, a training key draws masks (the same key, the same masks), evaluation has none,
and inverted attention dropout leaves the attention output unbiased.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from archlab.config import ModelConfig
from archlab.errors import ConfigError
from archlab.nn.attention import _attention_block
from archlab.nn.models import build_model
from archlab.objectives.model_io import loss_and_metrics

RATES = dict(embedding_dropout=0.1, attention_dropout=0.1, residual_dropout=0.1)


def model_and_batch(family: str, **rates):
    cfg = ModelConfig(family=family, vocab_size=200, d_model=16, n_layers=2, n_heads=2, d_ff=32, max_seq_len=16,
                      **rates)
    tokens = np.random.default_rng(0).integers(6, 90, (2, 16)).astype(np.int32)
    weights = np.ones((2, 16), np.float32)
    if family == "encoder_decoder":
        batch = {"encoder_inputs": tokens, "decoder_inputs": tokens, "decoder_targets": tokens, "weights": weights}
    else:
        batch = {"inputs": tokens, "targets": tokens, "weights": weights}
    return build_model(cfg, seed=0), batch


@nnx.jit
def loss(model, batch, key=None):
    return loss_and_metrics(model, batch, key)[0]  # jitted: op by op, a scanned stack runs for a minute


@pytest.mark.parametrize("family", ["decoder_only", "encoder_only", "encoder_decoder"])
def test_dropout_draws_from_the_key_and_only_in_training(family):
    plain, batch = model_and_batch(family)
    dropped, _ = model_and_batch(family, **RATES)  # same seed: the same parameters (dropout has none)
    reference = float(loss(plain, batch))
    # Rates of 0: a key changes nothing.
    assert float(loss(plain, batch, jax.random.key(1))) == reference
    # Evaluation (no key) of a model with dropout is the plain model.
    assert float(loss(dropped, batch)) == reference
    one = float(loss(dropped, batch, jax.random.key(1)))
    assert one == float(loss(dropped, batch, jax.random.key(1)))
    assert one != reference and one != float(loss(dropped, batch, jax.random.key(2)))


def test_attention_dropout_is_unbiased():
    rng = np.random.default_rng(0)
    q_BKGTH = jnp.asarray(rng.normal(size=(1, 1, 1, 4, 8)), jnp.float32)
    k_BKSH = jnp.asarray(rng.normal(size=(1, 1, 6, 8)), jnp.float32)
    v_BKSH = jnp.asarray(rng.normal(size=(1, 1, 6, 8)), jnp.float32)
    mask_BQK = jnp.ones((1, 4, 6), bool)
    exact = _attention_block(q_BKGTH, k_BKSH, v_BKSH, mask_BQK, None, 0.35)
    draws = jax.vmap(lambda key: _attention_block(q_BKGTH, k_BKSH, v_BKSH, mask_BQK, None, 0.35, 0.3, key))(
        jax.random.split(jax.random.key(0), 4000))
    assert not np.allclose(draws[0], exact)
    np.testing.assert_allclose(draws.mean(axis=0), exact, atol=0.03)


def test_bad_rates_are_refused():
    with pytest.raises(ConfigError, match=r"model.residual_dropout must be in \[0, 1\), got 1.0"):
        ModelConfig(residual_dropout=1.0)
    with pytest.raises(ConfigError, match="attention_dropout needs the xla attention kernel"):
        ModelConfig(attention_dropout=0.1, attention_kernel="dot_product_attention")


def test_a_training_step_with_dropout_is_a_function_of_seed_and_step(cache_dir):
    from conftest import compose_train

    from archlab.trainer import Trainer

    trainer = Trainer(compose_train(["model.residual_dropout=0.2", "model.embedding_dropout=0.1"], cache_dir))
    batch = next(iter(trainer.iterator()))
    start = jax.tree.map(lambda x: x.copy(), trainer.state)
    first = trainer.step(batch)["loss"]
    trainer.state = jax.tree.map(lambda x: x.copy(), start)
    again = trainer.step(batch)["loss"]
    assert float(first) == float(again)  # the same (seed, step): the same masks
    second_step = trainer.step(batch)["loss"]  # step 2 draws other masks (and has new parameters)
    assert float(second_step) != float(first)
    assert trainer.evaluate()["val/loss"] == trainer.evaluate()["val/loss"]
