"""Per-device memory of the compiled train step: replicated, FSDP 8, FSDP 4 x tensor 2 on 8 CPU devices.

    python scripts/memory_sharding.py                       # sizes 1b and gpt2_small; writes experiments/sharding/README.md
    python scripts/memory_sharding.py --sizes medium --out - # print only

Each configuration is composed as ``archlab-train`` would build it, its state kept abstract (shapes and
shardings, nothing allocated), and the jitted train step only lowered and compiled, never run. XLA's
``compiled.memory_analysis()`` of the partitioned program is per device: arguments (the state and the
batch shard), outputs (the new state, aliased onto the donated arguments) and temporaries (gradients,
activations kept for the backward pass, collectives' buffers). Beside it, the arithmetic: parameter and
AdamW-moment bytes per device from the shardings themselves, gradients as large as the parameters, and
``train/memory.py``'s activation lower bound for the rows one device holds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

MESHES = {
    "replicated (data 8)": ["mesh.data=8"],
    "FSDP 8": ["mesh.data=1", "mesh.fsdp=8"],
    "FSDP 4 x tensor 2": ["mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2"],
}
MIB = 2**20
REPO = Path(__file__).resolve().parent.parent


def tree_bytes_per_device(tree, mesh) -> float:
    """Bytes one device holds of ``tree``: each leaf's bytes divided by the devices its spec splits it over."""
    import jax
    import numpy as np

    total = 0.0
    for leaf, sharding in zip(jax.tree.leaves(tree), jax.tree.leaves(mesh.shardings(tree))):
        split = 1
        for entry in sharding.spec:
            for axis in () if entry is None else (entry,) if isinstance(entry, str) else entry:
                split *= mesh.sizes[axis]
        total += np.prod(leaf.shape) * leaf.dtype.itemsize / split
    return total


def measure(size: str, mesh_name: str, overrides: list[str]) -> dict:
    import jax

    from archlab.train.memory import estimate_bytes
    from archlab.trainer import Trainer, compose

    cfg = compose([f"size={size}", "logger=none", "run.progress=false", *MESHES[mesh_name], *overrides])
    trainer = Trainer(cfg, abstract=True)
    mesh = trainer.mesh
    host = next(iter(trainer.iterator()))
    accum = cfg.optimizer.grad_accum_steps
    leading = 1 if accum > 1 else 0
    batch = {k: (v.reshape(accum, -1, *v.shape[1:]) if accum > 1 else v) for k, v in host.items()}
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=mesh.batch_sharding(v.ndim, leading))
             for k, v in batch.items()}
    start = time.perf_counter()
    compiled = trainer.train_step.lower(trainer.state, batch, trainer.schedule_points).compile()
    seconds = time.perf_counter() - start
    stats = compiled.memory_analysis()
    params = tree_bytes_per_device(trainer.state.params, mesh)
    moments = tree_bytes_per_device(trainer.state.opt_state, mesh)
    rows = cfg.run.batch_size // accum // (mesh.sizes["data"] * mesh.sizes["fsdp"])
    activations = estimate_bytes(cfg, trainer.plan)["activations"] / (mesh.sizes["data"] * mesh.sizes["fsdp"])
    peak = stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes + stats.temp_size_in_bytes
    return {
        "size": size, "mesh": mesh_name, "params": trainer.plan.params.total, "rows_per_device": rows,
        "seq_len": cfg.data.seq_len, "remat": trainer.plan.model.remat,
        "xla_argument_mib": stats.argument_size_in_bytes / MIB, "xla_output_mib": stats.output_size_in_bytes / MIB,
        "xla_alias_mib": stats.alias_size_in_bytes / MIB, "xla_temp_mib": stats.temp_size_in_bytes / MIB,
        "xla_peak_mib": peak / MIB,
        "arith_params_mib": params / MIB, "arith_adamw_mib": moments / MIB, "arith_grads_mib": params / MIB,
        "arith_activations_mib": activations / MIB,
        "arith_total_mib": (2 * params + moments + activations) / MIB,
        "compile_s": seconds,
    }


TABLE_HEAD = (
    "| size | mesh | rows/device | XLA arguments | XLA temporaries | XLA peak | params | AdamW moments | "
    "gradients | activations (lower bound) | arithmetic total | compile |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
)


