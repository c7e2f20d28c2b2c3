"""Sharding by logical axis names over a ``(data, fsdp, tensor)`` mesh (``mesh.*`` in the config).

Every parameter dimension has a logical name (``PARAM_AXES``: ``embed``, ``mlp``, ``heads``, ``vocab``,
...); ``mesh.rules`` maps each name to mesh axes, and the SPMD partitioner does the rest (MaxText's
logical axis rules, written small). Optimizer-state leaves that mirror a parameter (AdamW's ``mu`` and
``nu``) shard like it; scalars (counters) are replicated. A batch is split along its rows over the
``batch`` rule (``data`` x ``fsdp`` by default) and replicated over ``tensor``. One device is a 1x1x1
mesh, so the same code runs on a laptop and a pod.

The names live in a path table here, not as nnx sharding metadata on the layers: the layers stay free
of mesh concerns (they receive only their model config), a checkpoint's or a converted model's plain
parameter tree gets the same names, and a parameter nobody named is an error (``param_axes``), never a
silently replicated copy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from archlab.errors import ConfigError
from archlab.schema import LOGICAL_AXES, MESH_AXES, MeshConfig, default_mesh_rules

# (module, parameter) -> logical names of its dimensions. Attention projections are stored flat:
# q's output axis is heads x head_dim, head-major, so splitting it over ``heads`` keeps heads whole.
# Parameters of stacked layers (a ``blocks`` module on their path) get a leading ``layers`` axis.
_ATTENTION = {
    ("q", "kernel"): ("embed", "heads"), ("q", "bias"): ("heads",),
    ("k", "kernel"): ("embed", "kv_heads"), ("k", "bias"): ("kv_heads",),
    ("v", "kernel"): ("embed", "kv_heads"), ("v", "bias"): ("kv_heads",),
    ("o", "kernel"): ("heads", "embed"), ("o", "bias"): ("embed",),
}
_MLP = {
    ("wi", "kernel"): ("embed", "mlp"), ("wi", "bias"): ("mlp",),
    ("wi_up", "kernel"): ("embed", "mlp"), ("wi_up", "bias"): ("mlp",),
    ("wo", "kernel"): ("mlp", "embed"), ("wo", "bias"): ("embed",),
}
_EMBEDDINGS = {
    ("tokens", "embedding"): ("vocab", "embed"),
    ("positions", "embedding"): ("positions", "embed"),
    ("token_types", "embedding"): ("token_types", "embed"),
    ("relative_bias", "embedding"): ("relative_buckets", "heads"),
    ("encoder_bias", "embedding"): ("relative_buckets", "heads"),
    ("decoder_bias", "embedding"): ("relative_buckets", "heads"),
}
_HEADS = {
    ("output", "kernel"): ("embed", "vocab"), ("lm_head", "bias"): ("vocab",),
    # Square (d_model, d_model) matrices: the second ``embed`` finds its mesh axis taken (``spec``).
    ("transform", "kernel"): ("embed", "embed"), ("transform", "bias"): ("embed",),
    ("pooler", "kernel"): ("embed", "embed"), ("pooler", "bias"): ("embed",),
    # Task heads (archlab/tasks/model.py): a few classes, tags or the two span ends.
    ("classifier", "kernel"): ("embed", "classes"), ("classifier", "bias"): ("classes",),
}
PARAM_AXES: dict[tuple[str, str], tuple[str, ...]] = {**_ATTENTION, **_MLP, **_EMBEDDINGS, **_HEADS}
NORM_AXES = ("norm",)  # scale and bias of every module named *norm: small, replicated by default
BATCH_AXES = ("batch", "length")


def param_axes(path: Sequence[str], ndim: int) -> tuple[str, ...]:
    """The logical names of the parameter at ``path`` (its module path, e.g. ``layers.blocks.mlp.wi.kernel``)."""
    name = ".".join(path)
    if len(path) < 2:
        raise ValueError(f"no logical axes for parameter {name!r}: add it to archlab/train/sharding.py's PARAM_AXES")
    module, leaf = path[-2], path[-1]
    if module.endswith("norm") and leaf in ("scale", "bias"):
        names = NORM_AXES
    elif (module, leaf) in PARAM_AXES:
        names = PARAM_AXES[module, leaf]
    else:
        raise ValueError(f"no logical axes for parameter {name!r}: add it to archlab/train/sharding.py's PARAM_AXES")
    if "blocks" in path:
        names = ("layers", *names)
    if len(names) != ndim:
        raise ValueError(f"parameter {name!r} has {ndim} dimensions but PARAM_AXES names {len(names)}: {names}")
    return names


def _dict_keys(path) -> tuple[str, ...]:
    """The parameter names on a pytree path (nnx.State's dict keys; attributes such as ``.mu`` or ``.value`` dropped)."""
    return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def leaf_axes(path, leaf) -> tuple[str, ...]:
    """Logical names of one array leaf of a train state, its parameters or its optimizer state.

    A leaf whose path ends in a parameter's path shards like that parameter (AdamW's moments);
    a scalar (a step or a count) is replicated; any other leaf is an error.
    """
    ndim = len(np.shape(leaf))
    if ndim == 0:
        return ()
    keys = _dict_keys(path)
    if not keys:
        raise ValueError(f"no logical axes for state leaf {jax.tree_util.keystr(path)} of shape {np.shape(leaf)}")
    return param_axes(keys, ndim)


def named_leaves(tree: Any) -> list[tuple[str, tuple[str, ...]]]:
    """``(path, logical names)`` of every leaf of ``tree``."""
    return [(jax.tree_util.keystr(path), leaf_axes(path, leaf)) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)]


