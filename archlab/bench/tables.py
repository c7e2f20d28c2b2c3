"""Markdown tables from ``scripts/benchmark.py`` JSON lines (``--markdown`` / ``--markdown-from``).

Every number in a table is a field of a JSON line the benchmark printed, rounded for reading.
"""

from __future__ import annotations


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _shape(r: dict) -> str:
    return (f"{r['family']} ({r['objective']}), {r['n_layers']}L d{r['d_model']} h{r['n_heads']} ff{r['d_ff']}, "
            f"V {r['vocab']}, T {r['seq_len']}, B {r['batch']}, {r['dtype']}")


def _layers(r: dict) -> str:
    """How archlab ran its layers (peers: n/a)."""
    if r.get("scan_layers") is None:
        return "n/a"
    mode = "scan" if r["scan_layers"] else "unrolled"
    return mode if r.get("remat", "none") == "none" else f"{mode}, remat={r['remat']}"


def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def markdown(records: list[dict]) -> str:
    out: list[str] = []
    machine = [r for r in records if r["measure"] == "machine"]
    if machine:
        m = machine[-1]
        out.append(f"Machine: {m['cpu']}, {m['cores']} cores, {m['platform']} ({m['device']}), jax {m['jax']}, "
                   f"XLA_FLAGS={m['xla_flags'] or '(none)'}, 1-minute load average at start {m.get('loadavg_1m', 0):.1f}")
    train = [r for r in records if r["measure"] == "train"]
    if train:
        shapes = sorted({_shape(r) for r in train})
        out.append("Shape: " + "; ".join(shapes))
        rows = [[r["impl"] if len(shapes) == 1 else f"{r['impl']} ({_shape(r)})", _layers(r),
                 _fmt(r.get("head_chunk"), "d") or "n/a",
                 f"{r['tokens_per_s']:,.0f}", f"{r['step_ms']:.0f}", f"{r['step_ms_min']:.0f}-{r['step_ms_max']:.0f}",
                 _fmt(r.get("cpu_ms"), ".0f"), f"{100 * r['mfu']:.1f}%", _fmt(r.get("compile_s"), ".1f"),
                 _fmt(r.get("xla_temp_mb"), ",.0f"), _fmt(r.get("peak_rss_mb", r.get("peak_device_mb")), ",.0f"),
                 str(r["timed_steps"]), _fmt(r.get("loadavg_1m"), ".1f")]
                for r in train]
        out.append(_table(["impl", "layers", "head chunk", "tokens/s", "median step ms", "step ms range",
                           "CPU ms/step", "MFU", "compile s", "XLA temp MB", "peak RSS MB", "timed steps", "load 1m"],
                          rows))
    ratios = [r for r in records if r["measure"] == "ratio" and "tokens_per_s_ratio" in r]
    if ratios:
        out.append(_table(["ratio", "tokens/s (wall)", "CPU time per step"],
                          [[r["impl"], f"{r['tokens_per_s_ratio']:.2f}x", _fmt(r.get("cpu_ms_ratio"), ".2f") + "x"]
                           for r in ratios]))
    ablation = [r for r in records if r["measure"] == "ablation"]
    if ablation:
        rows = [[r["impl"], _layers(r), _fmt(r.get("head_chunk"), "d"), f"{r['tokens_per_s']:,.0f}",
                 f"{r['step_ms']:.0f}", f"{r['cpu_ms']:.0f}", f"{r['step_time_vs_before']:.3f}",
                 _fmt(r.get("loadavg_1m"), ".1f")] for r in ablation]
        out.append(_table(["variant", "layers", "head chunk", "tokens/s", "median step ms", "CPU ms/step",
                           "step time / before", "load 1m"], rows))
    depth = [r for r in records if r["measure"] == "compile_depth"]
    if depth:
        rows = [[str(r["n_layers"]), _layers(r), f"{r['lower_s']:.2f}",
                 f"{r['compile_s']:.2f}"] for r in depth]
        rows += [[r["impl"], "", "", f"{r['compile_s_ratio']:.2f}x"]
                 for r in records if r["measure"] == "ratio" and "compile_s_ratio" in r]
        out.append(_table(["layers", "layers as", "trace+lower s", "compile s"], rows))
    pipeline = [r for r in records if r["measure"] == "pipeline"]
    if pipeline:
        rows = [[_shape(r), f"{r['pipeline_tokens_per_s']:,.0f}", _fmt(r.get("x_training_tokens_per_s"), ".1f")]
                for r in pipeline]
        out.append(_table(["input pipeline (grain + objective transform)", "tokens/s", "x training tokens/s"], rows))
    decode = [r for r in records if r["measure"] == "decode"]
    if decode:
        rows = [[_shape(r), str(r["prompt_len"]), str(r["new_tokens"]), f"{r['decode_tokens_per_s']:,.0f}",
                 f"{r['ms_per_token_step']:.1f}", r["kv_cache_dtype"]] for r in decode]
        out.append(_table(["KV-cache decode", "prompt", "new tokens", "tokens/s", "ms per step", "cache"], rows))
    return "\n\n".join(out)