def table(rows: list[dict]) -> str:
    lines = [
        f"| {r['size']} ({r['params'] / 1e6:,.0f}M) | {r['mesh']} | {r['rows_per_device']} | "
        f"{r['xla_argument_mib']:,.0f} | {r['xla_temp_mib']:,.0f} | **{r['xla_peak_mib']:,.0f}** | "
        f"{r['arith_params_mib']:,.0f} | {r['arith_adamw_mib']:,.0f} | {r['arith_grads_mib']:,.0f} | "
        f"{r['arith_activations_mib']:,.0f} | **{r['arith_total_mib']:,.0f}** | {r['compile_s']:.0f} s |"
        for r in rows
    ]
    return TABLE_HEAD + "\n".join(lines) + "\n"


def reading(rows: list[dict]) -> str:
    """What the table says, computed from it: the peak each mesh saves, and what the arithmetic misses."""
    lines = []
    for size in dict.fromkeys(r["size"] for r in rows):
        by_mesh = {r["mesh"]: r for r in rows if r["size"] == size}
        base = by_mesh.get("replicated (data 8)")
        for name, r in by_mesh.items():
            extra = r["xla_temp_mib"] - r["arith_grads_mib"] - r["arith_activations_mib"]
            saved = f"peak {base['xla_peak_mib'] / r['xla_peak_mib']:.1f}x below replicated; " if base and r is not base else ""
            lines.append(f"- `{size}`, {name}: {saved}temporaries exceed gradients + activations by {extra:,.0f} MiB.")
    return (
        "Reading it: FSDP divides the state (parameters + two moments, 12 bytes per parameter) by the devices,\n"
        "as the arithmetic says, and the gradients with it (reduce-scattered, never whole). The temporaries\n"
        "hold more than gradients and activations: replicated, a second parameter-sized buffer (the update,\n"
        "before it is written over the donated state); sharded, a remainder this script does not break down\n"
        "(likely all-gathered layer weights and collectives' buffers, as XLA's CPU compiler schedules them;\n"
        "an accelerator's scheduler may free them differently: measure there before sizing a job on it).\n"
        "Tensor parallelism also splits the activations' MLP units, heads and vocabulary, so its temporaries\n"
        "are smaller than FSDP 8's at twice the rows per device.\n\n" + "\n".join(lines) + "\n"
    )


def readme(rows: list[dict], command: str, overrides: list[str]) -> str:
    import jax

    setting = ", ".join(overrides) if overrides else "the presets' defaults"
    return f"""# Sharding: per-device memory of the train step, measured by XLA

    {command}

Written by `scripts/memory_sharding.py` (never edit by hand: rerun it). Every configuration is
compiled, not run, on 8 CPU devices (`--xla_force_host_platform_device_count=8`; jax
{jax.__version__}, {platform.machine()}); overrides: {setting}; data.seq_len {rows[0]['seq_len']},
run.batch_size 16 (rows per device after the split over data x fsdp), float32, AdamW, remat
`{rows[0]['remat']}`. All numbers are MiB **per device**.

- **XLA**: `compiled.memory_analysis()` of the partitioned step. Arguments are the state and the batch
  shard; the new state is written over the donated one (outputs aliased), so the peak is arguments +
  temporaries (+ any output not aliased).
- **Arithmetic**: parameters and AdamW's two moments per device from the very shardings the run uses
  (`archlab/train/sharding.py`; norms and a few biases stay replicated, so FSDP 8 is slightly above
  total / 8), gradients as large as the parameters, and `train/memory.py`'s activation lower bound for
  the device's rows (every layer's input, one layer's MLP hidden and attention probabilities, the logits).

{table(rows)}
{reading(rows)}
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides applied to every configuration")
    parser.add_argument("--sizes", nargs="+", default=["1b", "gpt2_small"])
    parser.add_argument("--meshes", nargs="+", default=list(MESHES), choices=list(MESHES))
    parser.add_argument("--out", default=str(REPO / "experiments" / "sharding" / "README.md"),
                        help="the README to write ('-': print only)")
    args = parser.parse_args(argv)
    rows = []
    for size in args.sizes:
        for mesh_name in args.meshes:
            row = measure(size, mesh_name, args.overrides)
            print(json.dumps(row), flush=True)
            rows.append(row)
    print(table(rows))
    if args.out != "-":
        command = "python scripts/memory_sharding.py " + " ".join(sys.argv[1:])
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(readme(rows, command.strip(), args.overrides))
        (Path(args.out).parent / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