def full_rules(mesh_cfg: MeshConfig) -> dict[str, Any]:
    """``mesh.rules`` with every logical axis present (unnamed ones replicated)."""
    return {**{n: None for n in LOGICAL_AXES}, **default_mesh_rules(), **dict(mesh_cfg.rules)}


def _axes_of(rules: Mapping[str, Any], name: str) -> tuple[str, ...]:
    axes = rules.get(name)
    return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def spec(names: Sequence[str], rules: Mapping[str, Any], sizes: Mapping[str, int] | None = None) -> P:
    """The PartitionSpec of dimensions named ``names``; a mesh axis already used by an earlier
    dimension is not used again (a jax spec may name each mesh axis once). Given ``sizes``, axes of
    size 1 are left out: jit returns such an array as replicated, and the next call must see the same."""
    used: set[str] = set()
    entries = []
    for name in names:
        axes = tuple(a for a in _axes_of(rules, name) if a not in used and (sizes is None or sizes[a] > 1))
        used.update(axes)
        entries.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    while entries and entries[-1] is None:  # P(None, None) is P(): the form jit gives its outputs
        entries.pop()
    return P(*entries)


def check_divisible(tree: Any, sizes: Mapping[str, int], rules: Mapping[str, Any]) -> None:
    """Refuse, naming the parameter and the rule, a sharded dimension its mesh axes do not divide."""

    def check(path, leaf):
        shape, names = np.shape(leaf), leaf_axes(path, leaf)
        for dim, (name, axes) in enumerate(zip(names, spec(names, rules))):
            split = _product(sizes, axes)
            if shape[dim] % split:
                raise ConfigError(
                    f"{'.'.join(_dict_keys(path))} dimension {dim} ({name}, {shape[dim]}) is not divisible by "
                    f"{' x '.join(f'mesh.{a}' for a in _as_tuple(axes))} = {split} (mesh.rules.{name}); "
                    f"change the mesh or set mesh.rules.{name}=null")

    jax.tree_util.tree_map_with_path(check, tree)


def _as_tuple(axes) -> tuple[str, ...]:
    return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def _product(sizes: Mapping[str, int], axes) -> int:
    n = 1
    for a in _as_tuple(axes):
        n *= sizes[a]
    return n


def check_mesh(cfg, model_cfg=None, n_devices: int | None = None) -> dict[str, int]:
    """The mesh's axis sizes for ``cfg`` (a TrainConfig), refused in one line when they do not fit the
    batch, the head counts, (given ``model_cfg``) any sharded parameter dimension, or the devices.

    Explicit sizes are checked against the model before the device count, so a mesh meant for a
    cluster can be checked on a laptop up to its last refusal.
    """
    n_devices = jax.device_count() if n_devices is None else n_devices
    explicit = {axis: getattr(cfg.mesh, axis) for axis in MESH_AXES}
    sizes = cfg.mesh.shape(n_devices) if -1 in explicit.values() else explicit
    rules = full_rules(cfg.mesh)
    if cfg.run.members and (sizes["fsdp"] > 1 or sizes["tensor"] > 1):
        raise ConfigError("run.members packs runs on a data-parallel mesh only: keep mesh.fsdp=1 and mesh.tensor=1")
    rows = cfg.run.batch_size // cfg.optimizer.grad_accum_steps
    batch_axes = _axes_of(rules, "batch")
    split = _product(sizes, batch_axes)
    if rows % split:
        over = " x ".join(f"mesh.{a}" for a in batch_axes)
        accum = cfg.optimizer.grad_accum_steps
        micro = f" / optimizer.grad_accum_steps {accum} = {rows} rows" if accum > 1 else ""
        raise ConfigError(f"run.batch_size {cfg.run.batch_size}{micro} does not split over {over} = {split} "
                          "devices (mesh.rules.batch)")
    model = cfg.model if model_cfg is None else model_cfg
    for name, count, key in (("heads", model.n_heads, "model.n_heads"), ("kv_heads", model.kv_heads, "model.n_kv_heads")):
        axes = _axes_of(rules, name)
        if count % _product(sizes, axes):
            over = " x ".join(f"mesh.{a}" for a in axes)
            raise ConfigError(f"{key} {count} is not divisible by {over} = {_product(sizes, axes)} "
                              f"(mesh.rules.{name}); change the mesh or set mesh.rules.{name}=null")
    splits_params = any(sizes[a] > 1 for name in rules if name not in BATCH_AXES for a in _axes_of(rules, name))
    if model_cfg is not None and splits_params:
        from flax import nnx

        from archlab.nn.models import build_model

        _, params = nnx.split(nnx.eval_shape(lambda: build_model(model_cfg)))
        check_divisible(params, sizes, rules)
    return cfg.mesh.shape(n_devices)


