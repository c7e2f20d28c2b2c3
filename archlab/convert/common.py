"""What every family's conversion shares: the rule table, weight files, and the param tree.

A family's mapping is one table of ``Rule``s: an archlab parameter path, the Hugging Face
tensor it comes from, and how the layout differs. The same table runs both ways.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from archlab.config import ModelConfig
from archlab.errors import ConversionError
from archlab.nn.models import build_model

log = logging.getLogger(__name__)

Params = dict[str, np.ndarray]

# Hugging Face activation names (ACT2FN keys) for the plain, ungated MLP.
ACTIVATION_FROM_HF = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
ACTIVATION_TO_HF = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}


@dataclass(frozen=True)
class Rule:
    """One archlab parameter <-> one Hugging Face tensor (or a slice of a fused one).

    ``hf`` may hold ``{i}``: the tensor exists once per layer and the archlab array stacks
    them on a leading axis of length ``layers``. Alternatives name tied copies of one
    tensor: any may be read, the first is written. ``transpose`` converts torch's
    ``Linear`` ``[out, in]`` to archlab's ``[in, out]``. ``part=(index, count)`` takes
    one of ``count`` equal slices of the last Hugging Face axis (GPT-2's fused q|k|v).
    """

    archlab: str
    hf: tuple[str, ...]
    transpose: bool = False
    part: tuple[int, int] | None = None
    layers: int = 0

    def hf_names(self, layer: int | None) -> list[str]:
        return [name.format(i=layer) for name in self.hf]


def rule(archlab: str, *hf: str, transpose: bool = False, part: tuple[int, int] | None = None) -> Rule:
    return Rule(archlab, hf, transpose, part)


def dense(archlab: str, hf: str, *, transpose: bool = True, bias: bool = True) -> list[Rule]:
    """A projection: ``kernel`` <- ``weight`` (torch ``Linear`` by default: transposed), ``bias`` <- ``bias``."""
    rules = [rule(f"{archlab}.kernel", f"{hf}.weight", transpose=transpose)]
    return rules + [rule(f"{archlab}.bias", f"{hf}.bias")] if bias else rules


def norm(archlab: str, hf: str, *, bias: bool = True) -> list[Rule]:
    """A LayerNorm / RMSNorm: ``scale`` <- ``weight``, ``bias`` <- ``bias``."""
    rules = [rule(f"{archlab}.scale", f"{hf}.weight")]
    return rules + [rule(f"{archlab}.bias", f"{hf}.bias")] if bias else rules


def stacked(n_layers: int, archlab_prefix: str, hf_prefix: str, rules: Iterable[Rule]) -> list[Rule]:
    """Per-layer rules under a stack: ``archlab_prefix.<path>`` <- ``hf_prefix.<name>`` for each layer."""
    return [
        Rule(f"{archlab_prefix}.{r.archlab}", tuple(f"{hf_prefix}.{h}" for h in r.hf), r.transpose, r.part, n_layers)
        for r in rules
    ]


def _read_one(tensors: Mapping[str, np.ndarray], r: Rule, layer: int | None, used: set[str]) -> np.ndarray | None:
    present = [name for name in r.hf_names(layer) if name in tensors]
    if not present:
        return None
    used.update(present)  # tied copies count as read
    x = np.asarray(tensors[present[0]]).astype(np.float32)
    if r.part is not None:
        index, count = r.part
        x = np.split(x, count, axis=-1)[index]
    return x.T if r.transpose else x


def hf_to_params(tensors: Mapping[str, np.ndarray], rules: list[Rule], where: str) -> tuple[Params, set[str]]:
    """Archlab flat params (``"a.b.kernel" -> array``) and the Hugging Face names consumed."""
    params: Params = {}
    used: set[str] = set()
    for r in rules:
        layers = [None] if not r.layers else range(r.layers)
        arrays = [_read_one(tensors, r, layer, used) for layer in layers]
        for layer, array in zip(layers, arrays):
            if array is None:
                raise ConversionError(
                    f"{where} has no tensor {' or '.join(r.hf_names(layer))} (needed for archlab {r.archlab})"
                )
        params[r.archlab] = np.stack(arrays) if r.layers else arrays[0]
    return params, used


def params_to_hf(params: Mapping[str, np.ndarray], rules: list[Rule]) -> Params:
    """The inverse of ``hf_to_params``: Hugging Face names -> contiguous float32 arrays."""
    tensors: Params = {}
    parts: dict[str, dict[int, np.ndarray]] = {}
    for r in rules:
        if r.archlab not in params:
            raise ConversionError(f"the model has no parameter {r.archlab}; does the config match the model?")
        value = np.asarray(params[r.archlab], np.float32)
        for layer in [None] if not r.layers else range(r.layers):
            x = value if layer is None else value[layer]
            x = x.T if r.transpose else x
            name = r.hf_names(layer)[0]
            if r.part is None:
                tensors[name] = np.ascontiguousarray(x)
            else:
                parts.setdefault(name, {})[r.part[0]] = x
    for name, pieces in parts.items():
        tensors[name] = np.ascontiguousarray(np.concatenate([pieces[k] for k in sorted(pieces)], axis=-1))
    return tensors


def strip_prefix(tensors: Mapping[str, np.ndarray], prefix: str) -> Params:
    """Base-model names without the task model's prefix (``transformer.``, ``bert.``), if present."""
    return {name.removeprefix(prefix): value for name, value in tensors.items()}


def add_prefix(tensors: Mapping[str, np.ndarray], prefix: str, head_prefixes: tuple[str, ...]) -> Params:
    """The task model's names: the base model under ``prefix``, its heads as they are."""
    return {
        (name if name.startswith(head_prefixes) else prefix + name): value for name, value in tensors.items()
    }


def warn_unused(tensors: Mapping[str, np.ndarray], used: set[str], ignored: tuple[str, ...], where: str) -> None:
    """Say which checkpoint tensors archlab has no place for (task heads, for instance)."""
    unused = sorted(n for n in tensors if n not in used and not any(part in n for part in ignored))
    if unused:
        log.warning("%s: %d tensors have no archlab counterpart and were skipped: %s",
                    where, len(unused), ", ".join(unused[:8]) + (" ..." if len(unused) > 8 else ""))


# ---- weight files ---------------------------------------------------------------------------

def read_config(model_dir: Path) -> dict:
    if not model_dir.is_dir():
        raise ConversionError(f"{model_dir} is not a directory; load_hf needs a local Hugging Face model directory")
    path = model_dir / "config.json"
    if not path.is_file():
        raise ConversionError(f"{model_dir} has no config.json, so it is not a Hugging Face model directory")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConversionError(f"{path} is not valid JSON ({err})") from err


def read_weights(model_dir: Path) -> Params:
    """All tensors of ``model.safetensors`` (single or sharded), else ``pytorch_model.bin``."""
    single, index = model_dir / "model.safetensors", model_dir / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        files = sorted({model_dir / name for name in json.loads(index.read_text())["weight_map"].values()})
    elif (model_dir / "pytorch_model.bin").is_file():
        return _read_torch(model_dir / "pytorch_model.bin")
    else:
        raise ConversionError(f"{model_dir} has no model.safetensors or pytorch_model.bin to read weights from")
    from safetensors.numpy import load_file

    tensors: Params = {}
    for path in files:
        tensors.update(load_file(path))
    return tensors


def _read_torch(path: Path) -> Params:
    try:
        import torch
    except ImportError as err:
        raise ConversionError(f"{path} is a PyTorch pickle and reading it needs torch, which is not installed") from err
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {name: t.float().numpy() if t.is_floating_point() else t.numpy() for name, t in state.items()}


def write_hf_dir(out_dir: Path, hf_config: dict, tensors: Params, overwrite: bool) -> Path:
    """Write ``config.json`` and ``model.safetensors``; an existing non-empty directory needs ``overwrite``."""
    from safetensors.numpy import save_file

    if out_dir.exists() and not out_dir.is_dir():
        raise ConversionError(f"{out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ConversionError(f"{out_dir} is not empty; pass overwrite=True to replace its config.json and weights")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    return out_dir


# ---- the archlab parameter tree ---------------------------------------------------------------

def model_params(model: nnx.Module) -> Params:
    """Every parameter as ``"dotted.path" -> numpy array`` (stacked layers keep their leading axis)."""
    return {
        ".".join(map(str, path)): np.asarray(var[...])
        for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }


def check_params(cfg: ModelConfig, params: Mapping[str, np.ndarray], where: str):
    """Raise unless ``params`` are exactly the parameter tree ``cfg`` builds; returns ``(graphdef, flat)``."""
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: build_model(cfg)))
    flat = list(nnx.to_flat_state(abstract))
    names = set()
    for path, var in flat:
        name = ".".join(map(str, path))
        names.add(name)
        if name not in params:
            raise ConversionError(f"{where}: nothing maps to archlab parameter {name}")
        if tuple(params[name].shape) != tuple(var.shape):
            raise ConversionError(
                f"{where}: {name} has shape {tuple(params[name].shape)} but the config implies {tuple(var.shape)}"
            )
    extra = sorted(set(params) - names)
    if extra:
        raise ConversionError(f"{where}: the config builds no parameter for {', '.join(extra)}")
    return graphdef, flat


def model_from_params(cfg: ModelConfig, params: Mapping[str, np.ndarray], where: str = "params") -> nnx.Module:
    """The model of ``cfg`` holding exactly ``params``; nothing is randomly initialised."""
    graphdef, flat = check_params(cfg, params, where)
    filled = [(path, var.replace(jnp.asarray(params[".".join(map(str, path))], var.dtype))) for path, var in flat]
    return nnx.merge(graphdef, nnx.from_flat_state(filled))


def refuse_inexpressible(architecture: str, checks: list[tuple[bool, str]]) -> None:
    """Raise for the first ``(cannot_express, what)`` that holds, naming the Hugging Face class."""
    for cannot, what in checks:
        if cannot:
            raise ConversionError(f"{architecture} cannot express this archlab model: {what}")

