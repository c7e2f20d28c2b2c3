"""Data parallelism over a ``(data, fsdp, tensor)`` mesh of all local devices.

Parameters are replicated; the batch is split along its row axis over ``data`` x
``fsdp``. One device is a 1x1x1 mesh, so the same code runs on a laptop and a pod.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")


class Mesh1D:
    """All local devices on the ``data`` axis."""

    def __init__(self, devices=None) -> None:
        devices = np.asarray(devices if devices is not None else jax.devices())
        self.mesh = Mesh(devices.reshape(-1, 1, 1), MESH_AXES)
        self.replicated = NamedSharding(self.mesh, P())

    def replicate(self, tree):
        return jax.device_put(tree, self.replicated)

    def shard_batch(self, batch: dict, leading_axes: int = 0) -> dict:
        """Split the row axis (after ``leading_axes`` micro-batch axes) across devices."""
        spec = P(*([None] * leading_axes), ("data", "fsdp"))
        sharding = NamedSharding(self.mesh, spec)
        return {key: jax.device_put(value, sharding) for key, value in batch.items()}
