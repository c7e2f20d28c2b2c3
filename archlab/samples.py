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


def sample_continuations(model, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int) -> list[dict]:
    """Greedy continuations through the KV-cache generation path, as ``{"prompt", "continuation"}`` text.

    An encoder-decoder trained by span corruption learnt to fill a sentinel: the prompt ends in one,
    so the decoder writes what follows the prompt.
    """
    from archlab.generate import generate

    if not prompt_ids:
        return []
    inputs = prompt_ids
    if model.cfg.family == "decoder_only":
        max_new_tokens = min(max_new_tokens, model.cfg.max_seq_len - max(len(ids) for ids in prompt_ids))
    else:
        sentinel = SPECIAL.sentinel_id(0, model.cfg.vocab_size)
        inputs = [ids + [sentinel] for ids in prompt_ids]
    if max_new_tokens < 1:
        return []
    result = generate(model, inputs, max_new_tokens=max_new_tokens)
    return [{"prompt": tokenizer.decode(ids), "continuation": tokenizer.decode(out)}
            for ids, out in zip(prompt_ids, result.tokens)]
