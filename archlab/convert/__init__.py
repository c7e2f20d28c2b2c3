"""Hugging Face model directories <-> archlab models, for GPT-2, BERT and T5.

``load_hf`` reads a local directory (``config.json`` + ``model.safetensors``, or
``pytorch_model.bin``) into a ``(ModelConfig, model)`` pair; ``save_hf`` writes one that
``transformers`` opens with ``from_pretrained``. Each family's mapping is one table of
rules in its own module (``gpt2.py``, ``bert.py``, ``t5.py``), run both ways by the pure
numpy functions ``from_hf`` / ``to_hf`` there.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

from flax import nnx

from archlab.config import ModelConfig
from archlab.convert import bert, gpt2, t5
from archlab.convert.common import (
    check_params, model_from_params, model_params, read_config, read_weights, write_hf_dir,
)
from archlab.errors import ConfigError, ConversionError
from archlab.tokens import SPECIAL

Params = dict[str, Any]
SPECIAL_TOKEN_IDS = {"pad_token_id": SPECIAL.pad, "bos_token_id": SPECIAL.bos, "eos_token_id": SPECIAL.eos}

__all__ = ["load_hf", "read_hf", "hf_params", "save_hf", "hf_config_for", "model_params", "model_from_params", "FAMILIES"]

# Hugging Face model_type -> its mapping module; each module also names the archlab family it builds.
FAMILIES: dict[str, ModuleType] = {module.MODEL_TYPE: module for module in (gpt2, bert, t5)}
_BY_ARCHLAB_FAMILY = {module.FAMILY: module for module in FAMILIES.values()}


def load_hf(model_dir: str | Path, **config_overrides: Any) -> tuple[ModelConfig, nnx.Module]:
    """The archlab config and model holding a local Hugging Face GPT-2, BERT or T5 directory's weights.

    ``config_overrides`` set ModelConfig fields that do not change the parameter tree
    (``dtype``, ``attention_kernel``, ``scan_layers``, ``max_seq_len`` for T5, ...).
    """
    model_dir = Path(model_dir)
    cfg, tensors = read_hf(model_dir, **config_overrides)
    params = hf_params(model_dir, tensors, cfg)
    return cfg, model_from_params(cfg, params, str(model_dir))


def read_hf(model_dir: str | Path, **config_overrides: Any) -> tuple[ModelConfig, Params]:
    """The archlab config a Hugging Face directory describes, and its tensors as stored (names are Hugging Face's)."""
    model_dir = Path(model_dir)
    hf_config = read_config(model_dir)
    family = _family_of(model_dir, hf_config)
    tensors = read_weights(model_dir)
    try:
        cfg = ModelConfig(**{**family.config_from_hf(hf_config, tensors, str(model_dir)), **config_overrides})
    except (ConfigError, TypeError) as err:
        given = f" with overrides {config_overrides}" if config_overrides else ""
        raise ConversionError(f"{model_dir}{given} gives no valid archlab config: {err}") from err
    return cfg, tensors


def hf_params(model_dir: str | Path, tensors: Params, cfg: ModelConfig) -> Params:
    """``read_hf``'s tensors as the flat archlab parameters of ``cfg`` (a config that builds the same tree)."""
    return _BY_ARCHLAB_FAMILY[cfg.family].from_hf(tensors, cfg, str(model_dir))


def _family_of(model_dir: Path, hf_config: dict) -> ModuleType:
    model_type = hf_config.get("model_type")
    if model_type not in FAMILIES:
        raise ConversionError(
            f"{model_dir} holds a model of type {model_type!r}; archlab converts only {', '.join(map(repr, FAMILIES))}"
        )
    return FAMILIES[model_type]


def save_hf(model: nnx.Module, cfg: ModelConfig, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (float32) that ``transformers`` loads.

    decoder_only -> ``GPT2LMHeadModel``, encoder_only -> ``BertForMaskedLM`` (with the
    pooler's weights, which ``BertModel`` reads), encoder_decoder -> ``T5ForConditionalGeneration``.
    Raises ConversionError for a config that architecture cannot express, and for a
    non-empty ``out_dir`` unless ``overwrite``.
    """
    family = _BY_ARCHLAB_FAMILY[cfg.family]
    hf_config = hf_config_for(cfg)
    params = model_params(model)
    check_params(cfg, params, "save_hf: the model")
    tensors = family.to_hf(params, cfg)
    return write_hf_dir(Path(out_dir), hf_config, tensors, overwrite)


def hf_config_for(cfg: ModelConfig) -> dict:
    """The ``config.json`` ``save_hf`` writes for ``cfg``; ConversionError if the Hugging Face class cannot
    express it (checked before anything is written)."""
    # archlab's fixed special-token layout (archlab/tokens.py), so generation and padding in
    # transformers use the ids the model was trained with, not GPT-2's 50256.
    return {**_BY_ARCHLAB_FAMILY[cfg.family].config_to_hf(cfg), **SPECIAL_TOKEN_IDS}
