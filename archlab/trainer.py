"""The one seam where a run is assembled: ``compose(overrides)`` -> config -> ``Trainer``.

The train loop, ``archlab-eval``, the scaling study's continuation score, the benchmarks and the
experiments all build a run through this module, so a run assembled in-process is the run
``archlab-train`` would have built::

    cfg = compose(["size=nano", "run.steps=20"])
    trainer = Trainer(cfg)                       # corpus, plan, model, optimizer, state, steps, mesh
    for batch, _ in zip(trainer.iterator(), range(20)):
        metrics = trainer.step(batch)
    trainer.evaluate()                           # {"val/loss": ..., "val/bits_per_byte": ...}

    trainer = Trainer.restore("runs/quickstart/decoder_only-mini-clm-s0")   # newest good step
    trainer.model                                # the restored network (nnx)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from archlab.config import resolve_auto
from archlab.errors import CheckpointError, ConfigError
from archlab.schema import (
    DataConfig, DistributedConfig, EvalConfig, ExportConfig, GenerateConfig, MeshConfig, TrainConfig,
)

# Each app's config name (archlab/conf/<app>.yaml) and schema.
APPS = {"train": TrainConfig, "eval": EvalConfig, "export": ExportConfig, "generate": GenerateConfig}


def compose(overrides: Sequence[str] = (), app: str = "train") -> TrainConfig | EvalConfig:
    """The validated config ``archlab-<app>`` builds from these Hydra overrides."""
    from hydra import compose as hydra_compose, initialize_config_dir

    from archlab.cli import CONF_DIR, prepare_hydra, typed

    if app not in APPS:
        raise ConfigError(f"unknown app {app!r}; choose one of {', '.join(APPS)}")
    prepare_hydra()
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        composed = hydra_compose(app, overrides=list(overrides))
    return typed(composed, APPS[app])


def resolved(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` as it will run: ``auto`` values resolved (``config.resolve_auto``), a ``-1`` mesh size
    resolved on this machine's devices, the rule file's hyperparameters applied (``train/rules.py``)."""
    from archlab.train.rules import apply_rules

    model = resolve_auto(cfg.model)
    if model is not cfg.model:
        cfg = dataclasses.replace(cfg, model=model)
    if -1 in (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor):  # recorded as it ran: mesh.data=-1 -> 8
        import jax

        cfg = dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, **cfg.mesh.shape(jax.device_count())))
    return apply_rules(cfg)


def config_dict(cfg: TrainConfig) -> dict[str, Any]:
    """The config as plain data: what ``config.yaml``, ``summary.json`` and W&B record."""
    return OmegaConf.to_container(OmegaConf.structured(cfg))


def load_run_config(run_dir: str | Path) -> TrainConfig:
    """A run directory's saved config, validated against today's schema.

    Interpolations (``${oc.env:...}``) in the file are refused, not resolved: a run directory
    may come from anyone, and resolving would read this machine's environment into the run.
    """
    from archlab.train.run_dir import CONFIG_FILE

    path = Path(run_dir) / CONFIG_FILE
    try:
        saved = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise CheckpointError(f"{path} is unreadable ({' '.join(str(error).split())[:200]})") from None
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path} does not hold a config mapping")
    if "${" in yaml.safe_dump(saved):
        raise CheckpointError(f"{path} holds an interpolation ('${{...}}'); saved configs are plain values")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), saved)
        return resolved(OmegaConf.to_object(merged))
    except Exception as error:  # OmegaConf's and the schema's refusals
        from archlab.cli import one_line

        raise CheckpointError(f"{path} does not hold a valid run config ({one_line(error)})") from None


def check_config(cfg: TrainConfig) -> None:
    """Every refusal that needs no data: batch split, budget and lengths, objective options."""
    from archlab.train.branches import plan_branches
    from archlab.train.setup import check_batch, make_plan, objective_transform
    from archlab.train.sharding import check_mesh

    check_batch(cfg)
    from archlab.train.distributed import check_launch

    check_launch(cfg)
    if cfg.task.enabled:
        for key, value in (("run.members", cfg.run.members), ("run.branches", cfg.run.branches)):
            if value:
                raise ConfigError(f"{key} is for pre-training ladders; a task=... run trains one model on its own "
                                  "schedule (launch one run per setting, e.g. with -m)")
    check_mesh(cfg, make_plan(cfg, cfg.data.vocab_size).model)  # devices, batch, heads, sharded dimensions
    objective_transform(cfg, cfg.data.vocab_size)
    plan_branches(cfg, cfg.data.vocab_size)
    from archlab.train.members import member_configs

    member_configs(cfg)


