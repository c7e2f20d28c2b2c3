"""Generated continuations a run or an evaluation prints: prompts from the run's own held-out text.

A fixed prompt list ("ROMEO:") means nothing on another corpus; the opening tokens of held-out
validation documents are text of the run's own kind that the model has not trained on.
"""

from __future__ import annotations

import numpy as np

from archlab.data.packing import PackedRows
from archlab.tokens import SPECIAL


def validation_prompts(rows: PackedRows, n_prompts: int, n_tokens: int) -> list[list[int]]:
    """The first ``n_tokens`` tokens of the first ``n_prompts`` validation documents that start in a
    row (one document per row at most, rows in order), shorter documents whole."""
    prompts: list[list[int]] = []
    for r in range(rows.n_rows):
        starts = np.flatnonzero((rows.positions[r] == 0) & (rows.segment_ids[r] > 0))
        if starts.size == 0:
            continue
        start = int(starts[0])
        same_document = rows.segment_ids[r, start:] == rows.segment_ids[r, start]
        ids = rows.tokens[r, start:][same_document][:n_tokens]
        ids = [int(t) for t in ids if int(t) != SPECIAL.eos]
        if ids:
            prompts.append(ids)
        if len(prompts) == n_prompts:
            break
    return prompts


def span_continuation(ids: list[int], vocab_size: int) -> list[int]:
    """What an encoder-decoder wrote for the prompt's trailing sentinel 0: its output without the
    leading ``<extra_id_0>``, up to the next sentinel (the start of a span it invented after it)."""
    first_sentinel = SPECIAL.first_sentinel_id(vocab_size)
    if ids and ids[0] == SPECIAL.sentinel_id(0, vocab_size):
        ids = ids[1:]
    end = next((i for i, t in enumerate(ids) if t >= first_sentinel), len(ids))
    return ids[:end]


def generation_inputs(family: str, prompt_ids: list[list[int]], vocab_size: int) -> list[list[int]]:
    """The model's inputs for these prompts: themselves (decoder-only), or each followed by sentinel 0
    (an encoder-decoder trained by span corruption learnt to fill a sentinel: the decoder writes
    what follows the prompt)."""
    if family == "decoder_only":
        return prompt_ids
    sentinel = SPECIAL.sentinel_id(0, vocab_size)
    return [ids + [sentinel] for ids in prompt_ids]


def sample_continuations(
    model, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int, *, prefix: bool = False
) -> list[dict]:
    """Greedy continuations through the KV-cache generation path, as ``{"prompt", "continuation"}`` text.

    ``prefix``: the model is a prefix LM (``objective=prefix_lm``), conditioned on each prompt as its
    bidirectional prefix. An encoder-decoder's continuation is the span it writes for sentinel 0.
    """
    from archlab.generate import generate

    if not prompt_ids:
        return []
    family = model.cfg.family
    inputs = generation_inputs(family, prompt_ids, model.cfg.vocab_size)
    if family == "decoder_only":
        max_new_tokens = min(max_new_tokens, model.cfg.max_seq_len - max(len(ids) for ids in prompt_ids))
    if max_new_tokens < 1:
        return []
    result = generate(model, inputs, max_new_tokens=max_new_tokens, prefix=prefix and family == "decoder_only")
    outputs = result.tokens if family == "decoder_only" else [
        span_continuation(out, model.cfg.vocab_size) for out in result.tokens]
    return [{"prompt": tokenizer.decode(ids), "continuation": tokenizer.decode(out)}
            for ids, out in zip(prompt_ids, outputs)]

