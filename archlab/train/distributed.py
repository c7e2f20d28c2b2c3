"""A run over several processes (one per host, or one per GPU under SLURM): start-up and agreement.

JAX's multi-controller runtime runs the same program in every process; each drives its local
devices and the jitted step's collectives span them all. What archlab adds is small:

- ``initialize`` starts ``jax.distributed`` from the config (explicit coordinator keys, or SLURM's
  environment) before anything touches a device;
- every process builds the same host batch from the deterministic pipeline, a function of (seed,
  step), and hands its own devices only their rows (``MeshPlan.shard_batch``), so the global batch,
  and so the losses, equal a single process's on the same mesh;
- only process 0 writes the run directory, the logs and W&B (``is_primary``); the others wait at
  ``barrier`` where they would read what it wrote;
- a decision read from disk (which step to save or restore) is process 0's (``agree``), so no process
  takes a collective path the others skip: a step one process skipped would hang the rest;
- ``host_arrays`` gives every process a sharded array's full value (the checkpoint checksums).

Collectives outside the jitted step are each one program (``host_arrays``, the checkpoint's finite
check): op-by-op work on sharded arrays, a program per leaf, was seen to leave the processes of a
CPU run waiting in different collectives.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from archlab.errors import ConfigError
from archlab.schema import DistributedConfig

log = logging.getLogger(__name__)

# Inside a SLURM job step (srun): what jax's own SLURM detection reads.
SLURM_VARIABLES = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")

_started: dict[str, Any] = {}  # what initialize started in this process (jax allows one start)


def in_slurm_step() -> bool:
    """Whether this process is one task of a SLURM job step of more than one task."""
    return all(v in os.environ for v in SLURM_VARIABLES) and int(os.environ["SLURM_NTASKS"]) > 1


def launch_mode(cfg: DistributedConfig) -> str:
    """``explicit``, ``slurm`` or ``single``: how this process joins its run."""
    if cfg.cluster == "none":
        return "single"
    if cfg.coordinator_address is not None:
        return "explicit" if cfg.num_processes > 1 else "single"
    if cfg.cluster == "slurm":
        if not all(v in os.environ for v in SLURM_VARIABLES):
            absent = next(v for v in SLURM_VARIABLES if v not in os.environ)
            raise ConfigError(f"distributed.cluster=slurm but {absent} is not set: run archlab-train inside a SLURM "
                              "job step (srun, or -m hydra/launcher=slurm_multinode)")
        return "slurm"
    return "slurm" if in_slurm_step() else "single"


def check_launch(cfg) -> None:
    """Refuse, before any process joins, what a ``TrainConfig`` cannot do over several processes."""
    if launch_mode(cfg.distributed) == "single":
        return
    for key, value in (("run.members", cfg.run.members), ("run.branches", cfg.run.branches)):
        if value:
            raise ConfigError(f"{key} runs in one process (its members or branches train one after another "
                              "on its devices); launch it without distributed.* and outside a multi-task srun")


def initialize(cfg: DistributedConfig) -> None:
    """Join the run's processes (``jax.distributed.initialize``), once per process; alone, do nothing.

    Must run before anything asks JAX for its devices: the runtime cannot be started afterwards.
    """
    mode = launch_mode(cfg)
    if mode == "single" or _started:
        if _started and mode != "single" and _started["mode"] != mode:
            raise ConfigError(f"this process already joined a run ({_started['mode']}); it cannot join another")
        return
    import jax

    # CPU devices of different processes talk through gloo (XLA's CPU client has no other
    # cross-process collectives); GPUs and TPUs use their own (NCCL, ICI) whatever this says.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if mode == "explicit":
        jax.distributed.initialize(cfg.coordinator_address, cfg.num_processes, cfg.process_id,
                                   initialization_timeout=cfg.initialization_timeout)
    else:  # one process per task; jax reads the rank, the count and the coordinator node from SLURM
        jax.distributed.initialize(cluster_detection_method="slurm", initialization_timeout=cfg.initialization_timeout)
    _started["mode"] = mode
    if jax.process_index() != 0:  # process 0 tells the run's story; the others speak up only to warn
        logging.getLogger("archlab").setLevel(logging.WARNING)
    log.info("process %d of %d joined the run (%s): %d local devices of %d", jax.process_index(),
             jax.process_count(), mode, jax.local_device_count(), jax.device_count())


def is_primary() -> bool:
    """Whether this process writes the run directory, the logs and W&B (process 0)."""
    import jax

    return jax.process_index() == 0


def multi_process() -> bool:
    import jax

    return jax.process_count() > 1


def barrier(name: str) -> None:
    """Every process waits here until all have arrived (a no-op alone)."""
    if multi_process():
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"archlab:{name}")


def agree(value: int) -> int:
    """Process 0's ``value`` (an int: a step, a flag) in every process."""
    if not multi_process():
        return value
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.asarray(value, np.int64)))


def agree_any(flag: bool) -> bool:
    """Whether ``flag`` holds in any process."""
    if not multi_process():
        return flag
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag, np.int32))))


def check_same(value: str, what: str) -> None:
    """Refuse a run whose processes hold different ``value`` (a digest of what each built alone)."""
    if not multi_process():
        return
    from jax.experimental import multihost_utils

    codes = np.frombuffer(value.encode().ljust(64, b"\0")[:64], np.uint8)
    gathered = np.asarray(multihost_utils.process_allgather(codes))  # (processes, 64)
    if differ := [i for i, row in enumerate(gathered) if not np.array_equal(row, gathered[0])]:
        raise ConfigError(f"process {differ[0]} built a different {what} from process 0's; every process must "
                          "read the same data and config (a shared file system, the same data.cache_dir)")


def host_arrays(arrays: list) -> list[np.ndarray]:
    """Full host copies of ``arrays``: one transfer when this process holds them whole, else one program
    that replicates the rest onto every device (a collective: every process calls it with the same
    arrays; one program, not one per array, so the processes cannot meet in different collectives)."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    spread = [i for i, a in enumerate(arrays) if not getattr(a, "is_fully_addressable", True)]
    host = [None if i in spread else a for i, a in enumerate(arrays)]
    if spread:
        everywhere = [NamedSharding(arrays[i].sharding.mesh, PartitionSpec()) for i in spread]
        gathered = jax.jit(lambda xs: xs, out_shardings=everywhere)([arrays[i] for i in spread])
        for i, whole in zip(spread, gathered):
            host[i] = whole.addressable_data(0)
    return [np.asarray(x) for x in jax.device_get(host)]
