"""One benchmark shape, assembled through ``archlab.trainer`` exactly as a training run, and the
timing helpers every measurement shares (interleaved rounds, wall and process-CPU seconds)."""

from __future__ import annotations

import json
import os
import platform
import resource
import time
from collections.abc import Callable, Sequence
from pathlib import Path

# What a benchmark never needs: W&B, the progress bar, samples.
QUIET = ["logger=none", "run.progress=false", "run.samples=0"]
# The CPU target shape of ``scripts/benchmark.py --peer`` (what GPT-2 can express at a CPU's size).
PEER_SHAPE = ["model=decoder_only", "objective=clm", "size=medium", "data.seq_len=256", "run.batch_size=8",
              "data.vocab_size=8192", "model.activation=gelu_tanh", "model.dtype=float32"]


def emit(record: dict, sink: list) -> None:
    """Keep ``record`` and print it as one JSON line."""
    sink.append(record)
    print(json.dumps(record), flush=True)


class BenchShape:
    """A ``Trainer`` for these overrides, its first training batch and its jitted step, ready to time."""

    def __init__(self, overrides: Sequence[str]):
        from archlab.trainer import Trainer, compose

        self.overrides = list(overrides)
        self.trainer = Trainer(compose([*QUIET, *self.overrides]))
        self.cfg, self.plan = self.trainer.cfg, self.trainer.plan
        self.host_batch = next(self.trainer.iterator())
        self.batch = self.trainer.device_batch(self.host_batch)

    def describe(self) -> dict:
        m, cfg = self.plan.model, self.cfg
        return {
            "family": m.family, "objective": cfg.objective.name, "d_model": m.d_model, "n_layers": m.n_layers,
            "n_heads": m.n_heads, "d_ff": m.d_ff, "vocab": m.vocab_size, "seq_len": cfg.data.seq_len,
            "batch": cfg.run.batch_size, "dtype": m.dtype, "scan_layers": m.scan_layers, "remat": m.remat,
            "attention_kernel": m.attention_kernel, "head_chunk": m.head_chunk, "params": self.plan.params.total,
            "tokens_per_step": self.plan.tokens_per_step,
        }

    def compile(self) -> tuple[dict, Callable[[], float]]:
        """AOT trace+lower and compile of the train step; returns timings and a ``run_one_step``."""
        import jax

        start = time.perf_counter()
        points = self.trainer.schedule_points
        lowered = self.trainer.train_step.lower(self.trainer.state, self.batch, points)
        lower_s = time.perf_counter() - start
        start = time.perf_counter()
        compiled = lowered.compile()
        compile_s = time.perf_counter() - start
        memory = compiled.memory_analysis()
        temp_mb = getattr(memory, "temp_size_in_bytes", 0) / 2**20 if memory is not None else None
        # The trainer's own state, copied: timing never donates (consumes) the trainer's buffers.
        holder = [jax.tree.map(jax.numpy.copy, self.trainer.state)]

        def run_one_step() -> float:
            holder[0], metrics = compiled(holder[0], self.batch, points)
            jax.block_until_ready((holder[0], metrics))
            return float(metrics["loss"])

        return {"lower_s": lower_s, "compile_s": compile_s, "xla_temp_mb": temp_mb}, run_one_step


class PackShape(BenchShape):
    """``run.members`` packed into one vmapped step (``archlab.train.members.Pack``), ready to time."""

    def __init__(self, overrides: Sequence[str]):
        import tempfile

        from archlab.train.members import Pack
        from archlab.trainer import compose

        self.overrides = list(overrides)
        cfg = compose([*QUIET, *self.overrides])
        self.pack = Pack(cfg, Path(tempfile.mkdtemp(prefix="archlab-pack-")), None)
        self.trainer, self.cfg, self.plan = self.pack.trainers[0], self.pack.cfgs[0], self.pack.plan
        self.members = len(self.pack.cfgs)
        self.batch = self.pack.device_batch([next(iterator) for iterator in self.pack.iterators])

    def compile(self) -> tuple[dict, Callable[[], float]]:
        import jax

        start = time.perf_counter()
        lowered = self.pack.train_step.lower(self.pack.state, self.batch, self.pack.points)
        lower_s = time.perf_counter() - start
        start = time.perf_counter()
        compiled = lowered.compile()
        compile_s = time.perf_counter() - start
        holder = [jax.tree.map(jax.numpy.copy, self.pack.state)]

        def run_one_step() -> float:
            holder[0], metrics = compiled(holder[0], self.batch, self.pack.points)
            jax.block_until_ready((holder[0], metrics))
            return float(metrics["loss"].mean())

        return {"lower_s": lower_s, "compile_s": compile_s}, run_one_step


def repeated_seconds(run: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    """Wall seconds of ``repeats`` calls of ``run`` (which must block) after ``warmup`` untimed ones
    (compilation). On a shared machine report the minimum, the least disturbed call."""
    for _ in range(warmup):
        run()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
    return seconds


def peak_memory_mb() -> dict:
    """Process RSS high-water mark on the CPU; the device allocator's peak elsewhere."""
    import jax

    device = jax.devices()[0]
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        return {"peak_device_mb": stats.get("peak_bytes_in_use", 0) / 2**20}
    return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


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
