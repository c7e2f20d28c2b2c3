"""A lower-bound estimate of a run's training memory, checked against the device before anything is built.

The estimate counts what training cannot avoid holding at once: float32 parameters, their
gradients and Adam's two moments (16 bytes per parameter, per packed member) and, for one
micro-batch, what even a fully rematerialised backward pass keeps: every layer's input (the
residual stream), one layer's MLP hidden and attention probabilities, and the logits. XLA fuses
and frees the rest, so real use is higher (tests/test_memory.py compares with the compiled step's
own accounting): a run refused by this cannot fit; one that passes may still run out.
"""

from __future__ import annotations

import os

from archlab.errors import ConfigError
from archlab.schema import TrainConfig

BYTES = 4  # float32 parameters, optimizer state and (at least) float32 activations on the CPU
GIB = 2**30


def device_memory_bytes() -> tuple[int, str]:
    """(bytes, what) of the first JAX device: its allocator limit on an accelerator, else the host's RAM."""
    import jax

    device = jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"{device.device_kind} memory"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "host memory"


def micro_batch_rows(cfg: TrainConfig) -> int:
    return cfg.run.batch_size // cfg.optimizer.grad_accum_steps


def estimate_bytes(cfg: TrainConfig, plan) -> dict[str, int]:
    """Lower bounds, in bytes, of the state and of one micro-batch's activations."""
    m = plan.model
    members = max(1, len(cfg.run.members))
    rows = micro_batch_rows(cfg)
    length = cfg.data.seq_len
    layers = m.n_layers + (m.decoder_layers if m.family == "encoder_decoder" else 0)
    per_position = layers * m.d_model + m.d_ff + m.n_heads * length + m.vocab_size
    activations = rows * length * per_position * BYTES
    return {"state": 4 * plan.params.total * BYTES * members, "activations": activations * members}


def check_memory(cfg: TrainConfig, plan) -> None:
    """Refuse, in one line with its numbers, a run whose lower-bound memory exceeds the device's."""
    need = estimate_bytes(cfg, plan)
    have, what = device_memory_bytes()
    if what != "host memory":  # an accelerator holds its shard of the state and of the batch (mesh.*)
        mesh = cfg.mesh
        need = {"state": need["state"] // max(1, mesh.fsdp * mesh.tensor),
                "activations": need["activations"] // max(1, mesh.data * mesh.fsdp)}
    total = sum(need.values())
    if total > have:
        raise ConfigError(
            f"this run needs at least {total / GIB:,.1f} GiB ({need['state'] / GIB:,.1f} GiB of parameters, "
            f"gradients and Adam moments for {plan.params.total:,} parameters; {need['activations'] / GIB:,.1f} GiB "
            f"of activations for {micro_batch_rows(cfg)} rows of "
            f"{cfg.data.seq_len}) but the {what} is {have / GIB:,.1f} GiB: use a smaller model, a smaller "
            "run.batch_size or data.seq_len, or optimizer.grad_accum_steps"
        )
