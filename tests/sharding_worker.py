"""Run by tests/test_sharding.py in a subprocess: N CPU devices must be set before JAX is imported.

``python tests/sharding_worker.py DEVICES CACHE_DIR CASE...`` where a CASE is
``family:mesh-overrides`` (``decoder_only:mesh.fsdp=4,mesh.data=2``; ``-`` for the default mesh).
Prints one JSON line per case: the 5 training losses, the mesh, and each device's bytes of
parameters and optimizer state as its addressable shards hold them, with the expected split.
A case ``checkpoint:FROM:TO`` saves a state sharded on mesh FROM and restores it onto mesh TO.
"""

from __future__ import annotations

import json
import os
import sys

os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={sys.argv[1]}"
os.environ.setdefault("WANDB_SILENT", "true")

FAMILIES = {
    "decoder_only": [],
    "encoder_only": ["model=encoder_only", "objective=mlm"],
    "encoder_decoder": ["model=encoder_decoder", "objective=span_corruption"],
}
TINY = ["size=nano", "data.seq_len=32", "data.vocab_size=512", "run.batch_size=8", "run.steps=5",
        "logger=none", "run.progress=false"]


def overrides(family: str, mesh: str, cache_dir: str) -> list[str]:
    extra = [] if mesh == "-" else mesh.split(",")
    return [*TINY, *FAMILIES[family], f"data.cache_dir={cache_dir}", *extra]


def layout(tree, mesh) -> dict:
    """Bytes per device, and the bytes each leaf should put on a device by its spec."""
    import jax
    import numpy as np

    from archlab.train.sharding import per_device_bytes

    expected = 0.0
    fully_split = {"bytes": 0, "ok": True}
    replicated = 0
    shardings = mesh.shardings(tree)
    for leaf, sharding in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
        split = int(np.prod([mesh.sizes[a] for entry in sharding.spec if entry is not None
                             for a in ((entry,) if isinstance(entry, str) else entry)]))
        expected += leaf.nbytes / split
        if split == 1:
            replicated += leaf.nbytes
        if split == mesh.sizes["fsdp"] * mesh.sizes["tensor"] > 1:
            fully_split["bytes"] += leaf.nbytes
            fully_split["ok"] &= all(s.data.nbytes * split == leaf.nbytes for s in leaf.addressable_shards)
        if not leaf.sharding.is_equivalent_to(sharding, leaf.ndim):
            raise AssertionError(f"a leaf of shape {leaf.shape} is laid out {leaf.sharding}, not {sharding}")
    total = sum(leaf.nbytes for leaf in jax.tree.leaves(tree))
    return {"total": total, "per_device": sorted(per_device_bytes(tree).values()), "expected": expected,
            "replicated": replicated, "fully_split": fully_split}


def train_case(family: str, mesh: str, cache_dir: str, corpora: dict) -> dict:
    from archlab.trainer import Trainer, compose

    trainer = Trainer(compose(overrides(family, mesh, cache_dir)), corpus=corpora.get(family))
    corpora[family] = trainer.corpus
    batches = trainer.iterator()
    before = trainer.train_step._cache_size()
    losses = [float(trainer.step(next(batches))["loss"]) for _ in range(5)]
    return {"case": f"{family}:{mesh}", "losses": losses, "mesh": trainer.mesh.sizes,
            "compiled": trainer.train_step._cache_size() - before,
            "params": layout(trainer.state.params, trainer.mesh),
            "opt_state": layout(trainer.state.opt_state, trainer.mesh),
            "recorded_mesh": {k: getattr(trainer.cfg.mesh, k) for k in ("data", "fsdp", "tensor")}}


def checkpoint_case(source: str, target: str, cache_dir: str, corpora: dict) -> dict:
    """Save a state laid out on mesh ``source``; restore it onto ``target`` (orbax reshards)."""
    import tempfile

    import jax
    import numpy as np

    from archlab.train.checkpoint import Checkpointer
    from archlab.train.sharding import per_device_bytes
    from archlab.train.state import to_checkpoint
    from archlab.trainer import Trainer, compose

    family = "decoder_only"
    saver = Trainer(compose(overrides(family, source, cache_dir)), corpus=corpora.get(family))
    corpora[family] = saver.corpus
    with tempfile.TemporaryDirectory() as tmp:
        with Checkpointer(f"{tmp}/checkpoints", async_save=False) as checkpoints:
            checkpoints.save(0, to_checkpoint(saver.state), data=saver.iterator().get_state(), meta={})
        reader = Trainer(compose(overrides(family, target, cache_dir)), corpus=saver.corpus)
        reader.load(Checkpointer(f"{tmp}/checkpoints", async_save=False), 0)
    same = all(np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(jax.tree.leaves(saver.state), jax.tree.leaves(reader.state)))
    laid_out = all(a.sharding.is_equivalent_to(s, a.ndim) for a, s in zip(jax.tree.leaves(reader.state),
                                                    jax.tree.leaves(reader.mesh.shardings(reader.state))))
    return {"case": f"checkpoint:{source}:{target}", "same_values": same, "target_shardings": laid_out,
            "per_device": sorted(per_device_bytes(reader.state.params).values())}


def main() -> None:
    cache_dir, cases = sys.argv[2], sys.argv[3:]
    corpora: dict = {}
    for case in cases:
        kind, *rest = case.split(":")
        if kind == "checkpoint":
            result = checkpoint_case(rest[0], rest[1], cache_dir, corpora)
        else:
            result = train_case(kind, rest[0], cache_dir, corpora)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
