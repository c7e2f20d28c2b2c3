"""The peers ``scripts/benchmark.py --peer`` measures archlab against, on the identical model and batch.

Hugging Face's model of the family, built from archlab's own model config, so only archlab
configs the reference architecture can express qualify:

- decoder-only: GPT-2 (learned positions, pre-LN LayerNorm, GELU, biases, tied head: ``model=gpt2``
  or the default decoder at ``--peer``'s shape);
- encoder-only: BERT (``model=bert``), trained with archlab's masked-LM batch;
- encoder-decoder: T5 (``model=t5``), trained with archlab's span-corruption batch.

Two implementations of each:

- ``torch``: ``GPT2LMHeadModel`` / ``BertForMaskedLM`` / ``T5ForConditionalGeneration`` (PyTorch,
  float32, the library's default attention implementation), ``torch.optim.AdamW`` with
  archlab's hyperparameters, learning-rate schedule and weight-decay split (matrices and tables
  decayed, biases and norms not), ``clip_grad_norm_`` at ``optimizer.grad_clip``.
- ``flax``: ``FlaxGPT2LMHeadModel`` / ``FlaxBertForMaskedLM`` / ``FlaxT5ForConditionalGeneration``
  with ``jax.jit`` over ``jax.value_and_grad`` of its parameters and ``optax`` AdamW chained
  after global-norm clipping, parameters and optimizer state donated, as archlab's own step.

Both train on archlab's own batch, in Hugging Face's argument names (``peer_batch``): GPT-2 on
the token rows with its shifted next-token loss; BERT on the masked inputs with the selected
positions as labels; T5 on the encoder inputs, decoder inputs and targets. Hugging Face masks
padding but not the boundaries of packed documents, which changes no FLOP count. Each
``*_step`` builder returns ``(run_one_step, compile_seconds)``; ``run_one_step()`` blocks until
the update has finished and returns the loss as a float.
"""

from __future__ import annotations

import os
import time
from typing import Callable

import numpy as np

from archlab.config import ModelConfig
from archlab.errors import ConfigError, ConversionError
from archlab.schema import OptimizerConfig

IGNORED = -100  # Hugging Face's label for "no loss here"
TORCH_CLASSES = {"decoder_only": "GPT2LMHeadModel", "encoder_only": "BertForMaskedLM",
                 "encoder_decoder": "T5ForConditionalGeneration"}
FLAX_CLASSES = {"decoder_only": "FlaxGPT2LMHeadModel", "encoder_only": "FlaxBertForMaskedLM",
                "encoder_decoder": "FlaxT5ForConditionalGeneration"}


def gpt2_config(cfg: ModelConfig):
    """The ``GPT2Config`` of archlab's decoder-only ``cfg``; ConfigError if GPT-2 cannot express it."""
    from transformers import GPT2Config

    wrong = {
        "family": cfg.family != "decoder_only", "position": cfg.position != "learned",
        "norm": cfg.norm != "layernorm" or cfg.norm_position != "pre", "use_bias": not cfg.use_bias,
        "activation": cfg.activation not in ("gelu", "gelu_tanh"), "tie_embeddings": not cfg.tie_embeddings,
        "n_kv_heads": cfg.kv_heads != cfg.n_heads, "head_dim": cfg.dim_per_head * cfg.n_heads != cfg.d_model,
    }
    if any(wrong.values()):
        raise ConfigError(
            "--peer compares against Hugging Face GPT-2, which cannot express model."
            + ", model.".join(k for k, bad in wrong.items() if bad)
        )
    return GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.max_seq_len, n_embd=cfg.d_model, n_layer=cfg.n_layers,
        n_head=cfg.n_heads, n_inner=cfg.d_ff, layer_norm_epsilon=cfg.norm_eps,
        activation_function="gelu_new" if cfg.activation == "gelu_tanh" else "gelu",
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=cfg.init_std,
        tie_word_embeddings=True, use_cache=False,
    )


