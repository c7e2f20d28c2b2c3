"""``archlab-generate``: continue prompts with one saved run's model, and time it.

The model and tokenizer are rebuilt from the run's own config and checkpoint, as ``archlab-eval``
does (``Trainer.for_run`` then ``Trainer.load``). Prompts come from the command line, a file (one
per line), or the openings of held-out validation documents. A prefix-LM run (``objective=prefix_lm``)
reads each prompt as its bidirectional prefix; an encoder-decoder (span corruption) gets sentinel 0
after the prompt and its continuation is the span it writes for it (``archlab/samples.py``).

Every input is checked before anything is compiled: a refusal is one line and exit code 2
(``archlab/cli.py``).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from archlab.errors import ConfigError, DataError
from archlab.schema import GenerateConfig


def read_prompts_file(name: str) -> list[str]:
    """The non-blank lines of a UTF-8 file (``-``: standard input), without their line ends."""
    if name == "-":
        text = sys.stdin.read()
    else:
        path = Path(name)
        if not path.is_file():
            raise DataError(f"prompts_file={name}: no such file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise DataError(f"prompts_file={name} is not UTF-8: byte 0x{error.object[error.start]:02x} "
                            f"at byte offset {error.start}") from None
    prompts = [line.rstrip("\r") for line in text.split("\n") if line.strip()]
    if not prompts:
        raise DataError(f"prompts_file={name} holds no prompt (every line is blank)")
    return prompts


@dataclass
class Timing:
    """Seconds spent compiling (the first prefill and the first decode step, each compiled on first
    use) and decoding after that, with the token slots (rows x steps) decoded warm."""

    compile_s: float = 0.0
    warm_s: float = 0.0
    warm_tokens: int = 0


def _decode_one(decoder, timing: Timing, first: bool) -> None:
    """Run ``decoder`` to its end; the first call's start and first step count as compiling."""
    import jax

    rows = len(decoder.rows)
    t0 = time.perf_counter()
    decoder.start()
    jax.block_until_ready(decoder.token_B)
    if first and decoder.steps_left > 0:
        decoder.step()
        jax.block_until_ready(decoder.token_B)
    t1 = time.perf_counter()
    if first:
        timing.compile_s += t1 - t0
    else:
        timing.warm_s += t1 - t0
        timing.warm_tokens += rows if decoder.model.cfg.family == "decoder_only" else 0
    done_before = len(decoder.outputs)
    while decoder.steps_left > 0 and not decoder.done:
        decoder.step()
    jax.block_until_ready(decoder.token_B)
    timing.warm_s += time.perf_counter() - t1
    timing.warm_tokens += rows * (len(decoder.outputs) - done_before)


