"""Autoregressive decoding with the fixed-shape KV cache: greedy, temperature, top-k, top-p.

Per model and sampling setting there are two jitted functions, built once and reused by
later calls with the same shapes: a *start* (DecoderOnly: prefill of the whole left-padded
prompt batch; EncoderDecoder: the encoder and, once, every decoder layer's cross-attention keys
and values of its output) and ONE decode step, jitted over
``(state, caches, token, index, rng, ...)`` with the caches donated, run for every new token.
The step index is a traced scalar, so the step never recompiles between tokens.

Left padding (DecoderOnly): prompts of different lengths are right-aligned in one batch; pad
slots carry segment id 0 (masked as keys) and each row's positions start at 0 at its first
real token, so every row decodes exactly as it would alone. EncoderDecoder prompts are the
encoder inputs, right-padded; the decoder starts from ``SPECIAL.pad`` (T5's start id).

Prefix LM (``prefix=True``, for a DecoderOnly trained with ``objective=prefix_lm``): the prefill
lets every prompt token attend to every real prompt token (the prompt is the bidirectional
prefix it was trained with); the decode steps after it are causal, as in training.

A DecoderOnly never draws a special id (``[PAD]``, ``[CLS]``, ``[SEP]``, ``[MASK]``, ``[BOS]``,
the ``<extra_id_*>`` sentinels: ``archlab/tokens.py``), only text and EOS: their logits are set to
-inf before sampling (``suppress_special``; the returned logits and logprobs stay the model's own).

Shape letters as in ``archlab/nn/attention.py``; P is the padded prompt length.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from archlab.errors import ConfigError
from archlab.nn.models import LanguageModel
from archlab.tokens import SPECIAL

Array = jax.Array
Model = LanguageModel

# How often each jitted function has been traced (incremented inside the traced bodies):
# tests read it to prove the decode step compiles once, not once per token.
TRACE_COUNTS: Counter[str] = Counter()


@dataclass(frozen=True)
class Sampling:
    """How the next token is drawn; ``temperature == 0`` is greedy and ignores top-k/top-p."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"top_k must be at least 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must lie in (0, 1], got {self.top_p}")


@dataclass
class GenerationResult:
    """What ``generate`` produced, one entry per prompt.

    ``tokens`` holds only the new tokens, cut just before EOS (the EOS itself is excluded);
    ``finished[i]`` says whether row i stopped at EOS rather than at ``max_new_tokens``.
    ``logprobs`` are log-probabilities of those tokens under the model's unmodified
    distribution (log-softmax of the raw logits, before temperature/top-k/top-p).
    ``logits`` (``return_logits=True`` only) is ``[B, steps, V]`` float32: the raw logits at
    every decoding step run, including steps after a row finished.
    """

    tokens: list[list[int]]
    logprobs: list[list[float]]
    finished: list[bool]
    logits: np.ndarray | None = None


# ---- sampling -------------------------------------------------------------------------


def _top_k_filter(logits_BV: Array, top_k: int) -> Array:
    k = min(top_k, logits_BV.shape[-1])
    kth_B1 = jax.lax.top_k(logits_BV, k)[0][:, -1:]
    return jnp.where(logits_BV >= kth_B1, logits_BV, -jnp.inf)


