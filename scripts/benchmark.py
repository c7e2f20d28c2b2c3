"""Throughput of archlab, one JSON line per measurement, optionally side by side with peers.

    python scripts/benchmark.py --peer                       # the CPU target shape vs HF GPT-2 (torch, flax)
    python scripts/benchmark.py model=encoder_only objective=mlm size=medium data.seq_len=256 \\
        run.batch_size=8 data.vocab_size=8192                # any family / size / length / batch / dtype
    python scripts/benchmark.py model=encoder_decoder objective=span_corruption --no-train --no-pipeline
                                                             # KV-cache decoding only
    python scripts/benchmark.py --depth-compile              # compile time of 2 vs 24 scanned layers
    python scripts/benchmark.py --markdown-from results.jsonl   # the tables, from saved JSON lines

Positional arguments are Hydra overrides of ``conf/train.yaml``, composed exactly as
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
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

PEER_SHAPE = ["model=decoder_only", "objective=clm", "size=medium", "data.seq_len=256", "run.batch_size=8",
              "data.vocab_size=8192", "model.activation=gelu_tanh", "model.dtype=float32"]
# The layer modes archlab offers, timed beside the default (scanned layers, remat=auto:
# dots_no_batch on the CPU) under --peer.
PEER_VARIANTS = ["model.scan_layers=false", "model.remat=none"]
QUIET = ["logger=none", "run.progress=false", "run.samples=0"]


def emit(record: dict, sink: list) -> None:
    sink.append(record)
    print(json.dumps(record), flush=True)


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose, initialize_config_dir
    from omegaconf import OmegaConf

    from archlab.cli import _first_set
    from archlab.schema import register_configs

    register_configs()
    if not OmegaConf.has_resolver("archlab.or"):
        OmegaConf.register_new_resolver("archlab.or", _first_set)
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        return OmegaConf.to_object(hydra_compose("train", overrides=[*QUIET, *overrides]))


def peak_memory_mb() -> dict:
    """Process RSS high-water mark on the CPU; the device allocator's peak elsewhere."""
    import jax

    device = jax.devices()[0]
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        return {"peak_device_mb": stats.get("peak_bytes_in_use", 0) / 2**20}
    return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


class Setup:
    """Config, corpus, plan, model and the jitted step of one benchmark shape."""

    def __init__(self, overrides: list[str]):
        import jax
        from flax import nnx

        from archlab.data import build_iterator
        from archlab.nn.models import build_model
        from archlab.train.optim import make_optimizer
        from archlab.train.setup import check_batch, load_corpus, make_plan, objective_transform, row_length_for
        from archlab.train.sharding import Mesh1D
        from archlab.train.state import TrainState
        from archlab.train.step import make_train_step

        self.overrides = overrides
        self.cfg = cfg = compose(overrides)
        check_batch(cfg)
        self.corpus = load_corpus(cfg.data, row_length_for(cfg))
        self.plan = make_plan(cfg, self.corpus.tokenizer.vocab_size)
        self.transform = objective_transform(cfg, self.corpus.tokenizer.vocab_size)
        self.iterator = lambda: build_iterator(
            self.corpus.train, batch_size=cfg.run.batch_size, seed=cfg.run.seed, transform=self.transform
        )
        self.host_batch = next(self.iterator())
        self.model = build_model(self.plan.model, seed=cfg.run.seed)
        graphdef, params = nnx.split(self.model)
        self.tx, self.schedule = make_optimizer(cfg.optimizer, self.plan.total_steps, self.plan.tokens_per_step)
        self.mesh = Mesh1D()
        accum = cfg.optimizer.grad_accum_steps
        batch = self.host_batch
        if accum > 1:
            batch = {k: v.reshape(accum, -1, *v.shape[1:]) for k, v in batch.items()}
        self.batch = self.mesh.shard_batch(batch, leading_axes=1 if accum > 1 else 0)
        self.state = self.mesh.replicate(TrainState.create(jax.tree.map(jax.numpy.copy, params), self.tx))
        self.jitted = make_train_step(graphdef, self.tx, grad_accum_steps=accum, skip_nonfinite=False)

    def describe(self) -> dict:
        m, cfg = self.plan.model, self.cfg
        return {
            "family": m.family, "objective": cfg.objective.name, "d_model": m.d_model, "n_layers": m.n_layers,
            "n_heads": m.n_heads, "d_ff": m.d_ff, "vocab": m.vocab_size, "seq_len": cfg.data.seq_len,
            "batch": cfg.run.batch_size, "dtype": m.dtype, "scan_layers": m.scan_layers, "remat": m.remat_policy,
            "attention_kernel": m.attention_kernel, "head_chunk": m.head_chunk_size, "params": self.plan.params.total,
            "tokens_per_step": self.plan.tokens_per_step,
        }

    def compile(self) -> tuple[dict, callable]:
        """AOT trace+lower and compile of the train step; returns timings and a ``run_one_step``."""
        import jax

        start = time.perf_counter()
        lowered = self.jitted.lower(self.state, self.batch)
        lower_s = time.perf_counter() - start
        start = time.perf_counter()
        compiled = lowered.compile()
        compile_s = time.perf_counter() - start
        memory = compiled.memory_analysis()
        temp_mb = getattr(memory, "temp_size_in_bytes", 0) / 2**20 if memory is not None else None
        holder = [self.state]

        def run_one_step() -> float:
            holder[0], metrics = compiled(holder[0], self.batch)
            jax.block_until_ready((holder[0], metrics))
            return float(metrics["loss"])

        return {"lower_s": lower_s, "compile_s": compile_s, "xla_temp_mb": temp_mb}, run_one_step


