"""A generative metric shared by decoder-only and encoder-decoder models: bits per byte of a
held-out continuation given its prefix.

Each family is scored the way it would be used for the task: the decoder-only model reads
``prefix + continuation`` and only the continuation's tokens are counted; the
encoder-decoder (trained with T5 span corruption) encodes ``prefix <X0> [EOS]`` and decodes
``<X0> continuation`` (the prefix's missing tail is the one noise span), again counting only
the continuation's tokens. Bits are summed over the continuation tokens and divided by
the UTF-8 bytes of the continuation's text, so the number does not depend on the tokenizer.
An encoder-only (MLM) model defines no left-to-right distribution over a continuation, so
it has no such score.

Windows are cut from the validation split's documents (re-tokenized with the run's own
tokenizer), ``prefix_tokens + continuation_tokens`` long, inside one document, evenly spaced
over the split: the same text for every run that shares a tokenizer and a data source.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from archlab.data.sources import load_documents
from archlab.data.tokenizer import Tokenizer
from archlab.errors import ConfigError
from archlab.schema import TrainConfig
from archlab.tokens import SPECIAL

GENERATIVE_FAMILIES = ("decoder_only", "encoder_decoder")


@dataclass(frozen=True)
class ContinuationWindows:
    """``tokens_WT``: W windows of T = prefix + continuation tokens; ``n_bytes``: continuation bytes."""

    tokens_WT: np.ndarray
    prefix_tokens: int
    continuation_tokens: int
    n_bytes: int


@dataclass(frozen=True)
class ContinuationScore:
    bits_per_byte: float
    nats_per_token: float
    n_windows: int
    n_tokens: int
    n_bytes: int


def continuation_windows(
    documents: list[str], tokenizer: Tokenizer, *, n_windows: int = 128, prefix_tokens: int = 64,
    continuation_tokens: int = 24,
) -> ContinuationWindows:
    """``n_windows`` non-overlapping windows evenly spaced over the documents' token stream."""
    if prefix_tokens < 1 or continuation_tokens < 1 or n_windows < 1:
        raise ConfigError("prefix_tokens, continuation_tokens and n_windows must be positive")
    length = prefix_tokens + continuation_tokens
    # Every start that keeps the window inside one document, in stream order.
    encoded = [np.asarray(ids, np.int32) for ids in tokenizer.encode_batch(documents)]
    candidates = [(d, s) for d, ids in enumerate(encoded) for s in range(0, len(ids) - length + 1, length)]
    if len(candidates) < n_windows:
        raise ConfigError(
            f"the validation documents hold {len(candidates)} windows of {length} tokens, fewer than {n_windows}"
        )
    picks = np.linspace(0, len(candidates) - 1, n_windows).round().astype(int)
    tokens_WT = np.stack([encoded[candidates[i][0]][candidates[i][1]:candidates[i][1] + length] for i in picks])
    n_bytes = sum(len(tokenizer.decode(row[prefix_tokens:]).encode("utf-8")) for row in tokens_WT)
    return ContinuationWindows(tokens_WT, prefix_tokens, continuation_tokens, n_bytes)


def _token_nll(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
    logp_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp_BTV, targets_BT[..., None], axis=-1)[..., 0]


def continuation_nll(model, windows: ContinuationWindows, *, batch_size: int = 32) -> float:
    """Summed negative log-likelihood (nats) of every window's continuation tokens."""
    family = model.cfg.family
    if family not in GENERATIVE_FAMILIES:
        raise ConfigError(f"{family} has no left-to-right distribution to score a continuation with")
    P = windows.prefix_tokens
    sentinel = SPECIAL.sentinel_id(0, model.cfg.vocab_size)
    graphdef, state = nnx.split(model)

    def posed(tokens_BT: jax.Array) -> tuple[dict[str, jax.Array], int]:
        """The window as the family's inputs, and the first output position that predicts the continuation."""
        if family == "decoder_only":
            return {"inputs": tokens_BT[:, :-1]}, P - 1
        column = lambda v: jnp.full((tokens_BT.shape[0], 1), v, jnp.int32)  # noqa: E731
        encoder_BS = jnp.concatenate([tokens_BT[:, :P], column(sentinel), column(SPECIAL.eos)], axis=1)
        # Decoder inputs: T5's start id ([PAD]), the sentinel, then the continuation shifted right.
        decoder_BT = jnp.concatenate([column(SPECIAL.pad), column(sentinel), tokens_BT[:, P:-1]], axis=1)
        return {"encoder_inputs": encoder_BS, "decoder_inputs": decoder_BT}, 1

    @jax.jit
    def batch_nll(state, tokens_BT: jax.Array) -> jax.Array:
        net = nnx.merge(graphdef, state)
        inputs, first = posed(tokens_BT)
        return jnp.sum(_token_nll(net.logits(net.batch_hidden(inputs))[:, first:], tokens_BT[:, P:]))

    total = 0.0
    for start in range(0, len(windows.tokens_WT), batch_size):
        total += float(batch_nll(state, jnp.asarray(windows.tokens_WT[start:start + batch_size])))
    return total


