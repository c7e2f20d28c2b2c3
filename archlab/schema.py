"""Hydra schemas for the train and eval apps, registered in the ConfigStore.

YAML under ``conf/`` is merged onto these dataclasses, so an unknown key or a wrong type
fails at composition; ``OmegaConf.to_object`` then runs each ``__post_init__``, which
refuses values that cannot work together before anything is compiled or written.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from archlab.config import (
    AT_LEAST_ONE, BETA, FAMILIES, FRACTION, KV_CACHE_DTYPES, NON_NEGATIVE, POSITIVE, Interval, ModelConfig, _help,
    check_fields,
)
from archlab.errors import ConfigError

OBJECTIVES = ("clm", "mlm", "span_corruption", "prefix_lm")
SCHEDULES = ("cosine", "linear", "constant", "wsd")
COOLDOWN_SHAPES = ("linear", "cosine", "1-sqrt")
NONFINITE_POLICIES = ("stop", "skip")
NAN_TARGETS = ("loss", "gradients")
LOGGER_BACKENDS = ("wandb", "none")
DATA_SOURCES = ("shakespeare", "files", "hf", "english")  # archlab.data.sources.SOURCES (kept light to import)
WANDB_MODES = ("offline", "online", "disabled")
WANDB_CONSOLE = ("off", "wrap", "redirect", "auto")  # wandb.Settings.console ("auto" is "wrap")
SEEDS = Interval(0, 2**32)  # the data pipeline's shuffle takes a 32-bit seed


def check_plain_name(key: str, value: str) -> None:
    """Refuse a name that is not one directory name: it becomes a folder under runs/ and must stay there."""
    if value in ("", ".", "..") or "/" in value or "\\" in value or not value.isprintable():
        raise ConfigError(
            f"{key} must be a plain name (printable, no path separators, not empty, '.' or '..'), got {value!r}"
        )


def _plain_name(key: str, *, _root_: Any) -> str:
    """``${archlab.plain_name:run.name}``: the value at ``key``, checked before Hydra makes a directory of it."""
    value = str(OmegaConf.select(_root_, key))
    check_plain_name(key, value)
    return value


@dataclass
class ObjectiveConfig:
    name: str = _help("clm", "clm | mlm | span_corruption | prefix_lm")
    options: Dict[str, Any] = field(default_factory=dict, metadata={"help": "objective options, e.g. mask_rate"})

    def __post_init__(self) -> None:
        if self.name not in OBJECTIVES:
            raise ConfigError(f"objective.name={self.name!r} is not one of {', '.join(OBJECTIVES)}")


@dataclass
class SpecialTokensConfig:
    """For a tokenizer made elsewhere (data.tokenizer_file, or model.init_from's): the token playing each
    role. Unset: the tokenizer's special_tokens_map.json, then well-known names (archlab/data/foreign.py)."""

    pad: Optional[str] = _help(None, "padding (a filler behind the segment mask; added when missing)")
    cls: Optional[str] = _help(None, "classification token (added when missing)")
    sep: Optional[str] = _help(None, "separator (added when missing)")
    mask: Optional[str] = _help(None, "MLM's mask token (objective=mlm needs one)")
    bos: Optional[str] = _help(None, "beginning of sequence (added when missing)")
    eos: Optional[str] = _help(None, "end of a document, e.g. GPT-2's '<|endoftext|>' (clm, prefix_lm and "
                                     "span_corruption need one)")

    def given(self) -> dict[str, str]:
        """The roles named here, ``{role: token}``."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass
class DataConfig:
    source: str = _help("shakespeare", "shakespeare (embedded) | files | hf | english (pip extra [study])")
    options: Dict[str, Any] = field(default_factory=dict, metadata={"help": "source options (globs, hub name, ...)"})
    vocab_size: int = _help(2048, "BPE vocabulary size (6 specials and 100 sentinels included)")
    seq_len: int = _help(128, "tokens per row (encoder inputs for span corruption)")
    tokenizer_file: Optional[str] = _help(None, (
        "use this tokenizer.json instead of training one; one made elsewhere (GPT-2's, BERT's, T5's) is renumbered "
        "into archlab's special-token layout"))
    special_tokens: SpecialTokensConfig = field(default_factory=lambda: SpecialTokensConfig())
    cache_dir: Optional[str] = _help(None, "tokenizer/corpus cache root; default ~/.cache/archlab or $ARCHLAB_CACHE")

    def __post_init__(self) -> None:
        if self.source not in DATA_SOURCES:
            raise ConfigError(f"unknown data source {self.source!r}; choose one of {', '.join(DATA_SOURCES)}")
        check_fields("data", self, vocab_size=POSITIVE, seq_len=Interval(2))


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
        if self.cooldown_shape not in COOLDOWN_SHAPES:
            raise ConfigError(
                f"optimizer.cooldown_shape={self.cooldown_shape!r} is not one of {', '.join(COOLDOWN_SHAPES)}"
            )
        check_fields(
            "optimizer", self, lr=POSITIVE, b1=BETA, b2=BETA, eps=POSITIVE, weight_decay=NON_NEGATIVE,
            warmup_fraction=Interval(0, 1), warmup_tokens=NON_NEGATIVE, final_lr_fraction=FRACTION,
            cooldown_fraction=Interval(0, 1, low_open=True, high_open=False),
            grad_clip=NON_NEGATIVE, grad_accum_steps=AT_LEAST_ONE,
        )


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
        "branches/<budget>/ (experiments/scaling_laws/v2/)")})
    branch_checkpoints: bool = _help(False, "save each branch's cooled-down final checkpoint in its directory")
    members: List[Dict[str, Any]] = field(default_factory=list, metadata={"help": (
        "train these runs at once in this process (vmap): each a dict of seed and/or lr overriding this run's, "
        "written as its own run under members/<name>/; needs optimizer.schedule=wsd")})
    eval_every: int = _help(200, "validation every N steps (and at the end)")
    eval_batches: int = _help(8, "validation batches per evaluation (the split's first rows)")
    eval_rows: Optional[int] = _help(None, (
        "validation rows per evaluation spread evenly over the whole split, rounded up to whole batches "
        "(the score then does not depend on run.batch_size); null: run.eval_batches batches of the first rows"))
    checkpoint_every: int = _help(200, "checkpoint every N steps (and at the end)")
    keep_checkpoints: int = _help(3, "checkpoints kept (newest)")
    keep_set_aside: int = _help(3, (
        "set-aside checkpoint directories kept (corrupt-<step>-<ns>: steps that failed their checks on resume; "
        "abandoned-<step>-<ns>: crashed saves), newest first; older ones are deleted when another is set aside"))
    log_every: int = _help(10, "train metrics every N steps")
    stop_at_step: Optional[int] = _help(None, "checkpoint and exit after this step (time-limited jobs); rerun to continue")
    on_nonfinite: str = _help("stop", "non-finite loss or gradients: stop | skip the update")
    max_skips_in_a_row: int = _help(10, (
        "under run.on_nonfinite=skip: stop (keeping the last good checkpoint) after this many skipped updates "
        "in a row; each skip is warned about"))
    restart: bool = _help(False, (
        "start this run over in place: the run directory's old contents are moved, whole, to "
        "<run dir>.restarted-<ns> beside it (never deleted), then the run starts from step 0 with this config; "
        "every launch with it starts over, so drop it to resume"))
    inject_nan_at_step: Optional[int] = _help(
        None, "debugging: make this step's loss or gradients NaN (tests run.on_nonfinite); null: off"
    )
    inject_nan_into: str = _help("loss", "debugging: what run.inject_nan_at_step poisons: loss | gradients")
    progress: bool = _help(True, "show a progress bar")
    samples: int = _help(0, (
        "greedy continuations of this many held-out validation documents' openings, printed and logged to "
        "train.log at the end of the run (generative families); 0: none"))

    def __post_init__(self) -> None:
        if self.on_nonfinite not in NONFINITE_POLICIES:
            raise ConfigError(f"run.on_nonfinite={self.on_nonfinite!r} is not one of stop, skip")
        if self.inject_nan_into not in NAN_TARGETS:
            raise ConfigError(f"run.inject_nan_into={self.inject_nan_into!r} is not one of loss, gradients")
        check_plain_name("run.name", self.name)
        check_fields(
            "run", self, seed=SEEDS, batch_size=AT_LEAST_ONE, tokens=POSITIVE, tokens_per_param=POSITIVE,
            flops=POSITIVE, steps=POSITIVE, eval_every=AT_LEAST_ONE, eval_batches=AT_LEAST_ONE, eval_rows=AT_LEAST_ONE,
            checkpoint_every=AT_LEAST_ONE, keep_checkpoints=AT_LEAST_ONE, keep_set_aside=NON_NEGATIVE,
            log_every=AT_LEAST_ONE,
            stop_at_step=AT_LEAST_ONE, inject_nan_at_step=AT_LEAST_ONE, samples=NON_NEGATIVE,
            max_skips_in_a_row=AT_LEAST_ONE,
        )


@dataclass
class RulesConfig:
    """Per-size hyperparameters as data (conf/rules/*.yaml, archlab/train/rules.py)."""

    name: Optional[str] = _help(None, "the rule file applied (conf/rules/<name>.yaml); null: no rule")
    calibration: Dict[str, Any] = field(default_factory=dict, metadata={"help": (
        "provenance: the command, results file and fit that produced the rule (recorded, not read)")})
    lr: float = _help(3e-3, "learning rate at lr_params total parameters")
    lr_params: float = _help(1e5, "where the lr law is anchored")
    lr_exponent: float = _help(0.0, "lr = lr * (params / lr_params) ** lr_exponent * (batch / lr_batch) ** lr_batch_exponent")
    lr_batch: int = _help(16, "the batch size the lr law is anchored at")
    lr_batch_exponent: float = _help(0.0, "how the rate scales with the batch the rule picks (0.5: Adam's square-root rule)")
    b2: float = _help(0.95, "Adam beta2 for every size")
    warmup_tokens_per_param: float = _help(1.0, "warmup = this x total parameters, in tokens ...")
    max_warmup_fraction: float = _help(0.1, "... but at most this fraction of the run's smallest budget")
    min_updates: int = _help(300, "batch: the largest power of two giving the smallest budget this many updates")
    min_batch: int = _help(4, "batch floor (a budget too small for min_updates at it is refused)")
    max_batch: int = _help(32, "batch ceiling")
    applied: Dict[str, Any] = field(default_factory=dict, metadata={"help": (
        "set by archlab: the values the rule gave and what they came from; a config holding it is taken as is")})

    def __post_init__(self) -> None:
        if self.name is not None:
            check_plain_name("rules.name", self.name)
        check_fields(
            "rules", self, lr=POSITIVE, lr_params=POSITIVE, lr_exponent=Interval(-2, 2), b2=BETA,
            lr_batch=AT_LEAST_ONE, lr_batch_exponent=Interval(-2, 2),
            warmup_tokens_per_param=NON_NEGATIVE, max_warmup_fraction=Interval(0, 1, high_open=False),
            min_updates=AT_LEAST_ONE, min_batch=AT_LEAST_ONE, max_batch=AT_LEAST_ONE,
        )
        if self.min_batch > self.max_batch:
            raise ConfigError(f"rules.min_batch {self.min_batch} is above rules.max_batch {self.max_batch}")


@dataclass
class LoggerConfig:
    backend: str = _help("wandb", "wandb | none (metrics.jsonl is always written)")
    project: str = _help("archlab", "W&B project")
    entity: Optional[str] = _help(None, "W&B entity (team or user)")
    mode: str = _help("offline", "offline (default, no account needed) | online | disabled")
    group: Optional[str] = _help(None, "W&B group; default: the experiment or sweep name")
    tags: List[str] = field(default_factory=list, metadata={"help": "extra W&B tags"})
    online_timeout: float = _help(30.0, (
        "seconds an online W&B start may take (server unreachable, say) before the run logs offline instead"))
    dir: Optional[str] = _help(None, (
        "folder whose wandb/ subfolder holds the W&B run files (wandb.init's dir); null: the run directory's "
        "parent, runs/<experiment>/, so every run of an experiment is in runs/<experiment>/wandb/"))
    system_metrics: bool = _help(False, "W&B samples system metrics (CPU, GPU, memory) every 15 s")
    console: str = _help("off", (
        "W&B console capture (its Logs tab): off | wrap (stdout/stderr write methods) | redirect (file "
        "descriptors) | auto (wrap); off leaves progress bars alone"))
    log_checkpoints: bool = _help(False, (
        "at the end of a run, log the final checkpoint directory as a W&B artifact of type model "
        "(model-<run id>, step and val/loss in its metadata; copied into W&B's staging area until uploaded)"))

    def __post_init__(self) -> None:
        check_fields("logger", self, online_timeout=POSITIVE)
        if self.console not in WANDB_CONSOLE:
            raise ConfigError(f"logger.console={self.console!r} is not one of {', '.join(WANDB_CONSOLE)}")
        if self.dir is not None and not self.dir.strip():
            raise ConfigError("logger.dir must be a folder, got an empty string (null: runs/<experiment>/)")
        if self.backend not in LOGGER_BACKENDS:
            raise ConfigError(f"logger.backend={self.backend!r} is not one of wandb, none")
        if self.mode not in WANDB_MODES:
            raise ConfigError(f"logger.mode={self.mode!r} is not one of {', '.join(WANDB_MODES)}")


MESH_AXES = ("data", "fsdp", "tensor")  # archlab.train.sharding builds its jax Mesh with these axes
# Every logical axis name a parameter or a batch dimension carries (archlab.train.sharding.PARAM_AXES).
LOGICAL_AXES = ("batch", "length", "layers", "embed", "mlp", "heads", "kv_heads", "vocab", "positions",
                "token_types", "relative_buckets", "norm", "classes")


def default_mesh_rules() -> dict[str, Any]:
    """FSDP splits ``embed`` (and the batch) over ``fsdp``; tensor parallelism splits the MLP's hidden
    units, the attention heads and the vocabulary over ``tensor``; the rest is replicated."""
    return {"batch": ["data", "fsdp"], "length": None, "layers": None, "embed": "fsdp", "mlp": "tensor",
            "heads": "tensor", "kv_heads": "tensor", "vocab": "tensor", "positions": None, "token_types": None,
            "relative_buckets": None, "norm": None, "classes": None}


@dataclass
class MeshConfig:
    """The device mesh ``(data, fsdp, tensor)`` and the rules that map logical axes onto it
    (archlab/train/sharding.py). One device is a 1x1x1 mesh; the default puts every device on ``data``."""

    data: int = _help(-1, "data-parallel replicas; -1 = the devices fsdp x tensor leave")
    fsdp: int = _help(1, "FSDP shards: parameters and Adam moments split along mesh.rules' fsdp axes (embed)")
    tensor: int = _help(1, "tensor-parallel shards: mlp, heads, kv_heads and vocab split (mesh.rules)")
    rules: Dict[str, Any] = field(default_factory=default_mesh_rules, metadata={"help": (
        "logical axis -> mesh axis (data | fsdp | tensor), a list of them, or null (replicated); logical axes: "
        + ", ".join(LOGICAL_AXES) + "; e.g. mesh.rules.vocab=null keeps the vocabulary whole")})

    def __post_init__(self) -> None:
        sizes = {axis: getattr(self, axis) for axis in MESH_AXES}
        for axis, size in sizes.items():
            if size == 0 or size < -1:
                raise ConfigError(f"mesh.{axis} must be a positive number of devices or -1 (the rest), got {size}")
        if list(sizes.values()).count(-1) > 1:
            rest = [f"mesh.{a}" for a, s in sizes.items() if s == -1]
            raise ConfigError(f"only one of mesh.data, mesh.fsdp, mesh.tensor can be -1 (the rest), got {' and '.join(rest)}")
        for name, axes in self.rules.items():
            if name not in LOGICAL_AXES:
                raise ConfigError(f"mesh.rules.{name} is not a logical axis; the logical axes are {', '.join(LOGICAL_AXES)}")
            listed = [] if axes is None else [axes] if isinstance(axes, str) else list(axes)
            if any(a not in MESH_AXES for a in listed) or len(set(listed)) != len(listed):
                raise ConfigError(
                    f"mesh.rules.{name}={axes!r} must name distinct mesh axes ({', '.join(MESH_AXES)}), or be null")

    def shape(self, n_devices: int) -> dict[str, int]:
        """``{axis: size}`` on ``n_devices`` devices (-1 resolved); refused when the sizes do not fit them."""
        sizes = {axis: getattr(self, axis) for axis in MESH_AXES}
        known = 1
        for size in sizes.values():
            known *= size if size > 0 else 1
        product = " x ".join(f"mesh.{a}" for a, s in sizes.items() if s > 0)
        if -1 in sizes.values():
            rest = next(a for a, s in sizes.items() if s == -1)
            if n_devices % known:
                raise ConfigError(f"{product} = {known} does not divide the {n_devices} devices "
                                  f"(mesh.{rest}=-1 takes the rest)")
            return {a: (s if s > 0 else n_devices // known) for a, s in sizes.items()}
        if known != n_devices:
            raise ConfigError(f"{product} = {' x '.join(str(s) for s in sizes.values())} = {known} devices, but there "
                              f"are {n_devices}; set one of them to -1 to take the rest")
        return sizes


TASKS = ("none", "classification", "tagging", "qa")
TASK_POOLINGS = ("auto", "cls", "mean", "last")


CLUSTERS = ("auto", "slurm", "none")


@dataclass
class DistributedConfig:
    """The processes of one run (``jax.distributed``; archlab/train/distributed.py). One process per
    host, each driving its local devices; together their devices form the ``mesh``.

    ``cluster=auto`` starts the multi-process runtime from the explicit keys when
    ``coordinator_address`` is set, else from SLURM's environment inside a job step of more than one
    task (``srun``), else runs alone; ``slurm`` requires that environment; ``none`` always runs alone.
    """

    coordinator_address: Optional[str] = _help(None, "host:port of process 0's coordinator (every process the same)")
    num_processes: Optional[int] = _help(None, "how many processes the run spans (with coordinator_address)")
    process_id: Optional[int] = _help(None, "this process's rank, 0 .. num_processes - 1 (with coordinator_address)")
    cluster: str = _help("auto", "auto | slurm | none: where the processes come from (see the class docstring)")
    initialization_timeout: int = _help(300, "seconds to wait for every process to join the coordinator")

    def __post_init__(self) -> None:
        if self.cluster not in CLUSTERS:
            raise ConfigError(f"distributed.cluster must be one of {', '.join(CLUSTERS)}, got {self.cluster!r}")
        if self.initialization_timeout < 1:
            raise ConfigError(f"distributed.initialization_timeout must be at least 1 second, "
                              f"got {self.initialization_timeout}")
        explicit = {"coordinator_address": self.coordinator_address, "num_processes": self.num_processes,
                    "process_id": self.process_id}
        given = [k for k, v in explicit.items() if v is not None]
        if not given:
            return
        if self.cluster != "auto":
            raise ConfigError(f"distributed.{given[0]} is set but distributed.cluster={self.cluster} does not read "
                              "it; leave cluster=auto to start the processes from the explicit keys")
        if missing := [k for k, v in explicit.items() if v is None]:
            raise ConfigError(f"distributed.{given[0]} is set without distributed.{missing[0]}: a multi-process run "
                              "needs coordinator_address, num_processes and process_id together")
        host, _, port = self.coordinator_address.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"distributed.coordinator_address must be host:port (e.g. localhost:12355), "
                              f"got {self.coordinator_address!r}")
        if self.num_processes < 1:
            raise ConfigError(f"distributed.num_processes must be at least 1, got {self.num_processes}")
        if not 0 <= self.process_id < self.num_processes:
            raise ConfigError(f"distributed.process_id must be in 0 .. {self.num_processes - 1} "
                              f"(distributed.num_processes={self.num_processes}), got {self.process_id}")


@dataclass
class TaskConfig:
    """Fine-tuning on labelled data (archlab/tasks/): ``name=none`` pre-trains on ``data``; the others train
    a task head on the family's states, usually from ``model.init_from``."""

    name: str = _help("none", "none (pre-training) | classification | tagging | qa")
    train: Optional[str] = _help(None, (
        "training file: classification .csv/.tsv/.jsonl (text, label), tagging CoNLL columns (word ... tag), "
        "qa SQuAD v1.1 JSON"))
    validation: Optional[str] = _help(None, "validation file in the same format; default: hold out validation_fraction")
    validation_fraction: float = _help(0.1, "without a validation file: this share of the training examples, held out")
    split_seed: int = _help(0, "the held-out share's draw (fixed apart from run.seed, so every seed scores the same split)")
    text_field: str = _help("text", "classification: the text column")
    label_field: str = _help("label", "classification: the label column")
    labels: Optional[List[str]] = _help(None, "classification: the label set in order; default: the sorted labels found")
    pooling: str = _help("auto", (
        "classification: auto (encoder-only and encoder-decoder: mean over the encoder; decoder-only: the last "
        "token, [EOS], the only one that sees the whole text) | cls ([CLS] prepended and pooled) | mean | last"))
    max_question_tokens: int = _help(32, "qa: question tokens kept before [SEP] (the context fills the rest)")
    max_answer_tokens: int = _help(30, "qa: the longest span predicted, in tokens")

    def __post_init__(self) -> None:
        check_fields("task", self, validation_fraction=FRACTION, split_seed=SEEDS, max_question_tokens=AT_LEAST_ONE,
                     max_answer_tokens=AT_LEAST_ONE)
        if self.name not in TASKS:
            raise ConfigError(f"task.name={self.name!r} is not one of {', '.join(TASKS)}")
        if self.pooling not in TASK_POOLINGS:
            raise ConfigError(f"task.pooling={self.pooling!r} is not one of {', '.join(TASK_POOLINGS)}")
        if self.name == "none":
            if self.train is not None or self.validation is not None:
                raise ConfigError("task.train and task.validation are read by a task run only; set task=classification, "
                                  "tagging or qa")
            return
        if self.train is None:
            raise ConfigError(f"task={self.name} needs task.train=<file>")
        if not 0 < self.validation_fraction < 1 and self.validation is None:
            raise ConfigError("task.validation_fraction must be between 0 and 1 when there is no task.validation file")
        if self.name != "classification" and (self.labels is not None or self.pooling != "auto"):
            raise ConfigError(f"task.labels and task.pooling are read by task=classification only, not task={self.name}")

    @property
    def enabled(self) -> bool:
        return self.name != "none"


@dataclass
class TrainConfig:
    # data is validated before model: model.vocab_size and max_seq_len interpolate data's,
    # so a bad data value is refused under its own key.
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    run: RunConfig = field(default_factory=RunConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    rules: RulesConfig = field(default_factory=RulesConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    size_name: str = _help("custom", "name of the size preset (set by conf/size/*)")
    experiment: str = _help("default", "experiment or sweep name; the W&B group and runs/ folder")

    def __post_init__(self) -> None:
        from archlab.objectives.registry import check_compatible

        check_plain_name("experiment", self.experiment)
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
    samples: int = _help(3, (
        "generated continuations printed (generative families): of the first N prompts, or of N held-out "
        "validation documents' openings when prompts is empty; 0: none"))
    prompts: List[str] = field(default_factory=list, metadata={"help": (
        "texts to continue, e.g. 'prompts=[\"To be, or not\",\"The king\"]'; empty: validation text")})
    prompt_tokens: int = _help(16, "tokens of each validation document's opening used as a prompt")
    max_new_tokens: int = _help(40, "tokens per generated continuation")
    expect_family: Optional[str] = _help(None, "refuse a checkpoint whose model family differs")
    data: Optional[DataConfig] = _help(None, "evaluate on this data instead of the run's validation split")
    logger: LoggerConfig = field(default_factory=LoggerConfig)

    def __post_init__(self) -> None:
        check_fields(
            "", self, step=NON_NEGATIVE, batches=AT_LEAST_ONE, batch_size=AT_LEAST_ONE, samples=NON_NEGATIVE,
            max_new_tokens=AT_LEAST_ONE, prompt_tokens=AT_LEAST_ONE,
        )
        if self.expect_family is not None and self.expect_family not in FAMILIES:
            raise ConfigError(f"expect_family={self.expect_family!r} is not one of {', '.join(FAMILIES)}")


@dataclass
class ExportConfig:
    checkpoint: str = _help("???", "a run directory, its checkpoints/ directory, or one step directory")
    step: Optional[int] = _help(None, "export this step; default: the newest that verifies")
    out: str = _help("???", (
        "the Hugging Face directory to write (config.json, model.safetensors, tokenizer files); it must not "
        "exist or be empty"))

    def __post_init__(self) -> None:
        check_fields("", self, step=NON_NEGATIVE)


TOP_P = Interval(0, 1, low_open=True, high_open=False)


@dataclass
class GenerateConfig:
    checkpoint: str = _help("???", "one run: its directory, its checkpoints/ directory or one step directory")
    step: Optional[int] = _help(None, "generate with this step; default: the newest that verifies")
    prompts: List[str] = field(default_factory=list, metadata={"help": (
        "texts to continue, e.g. 'prompts=[\"To be, or not\",\"The king\"]'")})
    prompts_file: Optional[str] = _help(None, "a UTF-8 text file, one prompt per line (blank lines skipped); - = stdin")
    validation_prompts: int = _help(3, (
        "without prompts or prompts_file: continue this many held-out validation documents' openings"))
    prompt_tokens: int = _help(16, "tokens of each validation document's opening used as a prompt")
    max_new_tokens: int = _help(40, "tokens generated per continuation (fewer where a row writes EOS)")
    temperature: float = _help(0.0, "0 = greedy (argmax); above 0, sample from softmax(logits / temperature)")
    top_k: Optional[int] = _help(None, "sample among the k most likely tokens only (temperature > 0)")
    top_p: Optional[float] = _help(None, "nucleus sampling: the smallest set of tokens holding this probability")
    seed: int = _help(0, "sampling seed; sample i of every prompt draws from the stream of seed + i")
    num_samples: int = _help(1, "continuations per prompt (needs temperature > 0: greedy ones would be identical)")
    kv_cache_dtype: Optional[str] = _help(None, "KV-cache storage: null = the model's own | auto | bfloat16 | float32 | int8")
    output: Optional[str] = _help(None, "also write one JSON line per continuation to this new file (never overwritten)")

    def __post_init__(self) -> None:
        check_fields(
            "", self, step=NON_NEGATIVE, validation_prompts=AT_LEAST_ONE, prompt_tokens=AT_LEAST_ONE,
            max_new_tokens=AT_LEAST_ONE, temperature=NON_NEGATIVE, top_k=AT_LEAST_ONE, top_p=TOP_P, seed=SEEDS,
            num_samples=AT_LEAST_ONE,
        )
        if self.num_samples > 1 and self.temperature == 0:
            raise ConfigError(f"num_samples={self.num_samples} needs temperature > 0: greedy decoding "
                              "(temperature=0) gives the same continuation every time")
        if self.prompts and self.prompts_file is not None:
            raise ConfigError("give prompts or prompts_file, not both")
        if self.kv_cache_dtype is not None and self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError(f"kv_cache_dtype={self.kv_cache_dtype!r} is not one of null, {', '.join(KV_CACHE_DTYPES)}")
        if any(not text for text in self.prompts):
            raise ConfigError("prompts holds an empty prompt; every prompt needs some text")


# What a size= preset sets; a reference architecture's model= option keeps the rest of its preset.
SHAPE_KEYS = ("vocab_size", "d_model", "n_layers", "n_heads", "head_dim", "d_ff", "max_seq_len")


def reference_components(name: str) -> dict:
    """``model=<name>`` for a reference architecture: its preset's components (archlab.config.PRESETS)
    without its shape, which ``size=`` gives; vocabulary and positions follow ``data``."""
    from archlab.config import PRESETS

    components = {k: v for k, v in PRESETS[name].items() if k not in SHAPE_KEYS}
    return {**components, "vocab_size": "${data.vocab_size}", "max_seq_len": "${data.seq_len}"}


def register_configs() -> None:
    """The schemas, the reference architectures' model= options, and the resolver conf/train.yaml
    names its run directories with (idempotent)."""
    from archlab.config import PRESETS

    if not OmegaConf.has_resolver("archlab.plain_name"):
        OmegaConf.register_new_resolver("archlab.plain_name", _plain_name)
    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainConfig)
    store.store(name="eval_schema", node=EvalConfig)
    store.store(name="generate_schema", node=GenerateConfig)
    store.store(name="export_schema", node=ExportConfig)
    for name in PRESETS:
        store.store(group="model", name=name, node=reference_components(name))