def process_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def time_interleaved(runners: dict, *, warmup: int, rounds: int, steps: int) -> dict[str, dict[str, list[float]]]:
    """Per-step wall and process-CPU seconds of each runner, alternating round by round.

    CPU seconds are a second, load-robust view: on a shared machine wall time also counts the
    time other processes held the cores.
    """
    for run in runners.values():
        for _ in range(warmup):
            run()
    times = {name: {"wall": [], "cpu": []} for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            for _ in range(steps):
                wall, cpu = time.perf_counter(), process_cpu_s()
                loss = run()
                times[name]["wall"].append(time.perf_counter() - wall)
                times[name]["cpu"].append(process_cpu_s() - cpu)
            if loss != loss:  # NaN: a broken benchmark, not a fast one
                raise RuntimeError(f"{name} produced a NaN loss")
    return times


def train_record(name: str, times: dict[str, list[float]], setup: "Setup", peak: float, extra: dict) -> dict:
    wall, median = times["wall"], statistics.median(times["wall"])
    return {
        "measure": "train", "impl": name, **extra.pop("describe"), "tokens_per_s": setup.plan.tokens_per_step / median,
        "step_ms": 1e3 * median, "step_ms_min": 1e3 * min(wall), "step_ms_max": 1e3 * max(wall),
        "cpu_ms": 1e3 * statistics.median(times["cpu"]), "timed_steps": len(wall),
        "mfu": setup.plan.train_flops_per_step / median / peak, "peak_flops": peak,
        "loadavg_1m": os.getloadavg()[0], **extra,
    }


def bench_train(setup: Setup, args, sink: list, peers: bool) -> None:
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
        setups[name] = variant_setup = Setup([*setup.overrides, *extra])  # its own tokens and FLOPs per step
        compile_info, runners[name] = variant_setup.compile()
        info[name] = {"describe": variant_setup.describe(), **compile_info}
    if peers:
        import benchmark_peers

        peer_shape = {**setup.describe(), "scan_layers": None, "remat": None, "attention_kernel": None,
                      "head_chunk": None}
        for name, build in (("hf_torch", benchmark_peers.torch_step), ("hf_flax", benchmark_peers.flax_step)):
            if name.removeprefix("hf_") in args.peers:
                runners[name], seconds = build(setup.plan.model, setup.cfg.optimizer, setup.schedule, setup.host_batch)
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


def bench_decode(setup: Setup, args, sink: list) -> None:
    import numpy as np

    from archlab.generate import generate

    model, family = setup.model, setup.plan.model.family
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


def bench_pipeline(setup: Setup, args, sink: list, train_tokens_per_s: float | None) -> None:
    iterator = setup.iterator()
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
            setup = Setup([*base, f"model.n_layers={layers}", *DEPTH_MODES[mode]])
            info, _ = setup.compile()
            seconds[layers] = info["compile_s"]
            emit({"measure": "compile_depth", "impl": "archlab", **setup.describe(), **info}, sink)
        emit({"measure": "ratio", "impl": f"compile 24/2 layers ({mode})", "compile_s_ratio": seconds[24] / seconds[2]},
             sink)


def machine() -> dict:
    import jax

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"measure": "machine", "cpu": cpu, "cores": os.cpu_count(), "device": str(jax.devices()[0].device_kind),
            "platform": jax.devices()[0].platform, "jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "loadavg_1m": os.getloadavg()[0]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/train.yaml")
    parser.add_argument("--peer", action="store_true", help="also Hugging Face GPT-2 (torch, flax), interleaved")
    parser.add_argument("--peers", default="torch,flax", help="which peers --peer runs (comma-separated)")
    parser.add_argument("--variant", action="append", default=None,
                        help="also time archlab with these extra overrides (space-separated; repeatable)")
    parser.add_argument("--depth-compile", action="store_true", help="compile time of 2 vs 24 layers")
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
        import benchmark_tables

        lines = [json.loads(x) for x in args.markdown_from.read_text().splitlines() if x.startswith("{")]
        print(benchmark_tables.markdown(lines))
        return
    sink: list = []
    emit(machine(), sink)
    if args.depth_compile:
        bench_depth_compile(args, sink)
    else:
        overrides = args.overrides if args.overrides or not args.peer else PEER_SHAPE
        setup = Setup(overrides)
        if args.peer:  # a shape the reference model cannot express: one line, before anything compiles
            import benchmark_peers

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
        import benchmark_tables

        print(benchmark_tables.markdown(sink))


if __name__ == "__main__":
    main()