class Trainer:
    """Everything a run is built from: config, corpus, plan, model, optimizer, state, steps, mesh.

    ``tokenizer_file`` (a run's saved tokenizer) fixes the tokenizer; the corpus is then packed
    only when first used (scoring a checkpoint needs the model, not the corpus); ``corpus`` shares
    one already packed (packed members of one shape). With ``abstract=True`` the state holds shapes
    only: the target of a restore, no parameters drawn. ``model.init_from`` fills the parameters from
    its source instead of drawing them (``train/init_from.py``), unless ``init_weights=False`` (a resumed
    run, whose checkpoint replaces them).
    """

    def __init__(
        self, cfg: TrainConfig, *, tokenizer_file: str | Path | None = None, abstract: bool = False, corpus=None,
        init_weights: bool = True,
    ):
        import jax
        from flax import nnx

        from archlab.data import Tokenizer
        from archlab.nn.models import build_model
        from archlab.train.optim import make_optimizer, schedule_points
        from archlab.train.setup import make_plan, objective_transform
        from archlab.train.sharding import MeshPlan, check_divisible
        from archlab.train.state import TrainState

        from archlab.train.distributed import check_launch, initialize

        check_launch(cfg)  # refused before joining: a refused process would leave its peers waiting
        initialize(cfg.distributed)  # a run over several processes joins them before JAX lists its devices
        self.cfg = cfg = resolved(cfg)
        check_config(cfg)
        source, named = None, cfg.data.tokenizer_file
        if cfg.model.init_from and init_weights and not abstract:
            from archlab.train import init_from

            source = init_from.find_source(cfg.model.init_from)
            named = init_from.source_tokenizer(source, cfg.data.tokenizer_file)
        if tokenizer_file is None and named is not None:
            # A tokenizer made elsewhere is renumbered into archlab's special-token layout (data/foreign.py).
            from archlab.data.foreign import adapted_tokenizer_file

            tokenizer_file, new_to_old = adapted_tokenizer_file(
                named, objective=cfg.objective.name, special_tokens=cfg.data.special_tokens.given(), cache_dir=cfg.data.cache_dir)
            if source is not None:
                source = dataclasses.replace(source, new_to_old=new_to_old)
        self.init_source = source
        self.tokenizer_file = tokenizer_file
        if corpus is not None:
            self.__dict__["corpus"] = corpus  # what the cached property would hold
        self.tokenizer = Tokenizer.from_file(tokenizer_file) if tokenizer_file else self.corpus.tokenizer
        self.plan = make_plan(cfg, self.tokenizer.vocab_size)
        # A task's rows are already model inputs; pre-training rows go through the objective's transform.
        self.transform = None if cfg.task.enabled else objective_transform(cfg, self.tokenizer.vocab_size)
        build = functools.partial(build_model, self.plan.model, seed=cfg.run.seed)
        if source is not None:
            init_from.check_source(source, self.plan.model, cfg.data.tokenizer_file)
            from archlab.convert import model_from_params

            build = functools.partial(model_from_params, self.plan.model, init_from.source_params(source, self.plan.model),
                                      f"model.init_from={source.path}")
        if cfg.task.enabled:  # the backbone (drawn or pre-trained) under a fresh task head
            from archlab.tasks.model import TaskModel

            backbone, task, n_outputs = build, cfg.task, self.corpus.n_outputs
            build = lambda: TaskModel(backbone(), task.name, n_outputs, pooling=task.pooling,  # noqa: E731
                                      max_answer_tokens=task.max_answer_tokens, seed=cfg.run.seed)
        self.graphdef, params = nnx.split(nnx.eval_shape(build) if abstract else build())
        self.tx, self.schedule = make_optimizer(cfg.optimizer, self.plan.total_steps, self.plan.tokens_per_step)
        # A trunk (run.branches) runs at the peak rate; its branches cool down (train/branches.py).
        self.schedule_points = schedule_points(
            cfg.optimizer, self.plan.total_steps, self.plan.tokens_per_step, trunk=bool(cfg.run.branches)
        )
        # The state is laid out on the (data, fsdp, tensor) mesh by logical axis names (train/sharding.py).
        self.mesh = MeshPlan(cfg.mesh)  # check_config has refused a mesh that does not fit
        check_divisible(params, self.mesh.sizes, self.mesh.rules)  # the real vocabulary's tables too
        if abstract:
            self.state = self.mesh.abstract(jax.eval_shape(lambda p: TrainState.create(p, self.tx), params))
        else:
            self.state = self.mesh.place(TrainState.create(params, self.tx))

    # -- data --------------------------------------------------------------------------------

    @functools.cached_property
    def corpus(self):
        """Tokenizer and packed train/validation rows (the BPE is trained here on a fresh run)."""
        from archlab.train.setup import load_corpus, row_length_for

        if self.cfg.task.enabled:  # labelled files (tasks/corpus.py); no tokenizer given: a BPE of its texts
            from archlab.tasks.corpus import build_task_corpus

            return build_task_corpus(self.cfg.task, length=self.cfg.data.seq_len, vocab_size=self.cfg.data.vocab_size,
                                     tokenizer_file=self.tokenizer_file, cache_dir=self.cfg.data.cache_dir)
        return load_corpus(self.cfg.data, row_length_for(self.cfg), self.tokenizer_file)

    def iterator(self):
        """The run's training batches: a grain iterator whose order is a function of (seed, step)."""
        from archlab.data import build_iterator

        return build_iterator(
            self.corpus.train, batch_size=self.cfg.run.batch_size, seed=self.cfg.run.seed, transform=self.transform
        )

    def validation_batches(self, n_batches: int | None = None, batch_size: int | None = None) -> list[dict]:
        """The fixed validation batches (same rows and objective noise at every evaluation)."""
        from archlab.train.setup import validation_batches

        run = self.cfg.run
        if self.cfg.task.enabled:  # every validation example once, in order; the last batch padded (weight 0)
            size = batch_size or run.batch_size
            rows = self.corpus.validation.padded_to(size).as_dict()
            count = len(rows["tokens"]) // size
            return [{k: a[i * size:(i + 1) * size] for k, a in rows.items()} for i in range(min(count, n_batches or count))]
        return validation_batches(
            self.corpus.validation, self.transform, batch_size=batch_size or run.batch_size,
            n_batches=n_batches or run.eval_batches, seed=run.seed, eval_rows=None if n_batches else run.eval_rows,
        )

    def device_batch(self, batch: dict) -> dict:
        """A host batch split into micro-batches (``grad_accum_steps``) and sharded over the mesh."""
        accum = self.cfg.optimizer.grad_accum_steps
        if accum > 1:
            batch = {k: v.reshape(accum, -1, *v.shape[1:]) for k, v in batch.items()}
        return self.mesh.shard_batch(batch, leading_axes=1 if accum > 1 else 0)

    # -- steps -------------------------------------------------------------------------------

    @functools.cached_property
    def train_step(self):
        """The jitted update ``(state, device batch) -> (state, metrics)`` (state donated)."""
        from archlab.train.step import make_train_step

        run = self.cfg.run
        return make_train_step(
            self.graphdef, self.tx, grad_accum_steps=self.cfg.optimizer.grad_accum_steps,
            skip_nonfinite=run.on_nonfinite == "skip", inject_nan_at_step=run.inject_nan_at_step,
            inject_nan_into=run.inject_nan_into, shard=self.mesh,
            dropout_seed=run.seed if self.plan.model.has_dropout else None,
        )

    @functools.cached_property
    def eval_step(self):
        """The jitted ``(params, batch) -> sums`` of loss, weight and correct predictions."""
        from archlab.train.step import make_eval_step

        return make_eval_step(self.graphdef, shard=self.mesh)

    def step(self, batch: dict) -> dict:
        """Apply one update to ``self.state`` from a host batch; returns the step's metrics."""
        self.state, metrics = self.train_step(self.state, self.device_batch(batch), self.schedule_points)
        return metrics

    def evaluate(self, batches: list[dict] | None = None, prefix: str = "val", params=None) -> dict[str, float]:
        """Loss, perplexity, accuracy and bits per byte of ``params`` (default: the current ones)."""
        import jax

        from archlab.train.distributed import host_arrays
        from archlab.train.metrics import Aggregate, eval_metrics

        params = self.state.params if params is None else params
        totals, predictions = Aggregate(), []
        for batch in self.validation_batches() if batches is None else batches:
            device_batch = self.mesh.shard_batch(batch)
            if self.cfg.task.enabled:  # the loss sums and the predictions from one forward pass
                sums, predicted = self.task_eval_step(params, device_batch)
                totals.add(jax.device_get(sums))  # replicated scalars
                predictions.append(host_arrays([predicted])[0])  # rows sharded, over processes too
            else:
                totals.add(jax.device_get(self.eval_step(params, device_batch)))
        if not self.cfg.task.enabled:
            return eval_metrics(totals, self.corpus.bytes_per_token_validation, prefix=prefix)
        import numpy as np

        from archlab.tasks.scoring import task_metrics

        loss = totals.sums["loss_sum"] / max(totals.sums["weight_sum"], 1.0)
        return {f"{prefix}/loss": loss, **task_metrics(self.corpus, np.concatenate(predictions), prefix)}

    @functools.cached_property
    def task_eval_step(self):
        """A task run's jitted ``(params, batch) -> (loss sums, predictions)`` (labels, tags or spans:
        ``TaskModel.scores``)."""
        import jax
        from flax import nnx

        graphdef, mesh = self.graphdef, self.mesh
        return jax.jit(lambda params, batch: nnx.merge(graphdef, params).scores(mesh.constrain_batch(batch)))

    def learning_rate(self, count: int, points: tuple[float, float, float] | None = None) -> float:
        """The rate of update ``count`` (0-based): the run's schedule, or wsd with ``points`` (cooldown
        start, end, peak; default: the run's own)."""
        if self.schedule_points is None:
            return float(self.schedule(count))
        return float(self._wsd_rate(count, self.schedule_points if points is None else points))

    @functools.cached_property
    def _wsd_rate(self):
        """The wsd rate function of this run's optimizer (built once: the loop asks at every logged step)."""
        from archlab.train.optim import warmup_steps, wsd_rate

        return wsd_rate(self.cfg.optimizer, warmup_steps(self.cfg.optimizer, self.plan.total_steps,
                                                         self.plan.tokens_per_step))

    @functools.cached_property
    def branches(self):
        """``run.branches`` planned for the real vocabulary (``train.branches.Branch``)."""
        from archlab.train.branches import plan_branches

        return plan_branches(self.cfg, self.tokenizer.vocab_size)

    @property
    def model(self):
        """The network with the current parameters."""
        from flax import nnx

        return nnx.merge(self.graphdef, self.state.params)

    # -- checkpoints -------------------------------------------------------------------------

    def load(self, checkpoints, step: int | None = None, *, set_aside: bool = False):
        """Restore ``step`` (None: the newest one that verifies) into ``self.state``; returns orbax's ``Restored``.

        ``set_aside`` renames the corrupt steps skipped on the way (only for the run that owns the
        directory: ``Checkpointer.restore``).
        """
        from archlab.train.state import abstract_like, from_checkpoint, to_checkpoint

        try:
            restored = checkpoints.restore(step, abstract_like(to_checkpoint(self.state)), set_aside=set_aside)
        except CheckpointError:
            raise
        except (ValueError, KeyError, TypeError) as error:
            raise CheckpointError(
                f"checkpoint step {step} in {checkpoints.directory} does not match its saved config "
                f"({str(error).splitlines()[0]})"
            ) from error
        self.state = self.mesh.place(from_checkpoint(restored.state, self.state))
        return restored

    @classmethod
    def for_run(cls, run_dir: str | Path, *, data: DataConfig | None = None) -> Trainer:
        """The run saved in ``run_dir``, built from its own config, its state still abstract (``load`` fills it).

        ``data`` evaluates on other text through the run's tokenizer, rows and objective.
        """
        from archlab.train.run_dir import TOKENIZER_FILE

        run_dir = Path(run_dir)
        # Read by this one process on its devices, whatever mesh and processes trained it (orbax reshards).
        cfg = dataclasses.replace(load_run_config(run_dir), mesh=MeshConfig(), distributed=DistributedConfig(cluster="none"))
        if data is not None:
            cfg = dataclasses.replace(
                cfg, data=dataclasses.replace(data, vocab_size=cfg.data.vocab_size, seq_len=cfg.data.seq_len)
            )
        trainer = cls(cfg, tokenizer_file=run_dir / TOKENIZER_FILE, abstract=True)
        trainer.run_dir = run_dir
        return trainer

    @classmethod
    def restore(cls, run_dir: str | Path, step: int | None = None, *, data: DataConfig | None = None) -> "Trainer":
        """The run saved in ``run_dir`` at ``step`` (None: the newest step that verifies), from its own config.

        ``data`` evaluates on other text through the run's tokenizer, rows and objective.
        ``trainer.restored_step`` says which step was loaded. Corrupt steps are skipped with a
        warning but never moved: a reader leaves the run directory as it is.
        """
        from archlab.train.checkpoint import Checkpointer

        trainer = cls.for_run(run_dir, data=data)
        restored = trainer.load(Checkpointer(Path(run_dir) / "checkpoints", async_save=False), step)
        trainer.restored_step = restored.step
        return trainer
