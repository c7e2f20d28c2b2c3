"""The KV-cache study: bytes vs context, int8's effect on loss, long input / short output, cached speed.

    python experiments/kv_cache/run.py                  # everything, ~5-10 minutes on 2 CPU cores
    python experiments/kv_cache/run.py --parts bytes    # one part: bytes, loss, long_input, speed

Writes results.json, one CSV per part and the PNG plots next to this file (README.md reads
them). The loss part trains a small decoder-only model on the embedded Shakespeare corpus
(``--run-dir``, reused when its checkpoint exists) and scores the validation split with
teacher-forced CACHED decoding through float32, bfloat16 and int8 caches.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from archlab.accounting import (  # noqa: E402
    KV_ELEMENT_BYTES, count_params, decode_flops_per_token, forward_flops, kv_cache_bytes, prefill_flops,
)
from archlab.config import ModelConfig, preset  # noqa: E402
from archlab.nn.models import build_model  # noqa: E402
from archlab.bench.harness import repeated_seconds  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
CONTEXTS = [1024, 2048, 4096, 8192, 16384, 32768, 65536, 100_000, 131072]
ALLOCATE_UP_TO = 1 << 30  # caches up to 1 GiB are allocated for real; larger ones via jax.eval_shape
INPUT_LENGTHS = [256, 512, 1024, 2048, 4096]
OUTPUT_TOKENS = 64


def abstract(cfg: ModelConfig):
    """The model without allocating its parameters (``init_caches`` reads only the config)."""
    return nnx.eval_shape(lambda: build_model(cfg))


def timed_steps(step, caches, args_at, n: int) -> tuple[list[float], object]:
    """Per-step wall times of ``n`` decode steps, each fed the caches the previous one returned."""
    times = []
    for i in range(n):
        start = time.perf_counter()
        logits, caches = step(caches, *args_at(i))
        jax.block_until_ready(logits)
        times.append(time.perf_counter() - start)
    return times, caches


# ---- part 1: bytes vs context ------------------------------------------------------------


def part_bytes() -> list[dict]:
    rows = []
    for kv_heads, attention in [(12, "MHA"), (4, "GQA-4"), (1, "MQA")]:
        for cache_dtype in ("float32", "bfloat16", "int8"):
            cfg = preset("gpt2", position="rope", n_kv_heads=kv_heads, kv_cache_dtype=cache_dtype)
            model = abstract(cfg)
            for context in CONTEXTS:
                formula = kv_cache_bytes(cfg, context)
                if formula <= ALLOCATE_UP_TO:
                    caches = model.init_caches(1, context)
                    jax.block_until_ready(caches)
                    measured, how = sum(x.nbytes for x in jax.tree.leaves(caches)), "allocated"
                    del caches
                else:
                    shapes = jax.eval_shape(lambda: model.init_caches(1, context))
                    measured, how = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes)), "eval_shape"
                # The brief's formula 2 * layers * kv_heads * head_dim * context * batch * bytes (batch 1).
                data = 2 * cfg.n_layers * cfg.kv_heads * cfg.dim_per_head * context * KV_ELEMENT_BYTES[cache_dtype]
                assert measured == formula, (attention, cache_dtype, context, measured, formula)
                rows.append(dict(config=f"{attention} {cache_dtype}", attention=attention, kv_heads=kv_heads,
                                 dtype=cache_dtype, context=context, bytes=measured, formula_bytes=formula,
                                 data_bytes=data, scale_bytes=measured - data, measured_by=how))
        print(f"bytes: {attention} done", flush=True)
    return rows


def plot_bytes(rows: list[dict], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"float32": "-", "bfloat16": "--", "int8": ":"}
    colours = {"MHA": "C0", "GQA-4": "C1", "MQA": "C2"}
    for name in dict.fromkeys(r["config"] for r in rows):
        sel = [r for r in rows if r["config"] == name]
        ax.plot([r["context"] for r in sel], [r["bytes"] / 2**30 for r in sel], styles[sel[0]["dtype"]],
                color=colours[sel[0]["attention"]], marker="o", markersize=3, label=name)
    ax.set(xscale="log", yscale="log", xlabel="context (tokens), batch 1", ylabel="KV cache (GiB)",
           title="GPT-2-small shape (12 layers, head_dim 64): KV-cache bytes")
    ax.axvline(8192, color="grey", lw=0.5)
    ax.axvline(100_000, color="grey", lw=0.5)
    ax.legend(fontsize=7, ncol=3)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- part 2: int8 cache and held-out loss ---------------------------------------------------


def trained_model(run_dir: Path, steps: int):
    """``(model, validation rows)``: a small GPT trained in-process, unless ``run_dir`` already
    holds its final checkpoint (then it is only restored)."""
    from archlab.train.checkpoint import Checkpointer
    from archlab.train.loop import train
    from archlab.trainer import Trainer, compose

    overrides = ["experiment=quickstart", "size=small", f"run.steps={steps}", f"run.eval_every={steps}",
                 f"run.checkpoint_every={steps}", "run.progress=false", "run.samples=0", "logger=none",
                 f"run.dir={run_dir}"]
    if Checkpointer(run_dir / "checkpoints", async_save=False).latest_step() != steps:
        start = time.perf_counter()
        summary = train(compose(overrides), run_dir)
        print(f"loss: trained {steps} steps in {time.perf_counter() - start:.0f} s: {summary}", flush=True)
    trainer = Trainer.restore(run_dir, steps)
    return trainer.model, trainer.corpus.validation


def cached_logits(model, cache_dtype: str, tokens_BT: jax.Array, prefill: int) -> jax.Array:
    """``archlab.generate.teacher_forced_logits`` of the same weights read through a ``cache_dtype`` cache."""
    from archlab.generate import teacher_forced_logits

    graphdef, _ = nnx.split(abstract(model.cfg.replace(kv_cache_dtype=cache_dtype)))
    return teacher_forced_logits(nnx.merge(graphdef, nnx.state(model)), tokens_BT, prefill)


def part_loss(run_dir: Path, steps: int, n_rows: int, prefill: int) -> dict:
    from archlab.objectives.clm import next_token_targets
    from archlab.objectives.losses import weighted_cross_entropy

    model, validation = trained_model(run_dir, steps)
    # Rows holding one document from their first token (no packing boundary, no padding): the
    # cached path conditions on every earlier slot, as one document's decoding does.
    single = np.flatnonzero((validation.segment_ids == 1).all(axis=1))[:n_rows]
    batch = next_token_targets({"tokens": validation.tokens[single], "segment_ids": validation.segment_ids[single],
                                "positions": validation.positions[single]})
    tokens_BT, targets_BT, weights_BT = (jnp.asarray(batch[k]) for k in ("inputs", "targets", "weights"))

    def loss(logits_BTV) -> float:
        total, count = weighted_cross_entropy(logits_BTV, targets_BT, weights_BT)
        return float(total / count)

    reference = model(tokens_BT)
    shape = {k: getattr(model.cfg, k) for k in ("d_model", "n_layers", "n_heads", "d_ff", "vocab_size")}
    result = {"rows": int(len(single)), "tokens_scored": int(weights_BT.sum()), "prefill": prefill,
              "row_length": int(tokens_BT.shape[1]), "model": shape, "head_dim": model.cfg.dim_per_head,
              "train_steps": steps, "uncached_loss": loss(reference)}
    result["max_abs_logit"] = float(jnp.abs(reference).max())
    logits = {d: cached_logits(model, d, tokens_BT, prefill) for d in ("float32", "bfloat16", "int8")}
    for cache_dtype, logits_BTV in logits.items():
        result[f"{cache_dtype}_loss"] = loss(logits_BTV)
        result[f"{cache_dtype}_max_abs_logit_diff_vs_uncached"] = float(jnp.abs(logits_BTV - reference).max())
        result[f"{cache_dtype}_mean_abs_logit_diff_vs_uncached"] = float(jnp.abs(logits_BTV - reference).mean())
        agree = (logits_BTV.argmax(-1) == logits["float32"].argmax(-1)) * weights_BT
        result[f"{cache_dtype}_top1_agreement_with_float32"] = float(agree.sum() / weights_BT.sum())
    for cache_dtype in ("bfloat16", "int8"):
        result[f"{cache_dtype}_relative_loss_change"] = result[f"{cache_dtype}_loss"] / result["float32_loss"] - 1
    print(f"loss: {json.dumps(result)}", flush=True)
    return result


# ---- part 3: long input, short output -----------------------------------------------------


def long_input_models() -> dict[str, ModelConfig]:
    """An 8-layer decoder against two encoder-decoders of the same width: 8+8 (T5's L+L: every
    token still passes 8 layers, so training FLOPs match; twice the parameters) and 4+4 (about
    the same parameters, about half the FLOPs). RoPE, so any length runs."""
    decoder = ModelConfig(family="decoder_only", d_model=256, n_layers=8, n_heads=4, d_ff=1024, vocab_size=2048,
                          max_seq_len=max(INPUT_LENGTHS) + OUTPUT_TOKENS, position="rope")
    return {
        "decoder 8": decoder,
        "enc-dec 8+8": decoder.replace(family="encoder_decoder"),
        "enc-dec 4+4": decoder.replace(family="encoder_decoder", n_layers=4),
    }


def part_long_input(repeats: int) -> list[dict]:
    rows = []
    models = long_input_models()
    states = {name: nnx.split(build_model(cfg)) for name, cfg in models.items()}
    for input_len in INPUT_LENGTHS:
        tokens_1S = jnp.asarray(np.random.default_rng(input_len).integers(6, 2048, (1, input_len)), jnp.int32)
        for name, cfg in models.items():
            graphdef, state = states[name]
            decoder_only = cfg.family == "decoder_only"
            cache_len = input_len + OUTPUT_TOKENS if decoder_only else OUTPUT_TOKENS

            @jax.jit
            def prefill(state, tokens_1S):
                net = nnx.merge(graphdef, state)
                if not decoder_only:
                    return net.encode(tokens_1S)
                hidden, caches = net.hidden(tokens_1S, caches=net.init_caches(1, cache_len), cache_index=0)
                return net.logits(hidden[:, -1:]), caches

            @jax.jit
            def make_caches(state):
                return nnx.merge(graphdef, state).init_caches(1, cache_len)

            def step_fn(state, caches, token_11, index, encoded):
                net = nnx.merge(graphdef, state)
                memory = {} if decoder_only else {"encoded_BSD": encoded}
                hidden_11D, caches = net.hidden(token_11, **memory, positions_BT=jnp.full((1, 1), index),
                                                caches=caches, cache_index=index)
                return net.logits(hidden_11D), caches

            step = jax.jit(step_fn, donate_argnums=(1,))
            prefill_times = repeated_seconds(lambda: jax.block_until_ready(prefill(state, tokens_1S)), repeats)
            out = prefill(state, tokens_1S)
            caches, encoded = (out[1], None) if decoder_only else (make_caches(state), out)
            first = input_len if decoder_only else 0
            token = jnp.ones((1, 1), jnp.int32)
            caches = jax.block_until_ready(step(state, caches, token, first, encoded)[1])  # compile
            decode_times, caches = timed_steps(
                lambda c, i: step(state, c, token, i, encoded), caches, lambda i: (first + 1 + i,), OUTPUT_TOKENS - 1
            )
            cache_bytes = sum(x.nbytes for x in jax.tree.leaves(caches))
            encoder_bytes = 0 if decoder_only else int(encoded.nbytes)
            train = (forward_flops(cfg, input_len + OUTPUT_TOKENS) if decoder_only
                     else forward_flops(cfg, input_len, OUTPUT_TOKENS)).train
            decode_kwargs = {} if decoder_only else {"input_len": input_len}
            rows.append(dict(
                model=name, params=count_params(cfg).total, input_len=input_len, output_len=OUTPUT_TOKENS,
                train_flops_per_example=train, prefill_flops=prefill_flops(cfg, input_len, cache_len),
                prefill_seconds=min(prefill_times), prefill_seconds_median=statistics.median(prefill_times),
                decode_flops_per_token=decode_flops_per_token(cfg, cache_len, **decode_kwargs),
                decode_flops_per_token_cross_kv_cached=(None if decoder_only else decode_flops_per_token(
                    cfg, cache_len, input_len, cross_kv_cached=True)),
                decode_ms_per_token=1e3 * min(decode_times),
                decode_ms_per_token_median=1e3 * statistics.median(decode_times),
                kv_cache_bytes=cache_bytes, encoder_output_bytes=encoder_bytes,
                held_bytes=cache_bytes + encoder_bytes,
                cross_kv_cache_bytes_if_cached=(None if decoder_only else 2 * cfg.decoder_layers * cfg.kv_heads
                                                * cfg.dim_per_head * input_len * 4),
                total_seconds=min(prefill_times) + OUTPUT_TOKENS * min(decode_times),
            ))
            print(f"long_input: {json.dumps(rows[-1])}", flush=True)
            del caches, out, encoded
    return rows


def plot_long_input(rows: list[dict], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    panels = [("prefill_seconds", "prefill (s)"), ("decode_ms_per_token", "decode (ms / token)"),
              ("held_bytes", "held during decoding (MiB)")]
    for ax, (key, label) in zip(axes, panels):
        for name, marker in zip(dict.fromkeys(r["model"] for r in rows), "os^"):
            sel = [r for r in rows if r["model"] == name]
            scale = 2**20 if key == "held_bytes" else 1
            ax.plot([r["input_len"] for r in sel], [r[key] / scale for r in sel], marker=marker, label=name)
        ax.set(xscale="log", yscale="log", xlabel="input tokens (output 64)", title=label)
        ax.set_xticks(INPUT_LENGTHS, [str(n) for n in INPUT_LENGTHS], minor=False)
        ax.set_xticks([], minor=True)
        ax.grid(alpha=0.3, which="both")
    axes[0].legend()
    fig.suptitle("8-layer decoder vs 8+8 and 4+4 encoder-decoders, d_model 256, CPU (2 shared cores), batch 1")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- part 4: cached vs uncached decoding at a 1K context -----------------------------------


def part_speed(context: int, rounds: int, steps_per_round: int = 4) -> dict:
    """Per-token decoding time at ``context`` tokens: uncached (the whole prefix through the
    model for every new token) against one cached step (float32 and int8 caches). The three
    are measured in interleaved rounds, so a burst of load from other jobs hits all of them."""
    cfg = long_input_models()["decoder 8"]
    graphdef, state = nnx.split(build_model(cfg))
    n_cached = rounds * steps_per_round
    tokens = jnp.asarray(np.random.default_rng(0).integers(6, 2048, (1, context + n_cached + 1)), jnp.int32)

    @jax.jit
    def uncached(state, tokens_1T):
        net = nnx.merge(graphdef, state)
        return net.logits(net.hidden(tokens_1T)[0][:, -1:])

    result = {"context": context, "model": "decoder_only d_model 256, 8 layers, 4 heads, vocab 2048",
              "rounds": rounds}
    steps, caches = {}, {}
    for cache_dtype in ("float32", "int8"):
        graphdef_c, _ = nnx.split(abstract(cfg.replace(kv_cache_dtype=cache_dtype)))

        def step_fn(state, caches, token_11, index, graphdef_c=graphdef_c):
            net = nnx.merge(graphdef_c, state)
            hidden_11D, caches = net.hidden(token_11, positions_BT=jnp.full((1, 1), index), caches=caches,
                                            cache_index=index)
            return net.logits(hidden_11D), caches

        steps[cache_dtype] = jax.jit(step_fn, donate_argnums=(1,))
        caches[cache_dtype] = nnx.merge(graphdef_c, state).init_caches(1, context + n_cached + 1)
        result[f"cached_{cache_dtype}_cache_bytes"] = sum(x.nbytes for x in jax.tree.leaves(caches[cache_dtype]))
        compiled = steps[cache_dtype].lower(state, caches[cache_dtype], tokens[:, :1], context).compile()
        # XLA's estimate for one step; the layer scan's body is counted once.
        result[f"cached_{cache_dtype}_xla_bytes_accessed_per_step"] = compiled.cost_analysis()["bytes accessed"]
    times: dict[str, list[float]] = {"uncached": [], "float32": [], "int8": []}
    run_uncached = lambda: jax.block_until_ready(uncached(state, tokens[:, :context]))  # noqa: E731
    run_uncached()  # compile
    for cache_dtype, step in steps.items():  # compile
        logits, caches[cache_dtype] = step(state, caches[cache_dtype], tokens[:, :1], context)
        jax.block_until_ready(logits)
    for r in range(rounds):
        begin = time.perf_counter()
        run_uncached()
        times["uncached"].append(time.perf_counter() - begin)
        start = context + 1 + r * steps_per_round
        for cache_dtype, step in steps.items():
            round_times, caches[cache_dtype] = timed_steps(
                lambda c, t, i, step=step: step(state, c, t, i), caches[cache_dtype],
                lambda i: (tokens[:, start + i:start + i + 1], start + i), steps_per_round,
            )
            times[cache_dtype] += round_times
    result["uncached_ms_per_token"] = 1e3 * min(times["uncached"])
    result["uncached_ms_per_token_median"] = 1e3 * statistics.median(times["uncached"])
    for cache_dtype in steps:
        result[f"cached_{cache_dtype}_ms_per_token"] = 1e3 * min(times[cache_dtype])
        result[f"cached_{cache_dtype}_ms_per_token_median"] = 1e3 * statistics.median(times[cache_dtype])
        result[f"speedup_{cache_dtype}"] = (
            result["uncached_ms_per_token"] / result[f"cached_{cache_dtype}_ms_per_token"]
        )
        result[f"speedup_{cache_dtype}_median"] = (
            result["uncached_ms_per_token_median"] / result[f"cached_{cache_dtype}_ms_per_token_median"]
        )
    print(f"speed: {json.dumps(result)}", flush=True)
    return result


# ---- driver -------------------------------------------------------------------------------


def write_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="bytes,loss,long_input,speed",
                        help="comma-separated; 'plots' only redraws the PNGs from results.json")
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--run-dir", type=Path, help="default: runs/kv_cache_study/small_gpt_<steps> (gitignored)")
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--loss-rows", type=int, default=64)
    parser.add_argument("--prefill", type=int, default=32, help="tokens prefilled before token-by-token decoding")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    parts = set(args.parts.split(","))
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    if parts - {"plots"}:  # a measuring run records where and under what load it ran
        results["device"] = f"{jax.devices()[0].device_kind} ({os.cpu_count()} cores), jax {jax.__version__}"
        results["load_average_at_start"] = os.getloadavg()[0]
    if "bytes" in parts:
        results["bytes"] = part_bytes()
        write_csv(results["bytes"], args.out / "bytes.csv")
        plot_bytes(results["bytes"], args.out / "bytes_vs_context.png")
    if "loss" in parts:
        run_dir = args.run_dir or REPO / "runs" / "kv_cache_study" / f"small_gpt_{args.train_steps}"
        results["loss"] = part_loss(run_dir, args.train_steps, args.loss_rows, args.prefill)
    if "long_input" in parts:
        results["long_input"] = part_long_input(args.repeats)
        write_csv(results["long_input"], args.out / "long_input.csv")
        plot_long_input(results["long_input"], args.out / "long_input.png")
    if "plots" in parts:
        plot_bytes(results["bytes"], args.out / "bytes_vs_context.png")
        plot_long_input(results["long_input"], args.out / "long_input.png")
    if "speed" in parts:
        results["speed"] = part_speed(1024, rounds=8)
    results_path.write_text(json.dumps(results, indent=1))
    print(f"wrote {results_path}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
