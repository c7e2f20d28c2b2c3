"""How far each train step is from its own matmul floor, archlab and the Hugging Face Flax peer.

    python experiments/throughput/matmul_floor.py [overrides ...] [--rounds 5 --repeats 15 --torch]

Walks the jaxpr of each train step (archlab's, as ``scripts/benchmark.py`` compiles it, and the
``FlaxGPT2LMHeadModel`` + optax step of ``archlab/bench/peers.py``), collects every
``dot_general`` with its shapes, dimension numbers and how often it runs (scan lengths included),
and times each distinct product alone, jitted, in this process. The sum is the step's *matmul
floor*: the time its products take when each runs by itself with both cores, no fusion
neighbours and warm memory. The whole steps are then timed interleaved, as ``--peer`` does, and
the difference is everything else (norms, activations, softmax, the loss, the optimizer, copies,
page faults, idle cores). ``--torch`` also times every product with ``torch.einsum`` (MKL/oneDNN),
the same arithmetic through the BLAS the PyTorch peer uses.

Prints a JSON line per distinct product and one per impl, then Markdown: the floors, what a ratio
target implies (the step time archlab would need, and how much time beside its matmul floor that
leaves), and archlab's products one by one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np

from archlab.bench import peers as benchmark_peers
from archlab.bench.harness import PEER_SHAPE, BenchShape, repeated_seconds, time_interleaved
from archlab.bench.products import DotKey, collect_dots, dot_flops, einsum_spec

def time_dot(key: DotKey, repeats: int) -> float:
    """Fastest of ``repeats`` runs of this product alone, jitted, inputs resident: a floor."""
    lhs_shape, rhs_shape, dtype, dimension_numbers, preferred = key
    rng = np.random.default_rng(0)
    lhs = jnp.asarray(rng.standard_normal(lhs_shape), dtype)
    rhs = jnp.asarray(rng.standard_normal(rhs_shape), dtype)
    product = jax.jit(lambda a, b: jax.lax.dot_general(a, b, dimension_numbers, preferred_element_type=preferred))
    return min(repeated_seconds(lambda: product(lhs, rhs).block_until_ready(), repeats, warmup=5))


def time_dot_torch(key: DotKey, repeats: int) -> float:
    """Fastest of ``repeats`` runs of the same product in PyTorch (``torch.einsum``: MKL/oneDNN GEMMs)."""
    import torch

    lhs_shape, rhs_shape = key[0], key[1]
    # Size-1 axes dropped: torch.einsum otherwise takes a permute-and-copy path for some of them.
    lhs_spec, rest = einsum_spec(key).split(",")
    rhs_spec, out_spec = rest.split("->")
    unit = {x for spec, shape in ((lhs_spec, lhs_shape), (rhs_spec, rhs_shape)) for x, n in zip(spec, shape) if n == 1}
    lhs = torch.randn([n for n in lhs_shape if n != 1])
    rhs = torch.randn([n for n in rhs_shape if n != 1])
    spec = "{},{}->{}".format(*("".join(x for x in part if x not in unit) for part in (lhs_spec, rhs_spec, out_spec)))
    return min(repeated_seconds(lambda: torch.einsum(spec, lhs, rhs), repeats, warmup=5))


def product_rows(counts: Counter, repeats: int, with_torch: bool) -> list[dict]:
    """One row per distinct product: how often per step, its time alone (XLA, and PyTorch if asked)."""
    rows = []
    for key, n in counts.items():
        seconds = time_dot(key, repeats)
        row = {"einsum": einsum_spec(key), "lhs": list(key[0]), "rhs": list(key[1]), "per_step": n,
               "gflop": n * dot_flops(key) / 1e9, "xla_ms": n * seconds * 1e3, "xla_gflop_per_s": dot_flops(key) / seconds / 1e9}
        if with_torch:
            torch_seconds = time_dot_torch(key, repeats)
            row.update(torch_ms=n * torch_seconds * 1e3, torch_gflop_per_s=dot_flops(key) / torch_seconds / 1e9)
        rows.append(row)
    return sorted(rows, key=lambda r: -r["xla_ms"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides (default: the --peer shape)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of whole steps")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per impl per round")
    parser.add_argument("--repeats", type=int, default=15, help="timed runs of each distinct product")
    parser.add_argument("--target", type=float, default=1.5, help="the archlab / hf_flax ratio to examine")
    parser.add_argument("--torch", action="store_true", help="also time every product in PyTorch")
    args = parser.parse_args(argv)

    setup = BenchShape(args.overrides or PEER_SHAPE)
    cfg = setup.plan.model
    train_step, params, opt_state = benchmark_peers.flax_train_step(cfg, setup.cfg.optimizer, setup.trainer.schedule)
    peer_batch = benchmark_peers.flax_batch(cfg, setup.host_batch)
    programs = {
        "archlab": jax.make_jaxpr(setup.trainer.train_step)(
            setup.trainer.state, setup.batch, setup.trainer.schedule_points).jaxpr,
        "hf_flax": jax.make_jaxpr(train_step)(params, opt_state, peer_batch).jaxpr,
    }
    products = {name: product_rows(collect_dots(jaxpr), args.repeats, args.torch) for name, jaxpr in programs.items()}
    runners = {"archlab": setup.compile()[1]}
    runners["hf_flax"], _ = benchmark_peers.flax_step(cfg, setup.cfg.optimizer, setup.trainer.schedule, setup.host_batch)
    times = time_interleaved(runners, warmup=2, rounds=args.rounds, steps=args.steps)
    rows = {}
    for name, product_list in products.items():
        for product in product_list:
            print(json.dumps({"measure": "product", "impl": name, **product}))
        step_ms = statistics.median(times[name]["wall"]) * 1e3
        floor_ms, gflop = sum(p["xla_ms"] for p in product_list), sum(p["gflop"] for p in product_list)
        rows[name] = {"measure": "matmul_floor", "impl": name, "step_ms": step_ms, "matmul_floor_ms": floor_ms,
                      "matmul_gflop": gflop, "matmul_gflop_per_s": gflop / floor_ms * 1e3, "other_ms": step_ms - floor_ms,
                      "load_1m": os.getloadavg()[0]}
        if args.torch:
            rows[name]["torch_floor_ms"] = sum(p["torch_ms"] for p in product_list)
        print(json.dumps(rows[name]), flush=True)
    ours, peer = rows["archlab"], rows["hf_flax"]
    needed_ms = peer["step_ms"] / args.target
    print(json.dumps({"measure": "target", "ratio": args.target, "step_ms_needed": needed_ms,
                      "other_ms_allowed": needed_ms - ours["matmul_floor_ms"], "other_ms_now": ours["other_ms"]}))
    torch_column = " PyTorch floor ms |" if args.torch else ""
    print(f"\n| impl | step ms | matmul GFLOP | matmul floor ms | GFLOP/s at the floor | everything else ms |{torch_column}")
    print("|---|---|---|---|---|---|" + ("---|" if args.torch else ""))
    for row in rows.values():
        torch_cell = f" {row['torch_floor_ms']:.0f} |" if args.torch else ""
        print(f"| {row['impl']} | {row['step_ms']:.0f} | {row['matmul_gflop']:.1f} | {row['matmul_floor_ms']:.0f} | "
              f"{row['matmul_gflop_per_s']:.0f} | {row['other_ms']:.0f} |{torch_cell}")
    torch_columns = " PyTorch ms | PyTorch GFLOP/s |" if args.torch else ""
    print(f"\narchlab's products (einsum of the jaxpr's dot_general):\n\n| product | shapes | per step | XLA ms | XLA GFLOP/s |{torch_columns}")
    print("|---|---|---|---|---|" + ("---|---|" if args.torch else ""))
    for p in products["archlab"]:
        torch_cells = f" {p['torch_ms']:.1f} | {p['torch_gflop_per_s']:.0f} |" if args.torch else ""
        print(f"| `{p['einsum']}` | {p['lhs']} x {p['rhs']} | {p['per_step']} | {p['xla_ms']:.1f} | {p['xla_gflop_per_s']:.0f} |{torch_cells}")
    print(f"\n{args.target}x hf_flax needs an archlab step of {needed_ms:.0f} ms: {needed_ms - ours['matmul_floor_ms']:.0f} ms "
          f"beside archlab's matmul floor for everything else, which takes {ours['other_ms']:.0f} ms now.")


if __name__ == "__main__":
    main()
