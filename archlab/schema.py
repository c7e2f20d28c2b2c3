"""Hydra schemas for the train and eval apps, registered in the ConfigStore.

YAML under ``conf/`` is merged onto these dataclasses, so an unknown key or a wrong type
fails at composition; ``OmegaConf.to_object`` then runs each ``__post_init__``, which
refuses values that cannot work together before anything is compiled or written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore

from archlab.config import ModelConfig, _help
from archlab.errors import ConfigError

OBJECTIVES = ("clm", "mlm", "span_corruption", "prefix_lm")
SCHEDULES = ("cosine", "linear", "constant", "wsd")
COOLDOWN_SHAPES = ("linear", "cosine", "1-sqrt")
NONFINITE_POLICIES = ("stop", "skip")
NAN_TARGETS = ("loss", "gradients")
LOGGER_BACKENDS = ("wandb", "none")
DATA_SOURCES = ("shakespeare", "files", "hf")  # archlab.data.sources.SOURCES (kept light to import)
WANDB_MODES = ("offline", "online", "disabled")


@dataclass
class ObjectiveConfig:
    name: str = _help("clm", "clm | mlm | span_corruption | prefix_lm")
    options: Dict[str, Any] = field(default_factory=dict, metadata={"help": "objective options, e.g. mask_rate"})

    def __post_init__(self) -> None:
        if self.name not in OBJECTIVES:
            raise ConfigError(f"objective.name={self.name!r} is not one of {', '.join(OBJECTIVES)}")


@dataclass
class DataConfig:
    source: str = _help("shakespeare", "shakespeare (embedded) | files | hf")
    options: Dict[str, Any] = field(default_factory=dict, metadata={"help": "source options (globs, hub name, ...)"})
    vocab_size: int = _help(2048, "BPE vocabulary size (6 specials and 100 sentinels included)")
    seq_len: int = _help(128, "tokens per row (encoder inputs for span corruption)")
    tokenizer_file: Optional[str] = _help(None, "use this tokenizer.json instead of training one")
    cache_dir: Optional[str] = _help(None, "tokenizer/corpus cache root; default ~/.cache/archlab or $ARCHLAB_CACHE")

    def __post_init__(self) -> None:
        if self.source not in DATA_SOURCES:
            raise ConfigError(f"unknown data source {self.source!r}; choose one of {', '.join(DATA_SOURCES)}")
        if self.seq_len < 2:
            raise ConfigError(f"data.seq_len must be at least 2, got {self.seq_len}")


@dataclass
class OptimizerConfig:
    lr: float = _help(3e-3, "peak learning rate")
    b1: float = _help(0.9, "Adam beta1")
    b2: float = _help(0.95, "Adam beta2")
    eps: float = _help(1e-8, "Adam epsilon")
    weight_decay: float = _help(0.1, "decoupled weight decay on matrices (not on biases, norms)")
    schedule: str = _help(
        "cosine", "decay after warmup: cosine | linear | constant | wsd (constant, then a cooldown at the end)"
    )
    warmup_fraction: float = _help(0.05, "warmup as a fraction of the run's steps")
    warmup_tokens: Optional[int] = _help(None, "warmup length in tokens; overrides warmup_fraction")
    final_lr_fraction: float = _help(0.1, "learning rate at the end, as a fraction of the peak")
    cooldown_fraction: float = _help(0.2, "wsd only: the cooldown's share of the run's steps, in (0, 1]")
    cooldown_shape: str = _help("1-sqrt", "wsd only: cooldown from peak to final: linear | cosine | 1-sqrt")
    grad_clip: float = _help(1.0, "global gradient-norm clip; 0 disables")
    grad_accum_steps: int = _help(1, "micro-batches accumulated per update")

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"optimizer.schedule={self.schedule!r} is not one of {', '.join(SCHEDULES)}")
        if self.lr <= 0:
            raise ConfigError(f"optimizer.lr must be positive, got {self.lr}")
        if not 0 <= self.warmup_fraction < 1:
            raise ConfigError(f"optimizer.warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if not 0 < self.cooldown_fraction <= 1:
            raise ConfigError(f"optimizer.cooldown_fraction must be in (0, 1], got {self.cooldown_fraction}")
        if self.cooldown_shape not in COOLDOWN_SHAPES:
            raise ConfigError(
                f"optimizer.cooldown_shape={self.cooldown_shape!r} is not one of {', '.join(COOLDOWN_SHAPES)}"
            )
        if self.grad_accum_steps < 1:
            raise ConfigError(f"optimizer.grad_accum_steps must be at least 1, got {self.grad_accum_steps}")


@dataclass
class RunConfig:
    name: str = _help("default", "run name (W&B run name; the run directory's name)")
    dir: Optional[str] = _help(None, "run directory; default: Hydra's output directory")
    seed: int = _help(0, "seed of every random draw: init, data order, objective noise")
    batch_size: int = _help(16, "rows per update (per micro-batch times grad_accum_steps)")
    tokens: Optional[int] = _help(None, "token budget; sets the number of steps (wins over run.steps)")
    tokens_per_param: Optional[float] = _help(None, "token budget per total parameter (wins over run.tokens)")
    flops: Optional[float] = _help(
        None, "compute budget C in training FLOPs (3 x forward, head and attention included); "
        "tokens = C / train FLOPs per token of the plan (wins over run.tokens_per_param and run.tokens)"
    )
    steps: int = _help(600, "number of updates when no token budget is given")
    branches: List[float] = field(default_factory=list, metadata={"help": (
        "budgets (in run.flops's unit when it is set, else run.tokens's) at which a constant-rate wsd trunk forks a "
        "cooldown branch, each equal to a separate optimizer.schedule=wsd run to that budget; written to "
        "branches/<budget>/ (experiments/scaling_laws/)")})
    branch_checkpoints: bool = _help(False, "save each branch's cooled-down final checkpoint in its directory")
    eval_every: int = _help(200, "validation every N steps (and at the end)")
    eval_batches: int = _help(8, "validation batches per evaluation")
    checkpoint_every: int = _help(200, "checkpoint every N steps (and at the end)")
    keep_checkpoints: int = _help(3, "checkpoints kept (newest)")
    log_every: int = _help(10, "train metrics every N steps")
    stop_at_step: Optional[int] = _help(None, "checkpoint and exit after this step (time-limited jobs); rerun to continue")
    on_nonfinite: str = _help("stop", "non-finite loss or gradients: stop | skip the update")
    inject_nan_at_step: Optional[int] = _help(
        None, "debugging: make this step's loss or gradients NaN (tests run.on_nonfinite); null: off"
    )
    inject_nan_into: str = _help("loss", "debugging: what run.inject_nan_at_step poisons: loss | gradients")
    progress: bool = _help(True, "show a progress bar")
    samples: int = _help(2, "generated continuations printed at the end (generative families)")

    def __post_init__(self) -> None:
        if self.on_nonfinite not in NONFINITE_POLICIES:
            raise ConfigError(f"run.on_nonfinite={self.on_nonfinite!r} is not one of stop, skip")
        if self.inject_nan_into not in NAN_TARGETS:
            raise ConfigError(f"run.inject_nan_into={self.inject_nan_into!r} is not one of loss, gradients")
        if self.inject_nan_at_step is not None and self.inject_nan_at_step < 1:
            raise ConfigError(f"run.inject_nan_at_step must be at least 1, got {self.inject_nan_at_step}")
        for name in ("batch_size", "eval_every", "eval_batches", "checkpoint_every", "keep_checkpoints", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"run.{name} must be at least 1, got {getattr(self, name)}")
        for name in ("tokens", "tokens_per_param", "flops", "steps"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"run.{name} must be positive, got {value}")


@dataclass
class LoggerConfig:
    backend: str = _help("wandb", "wandb | none (metrics.jsonl is always written)")
    project: str = _help("archlab", "W&B project")
    entity: Optional[str] = _help(None, "W&B entity (team or user)")
    mode: str = _help("offline", "offline (default, no account needed) | online | disabled")
    group: Optional[str] = _help(None, "W&B group; default: the experiment or sweep name")
    tags: List[str] = field(default_factory=list, metadata={"help": "extra W&B tags"})

    def __post_init__(self) -> None:
        if self.backend not in LOGGER_BACKENDS:
            raise ConfigError(f"logger.backend={self.backend!r} is not one of wandb, none")
        if self.mode not in WANDB_MODES:
            raise ConfigError(f"logger.mode={self.mode!r} is not one of {', '.join(WANDB_MODES)}")


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    run: RunConfig = field(default_factory=RunConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    size_name: str = _help("custom", "name of the size preset (set by conf/size/*)")
    experiment: str = _help("default", "experiment or sweep name; the W&B group and runs/ folder")

    def __post_init__(self) -> None:
        from archlab.objectives.registry import check_compatible

        check_compatible(self.model.family, self.objective.name)
        if self.objective.name != "span_corruption" and self.data.seq_len > self.model.max_seq_len:
            raise ConfigError(
                f"data.seq_len {self.data.seq_len} is longer than the position table "
                f"(model.max_seq_len={self.model.max_seq_len})"
            )


@dataclass
class EvalConfig:
    checkpoint: str = _help("???", "a run directory, its checkpoints/ directory, one step directory, or a sweep directory")
    step: Optional[int] = _help(None, "evaluate this step; default: the newest")
    all_steps: bool = _help(False, "evaluate every checkpoint of every run found")
    batches: int = _help(16, "validation batches per evaluation")
    batch_size: Optional[int] = _help(None, "default: the run's batch size")
    samples: int = _help(3, "generated continuations printed (generative families)")
    max_new_tokens: int = _help(40, "tokens per generated continuation")
    expect_family: Optional[str] = _help(None, "refuse a checkpoint whose model family differs")
    data: Optional[DataConfig] = _help(None, "evaluate on this data instead of the run's validation split")
    logger: LoggerConfig = field(default_factory=LoggerConfig)


# What a size= preset sets; a reference architecture's model= option keeps the rest of its preset.
SHAPE_KEYS = ("vocab_size", "d_model", "n_layers", "n_heads", "head_dim", "d_ff", "max_seq_len")


def reference_components(name: str) -> dict:
    """``model=<name>`` for a reference architecture: its preset's components (archlab.config.PRESETS)
    without its shape, which ``size=`` gives; vocabulary and positions follow ``data``."""
    from archlab.config import PRESETS

    components = {k: v for k, v in PRESETS[name].items() if k not in SHAPE_KEYS}
    return {**components, "vocab_size": "${data.vocab_size}", "max_seq_len": "${data.seq_len}"}


def register_configs() -> None:
    from archlab.config import PRESETS

    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainConfig)
    store.store(name="eval_schema", node=EvalConfig)
    for name in PRESETS:
        store.store(group="model", name=name, node=reference_components(name))
