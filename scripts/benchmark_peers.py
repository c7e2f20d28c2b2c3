"""The peers ``scripts/benchmark.py --peer`` measures archlab against, on the identical model and batch.

Both are Hugging Face GPT-2 built from archlab's own model config (so only GPT-2-shaped
decoder-only models qualify: learned positions, pre-LN LayerNorm, GELU, biases, tied head):

- ``torch``: ``GPT2LMHeadModel`` (PyTorch, float32, the library's default attention
  implementation), ``torch.optim.AdamW`` with archlab's hyperparameters, learning-rate
  schedule and weight-decay split (matrices and tables decayed, biases and norms not),
  ``clip_grad_norm_`` at ``optimizer.grad_clip``.
- ``flax``: ``FlaxGPT2LMHeadModel`` with ``jax.jit`` over ``jax.value_and_grad`` of its
  parameters and ``optax`` AdamW chained after global-norm clipping, parameters and optimizer
  state donated, as archlab's own step.

Both train on the same ``[B, T]`` token rows with Hugging Face's own shifted next-token loss.
Each ``*_step`` builder returns ``(run_one_step, compile_seconds)``; ``run_one_step()`` blocks
until the update has finished and returns the loss as a float.
"""

from __future__ import annotations

import os
import time
from typing import Callable

import numpy as np

from archlab.config import ModelConfig
from archlab.errors import ConfigError
from archlab.schema import OptimizerConfig


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


def torch_step(cfg: ModelConfig, opt: OptimizerConfig, schedule, tokens_BT: np.ndarray,
               threads: int | None = None) -> tuple[Callable[[], float], float]:
    import torch
    from transformers import GPT2LMHeadModel

    torch.set_num_threads(threads or os.cpu_count() or 1)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(gpt2_config(cfg)).float().train()
    decayed = [p for p in model.parameters() if p.ndim >= 2]
    other = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decayed, "weight_decay": opt.weight_decay}, {"params": other, "weight_decay": 0.0}],
        lr=float(schedule(0)), betas=(opt.b1, opt.b2), eps=opt.eps,
    )
    ids = torch.from_numpy(np.asarray(tokens_BT, np.int64))
    step = [0]

    def run_one_step() -> float:
        for group in optimizer.param_groups:
            group["lr"] = float(schedule(step[0]))
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if opt.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), opt.grad_clip)
        optimizer.step()
        step[0] += 1
        return float(loss.detach())

    return run_one_step, 0.0


def flax_train_step(cfg: ModelConfig, opt: OptimizerConfig, schedule) -> tuple[Callable, dict, object]:
    """The Flax peer's un-jitted ``train_step(params, opt_state, ids_BT)``, its parameters and optimizer state."""
    import jax
    import jax.numpy as jnp
    import optax
    from transformers import FlaxGPT2LMHeadModel

    model = FlaxGPT2LMHeadModel(gpt2_config(cfg), seed=0, dtype=jnp.float32)
    mask = jax.tree.map(lambda p: p.ndim >= 2, model.params)
    adamw = optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay, mask=mask)
    tx = optax.chain(optax.clip_by_global_norm(opt.grad_clip), adamw) if opt.grad_clip > 0 else adamw

    def loss_fn(params, ids_BT):
        logits_BTV = model(ids_BT, params=params, train=False).logits
        return optax.softmax_cross_entropy_with_integer_labels(logits_BTV[:, :-1], ids_BT[:, 1:]).mean()

    def train_step(params, opt_state, ids_BT):
        loss, grads = jax.value_and_grad(loss_fn)(params, ids_BT)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    params = jax.tree.map(jnp.copy, model.params)
    return train_step, params, tx.init(params)


def flax_step(cfg: ModelConfig, opt: OptimizerConfig, schedule, tokens_BT: np.ndarray) -> tuple[Callable[[], float], float]:
    import jax
    import jax.numpy as jnp

    train_step, params, opt_state = flax_train_step(cfg, opt, schedule)
    ids = jnp.asarray(tokens_BT, jnp.int32)
    carry = [params, opt_state]
    start = time.perf_counter()
    compiled = jax.jit(train_step, donate_argnums=(0, 1)).lower(carry[0], carry[1], ids).compile()
    compile_s = time.perf_counter() - start

    def run_one_step() -> float:
        carry[0], carry[1], loss = compiled(carry[0], carry[1], ids)
        jax.block_until_ready(carry)
        return float(loss)

    return run_one_step, compile_s