def _top_p_filter(logits_BV: Array, top_p: float) -> Array:
    """Nucleus (Holtzman et al. 2020): the smallest top set whose probability reaches ``top_p``."""
    sorted_BV = jnp.flip(jnp.sort(logits_BV, axis=-1), axis=-1)
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    # Probability mass strictly above each token: the most likely token is always kept.
    mass_above_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
    threshold_B1 = jnp.min(jnp.where(mass_above_BV < top_p, sorted_BV, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits_BV >= threshold_B1, logits_BV, -jnp.inf)


def sample_logits(
    logits_BV: Array, rng: Array, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None
) -> Array:
    """Next token ids ``[B]`` (int32) from logits ``[B, V]``.

    ``temperature == 0`` is greedy (argmax; top-k/top-p ignored). Otherwise logits are divided
    by ``temperature``, then top-k, then top-p filtering apply (the Hugging Face order), and one
    token per row is drawn with ``rng``. The settings are Python values fixed at trace time.
    """
    sampling = Sampling(temperature, top_k, top_p)
    logits_BV = logits_BV.astype(jnp.float32)
    if sampling.temperature == 0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = logits_BV / sampling.temperature
    if sampling.top_k is not None:
        logits_BV = _top_k_filter(logits_BV, sampling.top_k)
    if sampling.top_p is not None and sampling.top_p < 1:
        logits_BV = _top_p_filter(logits_BV, sampling.top_p)
    return jax.random.categorical(rng, logits_BV, axis=-1).astype(jnp.int32)


def allowed_ids(model: Model, suppress_special: bool | None = None) -> np.ndarray:
    """``[V]`` bool: the ids generation may draw. ``suppress_special`` (default: for a DecoderOnly,
    which never learnt to write them) bars the special ids and sentinels, except EOS; an
    EncoderDecoder writes sentinels (span corruption's targets), so nothing is barred for it."""
    vocab_size = model.cfg.vocab_size
    if suppress_special is None:
        suppress_special = model.cfg.family == "decoder_only"
    ids_V = np.arange(vocab_size)
    if not suppress_special:
        return np.ones(vocab_size, bool)
    room_for_sentinels = vocab_size > SPECIAL.n_reserved_low + SPECIAL.n_sentinels
    special_V = SPECIAL.is_special(ids_V, vocab_size) if room_for_sentinels else ids_V < SPECIAL.n_reserved_low
    return ~special_V | (ids_V == SPECIAL.eos)


def _choose(logits_BV: Array, rng: Array, done_B: Array, sampling: Sampling, eos_id: Array, allowed_V: Array):
    """Sample among the allowed ids (and the EOS id), emit padding for finished rows, mark rows that
    just produced EOS. The logprob is the unmodified distribution's."""
    logits_BV = logits_BV.astype(jnp.float32)
    allowed_V = allowed_V | (jnp.arange(logits_BV.shape[-1]) == eos_id)
    drawn_BV = jnp.where(allowed_V, logits_BV, -jnp.inf)
    token_B = sample_logits(drawn_BV, rng, sampling.temperature, sampling.top_k, sampling.top_p)
    token_B = jnp.where(done_B, SPECIAL.pad, token_B)
    logprob_B = jnp.take_along_axis(jax.nn.log_softmax(logits_BV, axis=-1), token_B[:, None], axis=-1)[:, 0]
    return token_B, logprob_B, done_B | (token_B == eos_id)


# ---- the jitted functions ---------------------------------------------------------------

_COMPILED: dict[tuple, tuple[Callable, Callable]] = {}


def _decoder_only_functions(graphdef, sampling: Sampling, prefix: bool) -> tuple[Callable, Callable]:
    def prefill(state, prompt_BP, positions_BP, cache_segment_ids_BS, rng, eos_id, allowed_V):
        TRACE_COUNTS["decoder_only_prefill"] += 1
        model = nnx.merge(graphdef, state)
        batch, cache_len = cache_segment_ids_BS.shape
        # Prefix LM: every real prompt token is prefix (padding slots stay masked as keys).
        prefix_BP = cache_segment_ids_BS[:, :prompt_BP.shape[1]] != 0 if prefix else None
        hidden_BPD, caches = model.hidden(
            prompt_BP, positions_BT=positions_BP, caches=model.init_caches(batch, cache_len), cache_index=0,
            cache_segment_ids_BS=cache_segment_ids_BS, prefix_BT=prefix_BP,
        )
        rng, draw = jax.random.split(rng)
        # Left padding puts every row's last prompt token in the last column: only it needs the head.
        logits_BV = model.logits(hidden_BPD[:, -1:])[:, 0].astype(jnp.float32)
        token_B, logprob_B, done_B = _choose(
            logits_BV, draw, jnp.zeros((batch,), bool), sampling, eos_id, allowed_V
        )
        return caches, token_B, logprob_B, done_B, logits_BV, rng

    def step(state, caches, token_B, index, rng, done_B, eos_id, allowed_V, pad_B, cache_segment_ids_BS):
        TRACE_COUNTS["decoder_only_step"] += 1
        model = nnx.merge(graphdef, state)
        hidden_B1D, caches = model.hidden(
            token_B[:, None], positions_BT=(index - pad_B)[:, None], caches=caches, cache_index=index,
            cache_segment_ids_BS=cache_segment_ids_BS,
        )
        rng, draw = jax.random.split(rng)
        logits_BV = model.logits(hidden_B1D)[:, 0].astype(jnp.float32)
        token_B, logprob_B, done_B = _choose(logits_BV, draw, done_B, sampling, eos_id, allowed_V)
        return caches, token_B, logprob_B, done_B, logits_BV, rng

    return jax.jit(prefill), jax.jit(step, donate_argnums=(1,))


def _encoder_decoder_functions(graphdef, sampling: Sampling) -> tuple[Callable, Callable]:
    def start(state, encoder_BS, encoder_segment_ids_BS, rng, cache_len: int):
        """The encoder, and from its output every decoder layer's cross-attention keys and values; the
        empty caches, start tokens and flags, and the rng passed through. Made here, so the step's
        inputs are typed (mesh axes included) as its outputs are: the step compiles once, not again
        at its second call."""
        TRACE_COUNTS["encoder_decoder_encode"] += 1
        model = nnx.merge(graphdef, state)
        batch = encoder_BS.shape[0]
        cross_kv = model.cross_kv(model.encode(encoder_BS, segment_ids_BS=encoder_segment_ids_BS))
        token_B = jnp.full((batch,), SPECIAL.pad, jnp.int32)
        return cross_kv, model.init_caches(batch, cache_len), token_B, jnp.zeros((batch,), bool), rng

    def step(state, caches, token_B, index, rng, done_B, eos_id, allowed_V, cross_kv, encoder_segment_ids_BS):
        TRACE_COUNTS["encoder_decoder_step"] += 1
        model = nnx.merge(graphdef, state)
        positions_B1 = jnp.full((token_B.shape[0], 1), index, jnp.int32)
        hidden_B1D, caches = model.hidden(
            token_B[:, None], encoder_segment_ids_BS=encoder_segment_ids_BS, positions_BT=positions_B1,
            caches=caches, cache_index=index, cross_kv=cross_kv,
        )
        rng, draw = jax.random.split(rng)
        logits_BV = model.logits(hidden_B1D)[:, 0].astype(jnp.float32)
        token_B, logprob_B, done_B = _choose(logits_BV, draw, done_B, sampling, eos_id, allowed_V)
        return caches, token_B, logprob_B, done_B, logits_BV, rng

    return jax.jit(start, static_argnums=(4,)), jax.jit(step, donate_argnums=(1,))


def _functions(model: Model, graphdef, state, sampling: Sampling, prefix: bool) -> tuple[Callable, Callable]:
    """The jitted pair, shared by every model with the same config and parameter tree."""
    key = (model.cfg.family, dataclasses.astuple(model.cfg), jax.tree.structure(state), sampling, prefix)
    if key not in _COMPILED:
        if len(_COMPILED) >= 32:
            _COMPILED.clear()
        if model.cfg.family == "decoder_only":
            _COMPILED[key] = _decoder_only_functions(graphdef, sampling, prefix)
        else:
            _COMPILED[key] = _encoder_decoder_functions(graphdef, sampling)
    return _COMPILED[key]


# ---- input checks and padding ---------------------------------------------------------


def _as_rows(prompts: Sequence[Sequence[int]] | np.ndarray, vocab_size: int) -> list[np.ndarray]:
    if isinstance(prompts, (np.ndarray, jax.Array)) and np.ndim(prompts) != 2:
        raise ConfigError(f"prompts as an array must be [batch, length], got shape {np.shape(prompts)}")
    rows = [np.asarray(row, dtype=np.int64).reshape(-1) for row in prompts]
    if not rows:
        raise ConfigError("prompts is empty; pass at least one prompt")
    for i, row in enumerate(rows):
        if row.size == 0:
            raise ConfigError(f"prompt {i} is empty; every prompt needs at least one token")
        if row.min() < 0 or row.max() >= vocab_size:
            raise ConfigError(f"prompt {i} has token ids outside [0, {vocab_size}) (model.vocab_size)")
    return rows


def _pad(rows: list[np.ndarray], left: bool) -> tuple[np.ndarray, np.ndarray]:
    """``(tokens_BP, segment_ids_BP)`` int32, padded with ``SPECIAL.pad`` / segment 0."""
    length = max(len(row) for row in rows)
    tokens_BP = np.full((len(rows), length), SPECIAL.pad, np.int32)
    segment_ids_BP = np.zeros((len(rows), length), np.int32)
    for b, row in enumerate(rows):
        cols = slice(length - len(row), length) if left else slice(0, len(row))
        tokens_BP[b, cols], segment_ids_BP[b, cols] = row, 1
    return tokens_BP, segment_ids_BP


def _check_lengths(model: Model, prompt_len: int, max_new_tokens: int, max_len: int | None) -> int:
    """The cache length to use; refuses lengths the model or the cache cannot hold."""
    cfg = model.cfg
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if cfg.family == "decoder_only":
        needed, what = prompt_len + max_new_tokens, f"longest prompt ({prompt_len}) + max_new_tokens ({max_new_tokens})"
    else:
        needed, what = max_new_tokens, f"max_new_tokens ({max_new_tokens})"
        if prompt_len > cfg.max_seq_len:
            raise ConfigError(f"encoder prompt length {prompt_len} exceeds model.max_seq_len={cfg.max_seq_len}")
    if max_len is not None and max_len < needed:
        raise ConfigError(f"max_len={max_len} is smaller than {what} = {needed}")
    if cfg.position == "learned" and needed > cfg.max_seq_len:
        raise ConfigError(
            f"{what} = {needed} exceeds the learned position table (model.max_seq_len={cfg.max_seq_len})"
        )
    return needed if max_len is None else max_len


# ---- the decoding loop ------------------------------------------------------------------


class Decoder:
    """Generation's two compiled halves for one batch of prompts, for callers that time or drive them.

    ``start()`` reads the prompts (the decoder-only prefill, or the encoder and every decoder
    layer's cross-attention keys and values) and, for a decoder-only model, draws the first token;
    each ``step()`` draws one more token for every row. ``generate`` is their loop. The arguments
    are ``generate``'s; both halves are compiled once per model config and sampling settings.
    """

    def __init__(
        self, model: Model, prompts: Sequence[Sequence[int]] | np.ndarray, *, max_new_tokens: int,
        temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
        eos_id: int | None = SPECIAL.eos, seed: int = 0, max_len: int | None = None,
        prefix: bool = False, suppress_special: bool | None = None,
    ):
        if model.cfg.family == "encoder_only":
            raise ConfigError("encoder_only models have no decoder to generate with; use MLM scoring instead")
        if prefix and model.cfg.family != "decoder_only":
            raise ConfigError(f"prefix=True conditions a decoder_only (prefix-LM) model, not {model.cfg.family}")
        sampling = Sampling(temperature, top_k, top_p)
        self.model, self.eos_id = model, eos_id
        self.rows = _as_rows(prompts, model.cfg.vocab_size)
        self.prompt_len = max(len(row) for row in self.rows)
        self.max_new_tokens = max_new_tokens
        self.cache_len = _check_lengths(model, self.prompt_len, max_new_tokens, max_len)
        self.eos = np.int32(-1 if eos_id is None else eos_id)  # traced: a new EOS id does not recompile
        graphdef, self.state = nnx.split(model)
        self._start, self._step = _functions(model, graphdef, self.state, sampling, prefix)
        self.allowed_V = jnp.asarray(allowed_ids(model, suppress_special))
        self.rng = jax.random.key(seed)
        self.outputs: list[tuple[Array, Array, Array]] = []  # (token_B, logprob_B, logits_BV) per token

    @property
    def steps_left(self) -> int:
        """Decode steps still to run after ``start()`` for ``max_new_tokens`` tokens."""
        return self.max_new_tokens - len(self.outputs)

    @property
    def done(self) -> bool:
        """Every row has produced EOS (one host sync)."""
        return self.eos_id is not None and bool(self.done_B.all())

    def start(self) -> "Decoder":
        rows, n = self.rows, len(self.rows)
        if self.model.cfg.family == "decoder_only":
            prompt_BP, segment_ids_BP = _pad(rows, left=True)
            pad_B = (self.prompt_len - segment_ids_BP.sum(axis=1)).astype(np.int32)
            positions_BP = np.maximum(np.arange(self.prompt_len, dtype=np.int32)[None] - pad_B[:, None], 0)
            cache_segment_ids_BS = np.ones((n, self.cache_len), np.int32)
            cache_segment_ids_BS[:, :self.prompt_len] = segment_ids_BP
            self.caches, self.token_B, logprob_B, self.done_B, logits_BV, self.rng = self._start(
                self.state, prompt_BP, positions_BP, cache_segment_ids_BS, self.rng, self.eos, self.allowed_V
            )
            self.outputs.append((self.token_B, logprob_B, logits_BV))
            self.constants = (jnp.asarray(pad_B), jnp.asarray(cache_segment_ids_BS))
            self.index = self.prompt_len
        else:
            encoder_BS, encoder_segment_ids_BS = _pad(rows, left=False)
            cross_kv, self.caches, self.token_B, self.done_B, self.rng = self._start(
                self.state, encoder_BS, encoder_segment_ids_BS, self.rng, self.cache_len
            )
            self.constants = (cross_kv, jnp.asarray(encoder_segment_ids_BS))
            self.index = 0
        return self

    def step(self) -> Array:
        """One token for every row; returns the step's raw logits ``[B, V]``."""
        index = np.int32(self.index)  # traced by the step: no recompilation per token
        self.caches, self.token_B, logprob_B, self.done_B, logits_BV, self.rng = self._step(
            self.state, self.caches, self.token_B, index, self.rng, self.done_B, self.eos, self.allowed_V,
            *self.constants,
        )
        self.outputs.append((self.token_B, logprob_B, logits_BV))
        self.index += 1
        return logits_BV

    def result(self, return_logits: bool = False) -> GenerationResult:
        return _collect(self.outputs, self.eos_id, return_logits)


def generate(
    model: Model,
    prompts: Sequence[Sequence[int]] | np.ndarray,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = SPECIAL.eos,
    seed: int = 0,
    max_len: int | None = None,
    return_logits: bool = False,
    prefix: bool = False,
    suppress_special: bool | None = None,
) -> GenerationResult:
    """Continue each prompt (DecoderOnly) or decode from each encoder input (EncoderDecoder).

    Rows stop at ``eos_id`` (None: never) and the loop ends once every row has. ``max_len`` is
    the KV-cache length (default: just enough: longest prompt + ``max_new_tokens`` for
    DecoderOnly, ``max_new_tokens`` for the EncoderDecoder decoder). All randomness comes from
    ``jax.random.key(seed)``, split once per step. ``prefix=True`` reads each prompt as a prefix-LM
    model's bidirectional prefix; ``suppress_special`` bars special ids (default: DecoderOnly; see
    the module docstring).
    """
    decoder = Decoder(model, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                      top_p=top_p, eos_id=eos_id, seed=seed, max_len=max_len, prefix=prefix,
                      suppress_special=suppress_special).start()
    while decoder.steps_left > 0 and not decoder.done:  # one host sync per token: stop at EOS
        decoder.step()
    return decoder.result(return_logits)


def teacher_forced_logits(model: Model, tokens_BT: Array, prefill: int) -> Array:
    """Logits ``[B, T, V]`` of a decoder-only model read through its KV cache: a prefill of the first
    ``prefill`` tokens, then one given token per step (``lax.scan``), as decoding would read them.

    Equal to the uncached ``model(tokens_BT)`` up to the cache's storage dtype (``model.kv_cache_dtype``).
    """
    if model.cfg.family != "decoder_only":
        raise ConfigError(f"teacher-forced cached decoding reads a decoder-only model, not {model.cfg.family}")
    graphdef, state = nnx.split(model)
    batch, length = tokens_BT.shape

    @jax.jit
    def run(state, tokens_BT):
        net = nnx.merge(graphdef, state)
        hidden_BPD, caches = net.hidden(tokens_BT[:, :prefill], caches=net.init_caches(batch, length), cache_index=0)

        def step(caches, index):
            token_B1 = jax.lax.dynamic_slice_in_dim(tokens_BT, index, 1, axis=1)
            hidden_B1D, caches = net.hidden(token_B1, positions_BT=jnp.full((batch, 1), index), caches=caches,
                                            cache_index=index)
            return caches, net.logits(hidden_B1D)[:, 0]

        _, logits_NBV = jax.lax.scan(step, caches, jnp.arange(prefill, length))
        return jnp.concatenate([net.logits(hidden_BPD), logits_NBV.transpose(1, 0, 2)], axis=1)

    return run(state, tokens_BT)


def _collect(outputs: list[tuple[Array, Array, Array]], eos_id: int | None, return_logits: bool) -> GenerationResult:
    tokens_BN = np.asarray(jnp.stack([o[0] for o in outputs], axis=1))
    logprobs_BN = np.asarray(jnp.stack([o[1] for o in outputs], axis=1))
    tokens, logprobs, finished = [], [], []
    for b in range(tokens_BN.shape[0]):
        hits = np.flatnonzero(tokens_BN[b] == eos_id) if eos_id is not None else np.array([], int)
        end = int(hits[0]) if hits.size else tokens_BN.shape[1]
        tokens.append(tokens_BN[b, :end].tolist())
        logprobs.append(logprobs_BN[b, :end].astype(float).tolist())
        finished.append(bool(hits.size))
    logits = np.asarray(jnp.stack([o[2] for o in outputs], axis=1)) if return_logits else None
    return GenerationResult(tokens, logprobs, finished, logits)
