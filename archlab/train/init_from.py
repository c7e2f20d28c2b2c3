"""``model.init_from``: start a run from weights trained elsewhere (continued pre-training, fine-tuning).

The source is a Hugging Face directory (``config.json`` + weights, as ``archlab-export`` writes or
``transformers`` saves) or an archlab run: its directory, its ``checkpoints/`` or one step directory
(default: the newest step that verifies). Only the parameters are taken: the optimizer state, the
step and the data position start fresh, so the run is a new run whose recorded config names its source.

The run's own config must build the source's architecture: every setting that changes what the
network computes (shapes, norms, activation, positions, ...) is compared with the source's, and a
difference is refused in one line listing the overrides that would match. Settings that only
change how it is computed (``dtype``, ``attention_kernel``, ``remat``, ...) are the run's own. The
tokenizer is the source's (its ``tokenizer.json``), since token ids mean nothing with another one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from archlab.config import ModelConfig
from archlab.errors import CheckpointError, ConfigError, ConversionError

# How the network is computed, not what it computes: the run may set these freely.
RUNTIME_FIELDS = frozenset({
    "dtype", "attention_kernel", "kv_cache_dtype", "scan_layers", "remat", "fuse_qkv", "causal_blocks",
    "head_chunk", "logits_pad_multiple", "init_std", "pooling", "init_from",
    "embedding_dropout", "attention_dropout", "residual_dropout",  # training's noise, not the function
})
# Compared through the value they resolve to (None means "the same as ...").
_DERIVED = {"n_kv_heads": "kv_heads", "head_dim": "dim_per_head", "n_decoder_layers": "decoder_layers"}


@dataclass(frozen=True)
class Source:
    """Where the weights come from: ``kind`` is ``"hf"`` or ``"archlab"``."""

    path: Path
    kind: str
    model: ModelConfig  # the architecture it holds, at its real vocabulary
    tokenizer_file: Path | None
    step: int | None = None  # archlab: the step asked for (None: the newest that verifies)
    # A foreign tokenizer renumbered into archlab's layout (data/foreign.py): each new id's old id, -1 if added.
    new_to_old: np.ndarray | None = None
    # hf: the weights as stored, read once (its config needs them too: BERT's pooler is seen in them).
    tensors: dict[str, np.ndarray] | None = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def architecture(self) -> ModelConfig:
        """The network the run builds from it: the source's, at the renumbered vocabulary."""
        if self.new_to_old is None:
            return self.model
        return dataclasses.replace(self.model, vocab_size=len(self.new_to_old))


def find_source(init_from: str) -> Source:
    """The source ``model.init_from`` names; reads only configs (nothing is restored or compiled)."""
    path = Path(init_from).expanduser()
    if not path.exists():
        raise ConfigError(f"model.init_from={init_from}: no such file or directory")
    from archlab.train.run_dir import CONFIG_FILE, TOKENIZER_FILE

    if (path / "config.json").is_file() and not (path / CONFIG_FILE).is_file():
        from archlab.convert import read_hf

        try:
            model, tensors = read_hf(path)
        except ConversionError as error:
            raise ConfigError(f"model.init_from={init_from}: {error}") from None
        tokenizer = path / TOKENIZER_FILE
        return Source(path, "hf", model, tokenizer if tokenizer.is_file() else None, tensors=tensors)
    from archlab.evaluate import find_one_run, find_runs
    from archlab.train.setup import make_plan
    from archlab.trainer import load_run_config

    try:
        find_runs(path)
    except CheckpointError as error:
        raise ConfigError(
            f"model.init_from={init_from} is neither a Hugging Face directory (config.json) nor an archlab run ({error})"
        ) from None
    run_dir, step = find_one_run(init_from, key="model.init_from", reader="a run")
    tokenizer = run_dir / TOKENIZER_FILE
    if not tokenizer.is_file():
        raise ConfigError(f"model.init_from={init_from}: the run has no {TOKENIZER_FILE}")
    from archlab.data import Tokenizer

    cfg = load_run_config(run_dir)
    model = make_plan(cfg, Tokenizer.from_file(tokenizer).vocab_size).model
    return Source(run_dir, "archlab", model, tokenizer, step)