def score_continuations(model, windows: ContinuationWindows, *, batch_size: int = 32) -> ContinuationScore:
    nll = continuation_nll(model, windows, batch_size=batch_size)
    n_tokens = windows.tokens_WT.shape[0] * windows.continuation_tokens
    return ContinuationScore(
        bits_per_byte=nll / math.log(2) / windows.n_bytes, nats_per_token=nll / n_tokens,
        n_windows=int(windows.tokens_WT.shape[0]), n_tokens=n_tokens, n_bytes=windows.n_bytes,
    )


def max_continuation_tokens(cfg: TrainConfig) -> int:
    """Longest continuation the run's model was trained to produce positions for."""
    from archlab.train.setup import decoder_length_for

    decoder_length = decoder_length_for(cfg)
    if decoder_length is None:
        return cfg.data.seq_len - 1
    return decoder_length - 2  # room for the sentinel in front and [EOS] behind


def load_final_model(run_dir: str | Path, step: int | None = None):
    """``(model, tokenizer, train config, step)`` of a run directory's checkpoint (newest good by default)."""
    from archlab.trainer import Trainer

    trainer = Trainer.restore(run_dir, step)
    return trainer.model, trainer.tokenizer, trainer.cfg, trainer.restored_step


def run_continuation_bpb(
    run_dir: str | Path, *, n_windows: int = 128, prefix_tokens: int = 64, continuation_tokens: int = 24,
    documents: list[str] | None = None,
) -> ContinuationScore | None:
    """Continuation bits per byte of a run's newest checkpoint; None for an encoder-only run."""
    model, tokenizer, cfg, _ = load_final_model(run_dir)
    if cfg.model.family not in GENERATIVE_FAMILIES:
        return None
    return model_continuation_score(model, tokenizer, cfg, n_windows=n_windows, prefix_tokens=prefix_tokens,
                                    continuation_tokens=continuation_tokens, documents=documents, what=str(run_dir))


def model_continuation_score(
    model, tokenizer: Tokenizer, cfg: TrainConfig, *, n_windows: int = 128, prefix_tokens: int = 64,
    continuation_tokens: int = 24, documents: list[str] | None = None, what: str = "this run",
) -> ContinuationScore:
    """The continuation score of a generative model trained with ``cfg``, on its validation documents."""
    if continuation_tokens > max_continuation_tokens(cfg) or prefix_tokens + continuation_tokens > cfg.data.seq_len:
        raise ConfigError(
            f"{what}: a {prefix_tokens}+{continuation_tokens}-token window does not fit this run "
            f"(seq_len {cfg.data.seq_len}, longest continuation {max_continuation_tokens(cfg)})"
        )
    if documents is None:
        documents = list(load_documents(cfg.data.source, "validation", **dict(cfg.data.options)))
    windows = continuation_windows(documents, tokenizer, n_windows=n_windows, prefix_tokens=prefix_tokens,
                                   continuation_tokens=continuation_tokens)
    return score_continuations(model, windows)


__all__ = [
    "ContinuationScore", "ContinuationWindows", "GENERATIVE_FAMILIES", "continuation_nll", "continuation_windows",
    "load_final_model", "max_continuation_tokens", "model_continuation_score", "run_continuation_bpb",
    "score_continuations",
]
