"""Where a training step's device time goes: the top kernels of a traced step, one JSON line each.

    python scripts/profile_step.py size=gpt2_small data.seq_len=1024 run.batch_size=16 model.dtype=bfloat16 \\
        model.attention_kernel=cudnn [--steps 3 --top 25]

Composes and compiles the step exactly as ``scripts/benchmark.py`` does, runs warm-up steps, then
traces ``--steps`` steps with ``jax.profiler`` (Perfetto JSON, readable without TensorBoard) and
sums the duration of every device event by name. Each line: kernel name, total ms per step, share
of the summed device time, calls per step; a last line gives the per-step totals. Use it before
optimising: it names the kernels worth a change.
"""

from __future__ import annotations

import argparse
import gzip
import json
import tempfile
from collections import defaultdict
from pathlib import Path



def device_events(trace: dict) -> dict[str, list[dict]]:
    """Complete events ("X") of each device track (process "/device:GPU:0", one per thread/stream line)."""
    meta = [e for e in trace["traceEvents"] if e.get("ph") == "M"]
    processes = {e["pid"]: e["args"].get("name", "") for e in meta if e.get("name") == "process_name"}
    threads = {(e["pid"], e["tid"]): e["args"].get("name", "") for e in meta if e.get("name") == "thread_name"}
    device_pids = {pid for pid, name in processes.items() if "/device:" in name and "CPU" not in name.upper()}
    tracks: dict[str, list[dict]] = defaultdict(list)
    for e in trace["traceEvents"]:
        if e.get("ph") == "X" and e.get("pid") in device_pids:
            tracks[f"{processes[e['pid']]} / {threads.get((e['pid'], e.get('tid')), e.get('tid'))}"].append(e)
    return tracks


def summarize(track: str, events: list[dict], steps: int, top: int) -> list[dict]:
    """The ``top`` event names of one track by total duration, then the track's total."""
    total_us, calls = defaultdict(float), defaultdict(int)
    for e in events:
        total_us[e["name"]] += float(e.get("dur", 0.0))
        calls[e["name"]] += 1
    grand = sum(total_us.values()) or 1.0
    rows = sorted(total_us.items(), key=lambda kv: -kv[1])[:top]
    out = [{"track": track, "kernel": name[:120], "ms_per_step": us / 1e3 / steps, "share": us / grand,
            "calls_per_step": calls[name] / steps} for name, us in rows]
    out.append({"track": track, "kernel": "(all events of this track)", "ms_per_step": grand / 1e3 / steps,
                "share": 1.0, "calls_per_step": sum(calls.values()) / steps})
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of archlab/conf/train.yaml")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)

    import jax

    from archlab.bench.harness import BenchShape

    setup = BenchShape(args.overrides)
    _, run_one_step = setup.compile()
    for _ in range(args.warmup):
        run_one_step()
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(args.steps):
                run_one_step()
        trace_files = sorted(Path(trace_dir).rglob("*.trace.json.gz"))
        if not trace_files:
            raise SystemExit(f"error: jax.profiler wrote no Perfetto trace under {trace_dir}")
        trace = json.loads(gzip.decompress(trace_files[-1].read_bytes()))
    tracks = device_events(trace)
    if not tracks:
        raise SystemExit("error: the trace holds no device events (a CPU run has none; profile on a GPU)")
    for track, events in sorted(tracks.items(), key=lambda kv: -len(kv[1])):
        for row in summarize(track, events, args.steps, args.top):
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