def _value(cfg: ModelConfig, name: str) -> Any:
    return getattr(cfg, _DERIVED.get(name, name))


def architecture_differences(run: ModelConfig, source: ModelConfig) -> list[tuple[str, Any, Any]]:
    """``(field, source value, run value)`` for every architecture setting where the two differ."""
    differences = []
    for field in dataclasses.fields(ModelConfig):
        name = field.name
        if name in RUNTIME_FIELDS:
            continue
        if name == "max_seq_len" and source.position != "learned":
            continue  # no position table: the length is the run's choice
        wanted, have = _value(source, name), _value(run, name)
        if wanted != have:
            differences.append((name, wanted, have))
    return differences


def check_source(source: Source, run_model: ModelConfig, tokenizer_file: str | None) -> None:
    """Refuse a run whose config does not build the source's network, or that names another tokenizer."""
    differences = architecture_differences(run_model, source.architecture)
    if differences:
        overrides = " ".join(f"model.{name}={_override_text(wanted)}" for name, wanted, _ in differences)
        have = ", ".join(f"{name}={have}" for name, _, have in differences)
        raise ConfigError(
            f"model.init_from={source.path} holds a different architecture (this run has {have}); "
            f"to build the source's network add: {overrides}"
        )
    if tokenizer_file is not None and source.tokenizer_file is not None:
        if Path(tokenizer_file).expanduser().read_bytes() != source.tokenizer_file.read_bytes():
            raise ConfigError(
                f"data.tokenizer_file={tokenizer_file} is not the tokenizer of model.init_from={source.path} "
                f"({source.tokenizer_file}); token ids would not mean what the weights learnt"
            )


def _override_text(value: Any) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def source_tokenizer(source: Source, tokenizer_file: str | None) -> str | Path:
    """The tokenizer a run started from ``source`` reads text with."""
    if source.tokenizer_file is not None:
        return source.tokenizer_file
    if tokenizer_file is not None:
        return tokenizer_file
    raise ConfigError(
        f"model.init_from={source.path} has no tokenizer.json; name the tokenizer its weights were trained "
        "with as data.tokenizer_file=<tokenizer.json>"
    )


def source_params(source: Source, run_model: ModelConfig) -> dict[str, Any]:
    """The source's parameters, flat (``"dotted.path" -> array``), in the tree ``run_model`` builds."""
    if source.kind == "hf":
        from archlab.convert import hf_params

        params = hf_params(source.path, source.tensors, dataclasses.replace(run_model, vocab_size=source.model.vocab_size))
        return params if source.new_to_old is None else renumber_vocabulary(params, source.new_to_old)
    from archlab.convert import model_params
    from archlab.trainer import Trainer

    trainer = Trainer.restore(source.path, source.step)
    return model_params(trainer.model)


# The parameters indexed by token id, and which of their axes is the vocabulary.
VOCABULARY_AXES = {"embed.tokens.embedding": 0, "lm_head.output.kernel": 1, "lm_head.bias": 0}


def renumber_vocabulary(params: dict[str, Any], new_to_old: np.ndarray) -> dict[str, Any]:
    """Rows (columns) of the token-indexed parameters in the renumbered order; a token the renumbering
    added starts at the mean of the others (closer to what the model predicts than a random row)."""
    out = dict(params)
    added = new_to_old < 0
    for name, axis in VOCABULARY_AXES.items():
        if name not in params:
            continue
        values = np.asarray(params[name])
        taken = np.take(values, np.where(added, 0, new_to_old), axis=axis)
        mean = values.mean(axis=axis, keepdims=True)
        shape = [1] * values.ndim
        shape[axis] = len(new_to_old)
        out[name] = np.where(added.reshape(shape), mean, taken).astype(values.dtype)
    return out