def generate_from_run(cfg: GenerateConfig, out=None) -> list[dict]:
    """Continue the prompts ``cfg`` names with its run's model; print them and the speed (to ``out``,
    default stdout); return one record per (prompt, sample), also written to ``cfg.output`` (JSON
    lines) when it is set."""
    out = sys.stdout if out is None else out
    output = Path(cfg.output) if cfg.output else None
    if output is not None and output.exists():
        raise ConfigError(f"output={cfg.output} already exists; archlab-generate never overwrites a file")
    if output is not None and not output.parent.is_dir():
        raise ConfigError(f"output={cfg.output}: no directory {output.parent}")
    texts = read_prompts_file(cfg.prompts_file) if cfg.prompts_file is not None else list(cfg.prompts)
    from archlab.evaluate import find_one_run

    run_dir, step_from_path = find_one_run(cfg.checkpoint, key="checkpoint", reader="archlab-generate")

    from archlab.trainer import load_run_config

    train_cfg = load_run_config(run_dir)
    family = train_cfg.model.family
    if family == "encoder_only":
        raise ConfigError(f"{run_dir} holds an encoder_only model (masked LM): it has no decoder to generate with")

    from archlab.generate import Decoder
    from archlab.samples import generation_inputs, span_continuation, validation_prompts
    from archlab.train.checkpoint import Checkpointer
    from archlab.trainer import Trainer

    trainer = Trainer.for_run(run_dir)
    step = trainer.load(Checkpointer(run_dir / "checkpoints", async_save=False),
                        step_from_path if cfg.step is None else cfg.step).step
    tokenizer, model = trainer.tokenizer, trainer.model
    if cfg.kv_cache_dtype is not None:
        model.cfg = model.cfg.replace(kv_cache_dtype=cfg.kv_cache_dtype)
    if texts:
        prompt_ids = [tokenizer.encode(text) for text in texts]
        empty = [i for i, ids in enumerate(prompt_ids) if not ids]
        if empty:
            raise ConfigError(f"prompt {empty[0]} ({texts[empty[0]]!r}) encodes to no token")
    else:
        prompt_ids = validation_prompts(trainer.corpus.validation, cfg.validation_prompts, cfg.prompt_tokens)
        if not prompt_ids:
            raise DataError(f"{run_dir}'s validation split holds no document to take a prompt from")
    vocab_size = model.cfg.vocab_size
    prefix = train_cfg.objective.name == "prefix_lm"
    decoders = [
        Decoder(model, generation_inputs(family, prompt_ids, vocab_size), max_new_tokens=cfg.max_new_tokens,
                temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, seed=cfg.seed + i, prefix=prefix)
        for i in range(cfg.num_samples)
    ]  # every length and setting is checked here, before anything compiles

    how = "greedy" if cfg.temperature == 0 else (
        f"temperature {cfg.temperature:g}" + (f", top-k {cfg.top_k}" if cfg.top_k else "")
        + (f", top-p {cfg.top_p:g}" if cfg.top_p else "") + f", seed {cfg.seed}")
    print(f"[{family}/{train_cfg.objective.name}] {run_dir} step {step}: {how}, up to {cfg.max_new_tokens} "
          f"new tokens, KV cache {model.cfg.cache_dtype}" + (", prompt read as a prefix-LM prefix" if prefix else ""),
          file=out)
    timing, results = Timing(), []
    for i, decoder in enumerate(decoders):
        _decode_one(decoder, timing, first=i == 0)
        results.append(decoder.result())
    records = []
    for p, ids in enumerate(prompt_ids):
        prompt_text = tokenizer.decode(ids)
        print(f"prompt {p}: {prompt_text!r}", file=out)
        for i, result in enumerate(results):
            new = result.tokens[p] if family == "decoder_only" else span_continuation(result.tokens[p], vocab_size)
            text = tokenizer.decode(new)
            label = "  -> " if cfg.num_samples == 1 else f"  sample {i} (seed {cfg.seed + i}): "
            print(f"{label}{text!r}", file=out)
            records.append({
                "run": str(run_dir), "step": step, "prompt": prompt_text, "prompt_ids": ids, "sample": i,
                "seed": cfg.seed + i, "continuation": text, "tokens": new, "logprobs": result.logprobs[p][:len(new)],
                "finished": result.finished[p], "temperature": cfg.temperature, "top_k": cfg.top_k,
                "top_p": cfg.top_p, "kv_cache_dtype": model.cfg.cache_dtype, "prefix_lm": prefix,
            })
    _print_speed(records, timing, len(prompt_ids), out)
    if output is not None:
        with open(output, "x", encoding="utf-8") as f:  # "x": a file that appeared meanwhile is kept
            f.writelines(json.dumps(record) + "\n" for record in records)
        print(f"wrote {len(records)} lines to {output}", file=out)
    return records


def _print_speed(records: list[dict], timing: Timing, rows: int, out) -> None:
    total = sum(len(r["tokens"]) for r in records)
    print(f"{total} tokens generated; compiling (first prefill and decode step): {timing.compile_s:.2f} s", file=out)
    if timing.warm_tokens and timing.warm_s > 0:
        print(f"after compiling: {timing.warm_tokens} tokens ({rows} row{'s' * (rows != 1)} x decode steps) in "
              f"{timing.warm_s:.2f} s "
              f"= {timing.warm_tokens / timing.warm_s:.1f} tokens/s", file=out)
    else:
        print("after compiling: no decode step left to time (raise max_new_tokens or num_samples)", file=out)
