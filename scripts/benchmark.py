"""Throughput of archlab, one JSON line per measurement, optionally side by side with peers.

    python scripts/benchmark.py --peer                       # the CPU target shape vs HF GPT-2 (torch, flax)
    python scripts/benchmark.py model=encoder_only objective=mlm size=medium data.seq_len=256 \\
        run.batch_size=8 data.vocab_size=8192                # any family / size / length / batch / dtype
    python scripts/benchmark.py model=encoder_decoder objective=span_corruption --no-train --no-pipeline
                                                             # KV-cache decoding only
    python scripts/benchmark.py --depth-compile              # compile time of 2 vs 24 scanned layers
    python scripts/benchmark.py --markdown-from results.jsonl   # the tables, from saved JSON lines

Positional arguments are Hydra overrides of ``archlab/conf/train.yaml``, composed exactly as
``archlab-train`` composes them. ``--peer`` with no overrides uses the CPU target shape
(decoder-only, 4 layers, d_model 256, 4 heads, d_ff 1024, sequence 256, batch 8, vocabulary 8192,
tied embeddings, learned positions, GELU(tanh), float32, AdamW with clipping).

Measurements (``"measure"`` in each line): ``train`` (tokens/s and the median step time of timed
steps after warm-up, every step ended with ``jax.block_until_ready``; MFU against
``archlab.accounting.device_peak_flops()``; trace+lower and compile seconds; peak memory),
``decode`` (KV-cache generation, ``archlab.generate``), ``pipeline`` (the grain iterator with the
objective transform) and ``compile_depth``. With ``--peer`` the implementations run interleaved,
round by round, in this one process, so machine load falls on all of them alike; a final
``ratio`` line gives archlab over each peer. Speed claims live here, never in unit tests.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from archlab.bench.harness import (
    PEER_SHAPE, BenchShape, PackShape, emit, machine, peak_memory_mb, time_interleaved,
)
# The layer modes archlab offers, timed beside the default (scanned layers, remat=auto:
# dots_no_batch on the CPU) under --peer.
PEER_VARIANTS = ["model.scan_layers=false", "model.remat=none"]
def train_record(name: str, times: dict[str, list[float]], setup: BenchShape, peak: float, extra: dict) -> dict:
    wall, median = times["wall"], statistics.median(times["wall"])
    return {
        "measure": "train", "impl": name, **extra.pop("describe"), "tokens_per_s": setup.plan.tokens_per_step / median,
        "step_ms": 1e3 * median, "step_ms_min": 1e3 * min(wall), "step_ms_max": 1e3 * max(wall),
        "cpu_ms": 1e3 * statistics.median(times["cpu"]), "timed_steps": len(wall),
        "mfu": setup.plan.train_flops_per_step / median / peak, "peak_flops": peak,
        "loadavg_1m": os.getloadavg()[0], **extra,
    }


def bench_train(setup: BenchShape, args, sink: list, peers: bool) -> None:
    """archlab as configured, each ``--variant``, and with ``--peer`` the peers, interleaved."""
    from archlab.accounting import device_peak_flops

    peak = device_peak_flops()
    info, runners, setups = {}, {}, {"archlab": setup}
    compile_info, runners["archlab"] = setup.compile()
    runners["archlab"]()  # one step, so the memory high-water mark below is archlab's alone
    info["archlab"] = {"describe": setup.describe(), **compile_info, **peak_memory_mb()}
    for variant in args.variant:
        extra = variant.split()
        name = f"archlab {' '.join(extra)}"
        setups[name] = variant_setup = BenchShape([*setup.overrides, *extra])  # its own tokens and FLOPs per step
        compile_info, runners[name] = variant_setup.compile()
        info[name] = {"describe": variant_setup.describe(), **compile_info}
    if peers:
        from archlab.bench import peers as benchmark_peers

        peer_shape = {**setup.describe(), "scan_layers": None, "remat": None, "attention_kernel": None,
                      "head_chunk": None}
        for name, build in (("hf_torch", benchmark_peers.torch_step), ("hf_flax", benchmark_peers.flax_step)):
            if name.removeprefix("hf_") in args.peers:
                runners[name], seconds = build(setup.plan.model, setup.cfg.optimizer, setup.trainer.schedule, setup.host_batch)
                info[name] = {"describe": peer_shape, "compile_s": seconds}
    times = time_interleaved(runners, warmup=args.warmup, rounds=args.rounds, steps=args.steps)
    records = {name: train_record(name, times[name], setups.get(name, setup), peak, info[name]) for name in runners}
    for record in records.values():
        emit(record, sink)
    for ours in (name for name in records if name.startswith("archlab")):
        for peer in (name for name in records if not name.startswith("archlab")):
            emit({"measure": "ratio", "impl": f"{ours} / {peer}",
                  "tokens_per_s_ratio": records[ours]["tokens_per_s"] / records[peer]["tokens_per_s"],
                  "cpu_ms_ratio": records[peer]["cpu_ms"] / records[ours]["cpu_ms"]}, sink)


def bench_decode(setup: BenchShape, args, sink: list) -> None:
    import numpy as np

    from archlab.generate import generate

    model, family = setup.trainer.model, setup.plan.model.family
    if family == "encoder_only":
        return
    batch, max_len = setup.cfg.run.batch_size, setup.plan.model.max_seq_len
    prompt_len = min(args.prompt_len, max_len // 2)
    new = min(args.new_tokens, max_len - (prompt_len if family == "decoder_only" else 0))
    key = "inputs" if family == "decoder_only" else "encoder_inputs"
    prompts = np.asarray(setup.host_batch[key])[:batch, :prompt_len]
    start = time.perf_counter()
    generate(model, prompts, max_new_tokens=new, eos_id=None)  # compiles prefill/encoder and the step
    first_s = time.perf_counter() - start
    runs = []
    for _ in range(args.decode_runs):
        start = time.perf_counter()
        generate(model, prompts, max_new_tokens=new, eos_id=None)
        runs.append(time.perf_counter() - start)
    median = statistics.median(runs)
    emit({"measure": "decode", "impl": "archlab", **setup.describe(), "prompt_len": prompt_len, "new_tokens": new,
          "decode_tokens_per_s": batch * new / median, "ms_per_token_step": 1e3 * median / new,
          "first_call_s": first_s, "runs": len(runs), "kv_cache_dtype": setup.plan.model.cache_dtype}, sink)


def bench_pipeline(setup: BenchShape, args, sink: list, train_tokens_per_s: float | None) -> None:
    iterator = setup.trainer.iterator()
    for _ in range(3):
        next(iterator)
    start = time.perf_counter()
    for _ in range(args.pipeline_batches):
        next(iterator)
    elapsed = time.perf_counter() - start
    tokens_per_s = args.pipeline_batches * setup.plan.tokens_per_step / elapsed
    record = {"measure": "pipeline", "impl": "archlab", **setup.describe(), "pipeline_tokens_per_s": tokens_per_s,
              "batches": args.pipeline_batches}
    if train_tokens_per_s:
        record["x_training_tokens_per_s"] = tokens_per_s / train_tokens_per_s
    emit(record, sink)


# The scaling ladder's shapes (issue 13): vocabulary 512, context 128, 2 layers, d_ff = 4 d_model.
LADDER = ["model=decoder_only", "objective=clm", "data.vocab_size=512", "data.seq_len=128", "run.batch_size=16",
          "model.n_layers=2", "optimizer.schedule=wsd", "optimizer.warmup_tokens=2048", "run.tokens=1000000"]
LADDER_WIDTHS = {16: 2, 32: 2, 48: 2, 64: 4, 128: 4}  # d_model: heads


def bench_members(args, sink: list) -> None:
    """Per ladder width: M members packed into one vmapped step, the same M one after another (one
    member's step M times), and GPT-2 in PyTorch eager (nanoGPT's architecture, Hugging Face's
    code) at the same shape and batch, interleaved."""
    from archlab.bench import peers as benchmark_peers

    m = args.members
    members = "run.members=[" + ",".join(f"{{seed:{i}}}" for i in range(m)) + "]"
    for width in args.widths:
        shape = [*LADDER, f"model.d_model={width}", f"model.n_heads={LADDER_WIDTHS[width]}",
                 f"model.d_ff={4 * width}", *args.overrides]
        single, packed = BenchShape(shape), PackShape([*shape, members])
        runners = {"separate": single.compile()[1], "packed": packed.compile()[1]}
        if args.peer:
            runners["torch"], _ = benchmark_peers.torch_step(single.plan.model, single.cfg.optimizer,
                                                             single.trainer.schedule, single.host_batch)
        times = time_interleaved(runners, warmup=args.warmup, rounds=args.rounds, steps=args.steps)
        tokens, flops = single.plan.tokens_per_step, single.plan.train_flops_per_step
        step_s = {name: statistics.median(t["wall"]) for name, t in times.items()}
        for name, seconds in step_s.items():
            count = m if name == "packed" else 1  # rows of M members per packed step
            emit({"measure": "members", "impl": name, **single.describe(), "members": count,
                  "step_ms": 1e3 * seconds, "tokens_per_s_total": count * tokens / seconds,
                  "tokens_per_s_per_member": tokens / seconds,
                  "effective_gflop_s": count * flops / seconds / 1e9, "loadavg_1m": os.getloadavg()[0]}, sink)
        # M members one after another take M single steps; packed, one step carries all M.
        emit({"measure": "ratio", "impl": f"{m} packed / {m} separate (d_model {width})",
              "tokens_per_s_ratio": m * step_s["separate"] / step_s["packed"], "target": 2.0}, sink)


def bench_ladder_wall(args, sink: list) -> None:
    """Wall seconds of a whole 6-budget ladder at one size (one process: start-up, compile, trunk and
    its branches) against six separate cosine runs to the same budgets, each its own process, as the
    first scaling study ran them."""
    import subprocess
    import sys
    import tempfile

    width = args.widths[0]
    base = [*LADDER[:6], f"model.d_model={width}", f"model.n_heads={LADDER_WIDTHS[width]}", f"model.d_ff={4 * width}",
            "optimizer.warmup_tokens=20480", "logger=none", "run.progress=false", "run.samples=0",
            "run.eval_every=100000", "run.checkpoint_every=100000", *args.overrides]
    budgets = [args.ladder_tokens * 2**k for k in range(6)]  # 2x spacing, 1.5 decades
    work = Path(tempfile.mkdtemp(prefix="archlab-ladder-"))

    def run(name: str, extra: list[str]) -> float:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "from archlab.cli import train_main; train_main()", *base, *extra,
                        f"run.dir={work / name}"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return time.perf_counter() - start

    branches = "[" + ",".join(str(b) for b in budgets) + "]"
    ladder_s = run("ladder", ["optimizer.schedule=wsd", f"run.tokens={budgets[-1]}", f"run.branches={branches}"])
    separate_s = [run(f"cosine-{b}", ["optimizer.schedule=cosine", f"run.tokens={b}"]) for b in budgets]
    emit({"measure": "ladder_wall", "impl": "trunk + 6 branches", "d_model": width, "budgets_tokens": budgets,
          "wall_s": ladder_s, "loadavg_1m": os.getloadavg()[0]}, sink)
    emit({"measure": "ladder_wall", "impl": "6 separate cosine runs", "d_model": width, "budgets_tokens": budgets,
          "wall_s": sum(separate_s), "per_run_s": separate_s, "loadavg_1m": os.getloadavg()[0]}, sink)
    emit({"measure": "ratio", "impl": "ladder / separate runs (wall)", "wall_ratio": ladder_s / sum(separate_s),
          "target": 1 / 3}, sink)


DEPTH_MODES = {
    "scan": ["model.scan_layers=true", "model.remat=none"],
    "unrolled": ["model.scan_layers=false", "model.remat=none"],
    "scan-remat": ["model.scan_layers=true", "model.remat=auto"],
}


def bench_depth_compile(args, sink: list) -> None:
    """AOT compile seconds of the train step at 2 and 24 layers, per layer mode."""
    base = args.overrides or PEER_SHAPE
    for mode in args.depth_modes:
        seconds = {}
        for layers in (2, 24):
            setup = BenchShape([*base, f"model.n_layers={layers}", *DEPTH_MODES[mode]])
            info, _ = setup.compile()
            seconds[layers] = info["compile_s"]
            emit({"measure": "compile_depth", "impl": "archlab", **setup.describe(), **info}, sink)
        emit({"measure": "ratio", "impl": f"compile 24/2 layers ({mode})", "compile_s_ratio": seconds[24] / seconds[2]},
             sink)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of archlab/conf/train.yaml")
    parser.add_argument("--peer", action="store_true", help="also Hugging Face GPT-2 (torch, flax), interleaved")
    parser.add_argument("--peers", default="torch,flax", help="which peers --peer runs (comma-separated)")
    parser.add_argument("--variant", action="append", default=None,
                        help="also time archlab with these extra overrides (space-separated; repeatable)")
    parser.add_argument("--depth-compile", action="store_true", help="compile time of 2 vs 24 layers")
    parser.add_argument("--members", type=int, default=0,
                        help="packed members against separate runs at the ladder widths (with --peer: torch too)")
    parser.add_argument("--widths", default="16,32,48,128", help="ladder d_model values for --members")
    parser.add_argument("--ladder-wall", action="store_true",
                        help="a 6-budget ladder (one process) against 6 separate cosine runs, at the first width")
    parser.add_argument("--ladder-tokens", type=int, default=131072, help="--ladder-wall's smallest budget")
    parser.add_argument("--depth-modes", default="scan,scan-remat",
                        help="comma-separated layer modes for --depth-compile: " + ", ".join(DEPTH_MODES))
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of --steps timed steps")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--no-train", dest="train", action="store_false", help="skip the training measurement")
    parser.add_argument("--no-decode", dest="decode", action="store_false")
    parser.add_argument("--no-pipeline", dest="pipeline", action="store_false")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--decode-runs", type=int, default=3)
    parser.add_argument("--pipeline-batches", type=int, default=100)
    parser.add_argument("--markdown", action="store_true", help="print the tables of this run at the end")
    parser.add_argument("--markdown-from", type=Path, help="only print the tables of these saved JSON lines")
    args = parser.parse_args(argv)
    if args.peer and not args.train:
        parser.error("--peer compares training steps; it cannot be combined with --no-train")
    args.peers = set(args.peers.split(","))
    if args.variant is None:
        args.variant = PEER_VARIANTS if args.peer and not args.overrides else []
    args.depth_modes = args.depth_modes.split(",")
    if args.markdown_from:
        from archlab.bench import tables as benchmark_tables

        lines = [json.loads(x) for x in args.markdown_from.read_text().splitlines() if x.startswith("{")]
        print(benchmark_tables.markdown(lines))
        return
    sink: list = []
    emit(machine(), sink)
    args.widths = [int(w) for w in args.widths.split(",")]
    if args.ladder_wall:
        bench_ladder_wall(args, sink)
    elif args.members:
        bench_members(args, sink)
    elif args.depth_compile:
        bench_depth_compile(args, sink)
    else:
        overrides = args.overrides if args.overrides or not args.peer else PEER_SHAPE
        setup = BenchShape(overrides)
        if args.peer:  # a shape the reference model cannot express: one line, before anything compiles
            from archlab.bench import peers as benchmark_peers

            from archlab.errors import ConfigError

            try:
                benchmark_peers.hf_config(setup.plan.model)
            except ConfigError as refusal:
                parser.exit(2, f"benchmark.py: error: {refusal}\n")
        if args.train:
            bench_train(setup, args, sink, peers=args.peer)
        if args.pipeline:
            trained = [r["tokens_per_s"] for r in sink if r["measure"] == "train" and r["impl"] == "archlab"]
            bench_pipeline(setup, args, sink, trained[0] if trained else None)
        if args.decode:
            bench_decode(setup, args, sink)
    if args.markdown:
        from archlab.bench import tables as benchmark_tables

        print(benchmark_tables.markdown(sink))


if __name__ == "__main__":
    main()