class MeshPlan:
    """The run's mesh and its rules: where each state leaf and batch array lives.

    ``place`` puts arrays there, ``abstract`` gives the shape-only target of a checkpoint restore
    (orbax then reads each array straight into its shards, whatever mesh saved it), and the
    ``constrain_*`` methods pin a traced state or batch to the same layout inside a jitted step, so the
    step's outputs come back as its inputs went in (one compilation, buffers donated in place).
    """

    def __init__(self, mesh_cfg: MeshConfig | None = None, devices=None):
        mesh_cfg = mesh_cfg if mesh_cfg is not None else MeshConfig()
        devices = list(devices if devices is not None else jax.devices())
        self.sizes = sizes = mesh_cfg.shape(len(devices))
        self.rules = full_rules(mesh_cfg)
        shape = tuple(sizes[a] for a in MESH_AXES)
        try:
            from jax.experimental import mesh_utils

            grid = mesh_utils.create_device_mesh(shape, devices=devices)
        except (ValueError, NotImplementedError, AssertionError):  # device kinds it has no layout for
            grid = np.asarray(devices).reshape(shape)
        self.mesh = Mesh(grid, MESH_AXES)
        self.replicated = NamedSharding(self.mesh, P())

    def describe(self) -> str:
        return " x ".join(f"{a} {self.sizes[a]}" for a in MESH_AXES)

    # -- the state ---------------------------------------------------------------------------

    def shardings(self, tree: Any) -> Any:
        """A NamedSharding for every leaf of ``tree`` (a train state, parameters or optimizer state)."""
        return jax.tree_util.tree_map_with_path(
            lambda path, leaf: NamedSharding(self.mesh, spec(leaf_axes(path, leaf), self.rules, self.sizes)), tree)

    def place(self, tree: Any) -> Any:
        return jax.device_put(tree, self.shardings(tree))

    def abstract(self, tree: Any) -> Any:
        """``tree`` as ShapeDtypeStructs carrying their shardings."""
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), tree,
                            self.shardings(tree))

    def replicate(self, tree: Any) -> Any:
        return jax.device_put(tree, self.replicated)

    def constrain_state(self, tree: Any) -> Any:
        return jax.lax.with_sharding_constraint(tree, self.shardings(tree))

    # -- batches -----------------------------------------------------------------------------

    def batch_sharding(self, ndim: int, leading_axes: int = 0) -> NamedSharding:
        """Rows (after ``leading_axes`` micro-batch axes) over ``batch``'s mesh axes, positions over ``length``'s."""
        names = BATCH_AXES[: max(0, ndim - leading_axes)]
        return NamedSharding(self.mesh, P(*([None] * leading_axes), *spec(names, self.rules, self.sizes)))

    def shard_batch(self, batch: dict, leading_axes: int = 0) -> dict:
        """Split the row axis (after ``leading_axes`` micro-batch axes) across devices.

        Over several processes each holds the same host batch (the pipeline is a function of seed and
        step) and sends its own devices only the rows they hold (``train/distributed.py``).
        """
        if jax.process_count() == 1:
            return {k: jax.device_put(v, self.batch_sharding(np.ndim(v), leading_axes)) for k, v in batch.items()}
        return {k: _from_host(np.asarray(v), self.batch_sharding(np.ndim(v), leading_axes)) for k, v in batch.items()}

    def constrain_batch(self, batch: dict, leading_axes: int = 0) -> dict:
        return {k: jax.lax.with_sharding_constraint(v, self.batch_sharding(np.ndim(v), leading_axes))
                for k, v in batch.items()}


def _from_host(host: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array of ``host``'s value whose local shards are cut from ``host`` on this process."""
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def per_device_bytes(tree: Any) -> dict[int, int]:
    """Bytes each device holds of ``tree``'s arrays (their addressable shards), by device id."""
    held: dict[int, int] = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            held[shard.device.id] = held.get(shard.device.id, 0) + shard.data.nbytes
    return held