def hf_config(cfg: ModelConfig):
    """The Hugging Face config of archlab's ``cfg`` (GPT-2, BERT or T5 by family), without dropout."""
    from transformers import BertConfig, T5Config

    from archlab.convert import bert, t5

    if cfg.family == "decoder_only":
        return gpt2_config(cfg)
    try:
        if cfg.family == "encoder_only":
            return BertConfig(**bert.config_to_hf(cfg), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        return T5Config(**t5.config_to_hf(cfg), dropout_rate=0.0)
    except ConversionError as refusal:
        preset = "model=bert" if cfg.family == "encoder_only" else "model=t5"
        raise ConfigError(f"--peer: {refusal} (the {preset} preset is expressible)") from None


def peer_batch(cfg: ModelConfig, host_batch: dict) -> dict[str, np.ndarray]:
    """archlab's batch under the Hugging Face model's argument names, labels included."""
    ids = lambda key: np.asarray(host_batch[key], np.int64)
    not_padding = lambda key: (np.asarray(host_batch[key]) > 0).astype(np.int64)
    labels = lambda key: np.where(np.asarray(host_batch["weights"]) > 0, host_batch[key], IGNORED).astype(np.int64)
    if cfg.family == "decoder_only":
        return {"input_ids": ids("inputs"), "labels": ids("inputs")}
    if cfg.family == "encoder_only":
        return {"input_ids": ids("inputs"), "attention_mask": not_padding("segment_ids"), "labels": labels("targets")}
    return {
        "input_ids": ids("encoder_inputs"), "attention_mask": not_padding("encoder_segment_ids"),
        "decoder_input_ids": ids("decoder_inputs"), "decoder_attention_mask": not_padding("decoder_segment_ids"),
        "labels": labels("decoder_targets"),
    }


def torch_step(cfg: ModelConfig, opt: OptimizerConfig, schedule, host_batch: dict,
               threads: int | None = None) -> tuple[Callable[[], float], float]:
    import torch
    import transformers

    torch.set_num_threads(threads or os.cpu_count() or 1)
    torch.manual_seed(0)
    model_class = getattr(transformers, TORCH_CLASSES[cfg.family])
    model = model_class(hf_config(cfg)).float().train()
    decayed = [p for p in model.parameters() if p.ndim >= 2]
    other = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decayed, "weight_decay": opt.weight_decay}, {"params": other, "weight_decay": 0.0}],
        lr=float(schedule(0)), betas=(opt.b1, opt.b2), eps=opt.eps,
    )
    batch = {name: torch.from_numpy(array) for name, array in peer_batch(cfg, host_batch).items()}
    step = [0]

    def run_one_step() -> float:
        for group in optimizer.param_groups:
            group["lr"] = float(schedule(step[0]))
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if opt.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), opt.grad_clip)
        optimizer.step()
        step[0] += 1
        return float(loss.detach())

    return run_one_step, 0.0


def _restore_clip_keywords_for_flax_t5() -> None:
    """Let transformers 4.57.6's Flax T5 run on jax >= 0.10.

    Its relative-position buckets call ``jnp.clip(x, a_max=...)``; jax 0.10 removed the
    ``a_min``/``a_max`` keywords (now ``min``/``max``). That one module gets a view of
    ``jax.numpy`` whose ``clip`` accepts both spellings; the values are the same.
    """
    import types

    import jax.numpy as jnp
    from transformers.models.t5 import modeling_flax_t5

    if modeling_flax_t5.jnp is not jnp:
        return  # already given

    def clip(x, a_min=None, a_max=None, *, min=None, max=None):
        return jnp.clip(x, a_min if min is None else min, a_max if max is None else max)

    view = types.ModuleType("jax.numpy")
    view.__dict__.update(jnp.__dict__)
    view.clip = clip
    modeling_flax_t5.jnp = view


def flax_train_step(cfg: ModelConfig, opt: OptimizerConfig, schedule) -> tuple[Callable, dict, object]:
    """The Flax peer's un-jitted ``train_step(params, opt_state, batch)`` (``batch``: ``peer_batch``
    as jax arrays), its parameters and optimizer state."""
    import jax
    import jax.numpy as jnp
    import optax
    import transformers

    if cfg.family == "encoder_decoder":
        _restore_clip_keywords_for_flax_t5()
    model = getattr(transformers, FLAX_CLASSES[cfg.family])(hf_config(cfg), seed=0, dtype=jnp.float32)
    mask = jax.tree.map(lambda p: p.ndim >= 2, model.params)
    adamw = optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay, mask=mask)
    tx = optax.chain(optax.clip_by_global_norm(opt.grad_clip), adamw) if opt.grad_clip > 0 else adamw

    def loss_fn(params, batch):
        inputs = {name: array for name, array in batch.items() if name != "labels"}
        logits_BTV = model(**inputs, params=params, train=False).logits
        labels_BT = batch["labels"]
        if cfg.family == "decoder_only":  # GPT-2's own shift: position t predicts token t + 1
            logits_BTV, labels_BT = logits_BTV[:, :-1], labels_BT[:, 1:]
        live_BT = labels_BT != IGNORED
        nll_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, jnp.where(live_BT, labels_BT, 0))
        return jnp.sum(jnp.where(live_BT, nll_BT, 0.0)) / jnp.maximum(jnp.sum(live_BT), 1)

    def train_step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    params = jax.tree.map(jnp.copy, model.params)
    return train_step, params, tx.init(params)


def flax_batch(cfg: ModelConfig, host_batch: dict) -> dict:
    """``peer_batch`` as int32 jax arrays, the Flax models' input dtype."""
    import jax.numpy as jnp

    return {name: jnp.asarray(array, jnp.int32) for name, array in peer_batch(cfg, host_batch).items()}


def flax_step(cfg: ModelConfig, opt: OptimizerConfig, schedule, host_batch: dict) -> tuple[Callable[[], float], float]:
    import jax

    train_step, params, opt_state = flax_train_step(cfg, opt, schedule)
    batch = flax_batch(cfg, host_batch)
    carry = [params, opt_state]
    start = time.perf_counter()
    compiled = jax.jit(train_step, donate_argnums=(0, 1)).lower(carry[0], carry[1], batch).compile()
    compile_s = time.perf_counter() - start

    def run_one_step() -> float:
        carry[0], carry[1], loss = compiled(carry[0], carry[1], batch)
        jax.block_until_ready(carry)
        return float(loss)

    return run_one_step, compile_s
