"""Cooldown branches on a constant-rate trunk (Hägele et al. 2024): one trunk per model size at
the peak learning rate, forking at each budget ``b`` in ``run.branches`` when it reaches
``b``'s cooldown start, cooling the fork down to ``b`` and recording it as the separate
``optimizer.schedule=wsd`` run to ``b`` would be recorded. The trunk and every branch share one
compiled step (the cooldown's start and end enter as values), read the same batches (data order
is a function of (seed, step)) and so equal the separate runs bitwise on the CPU.

A branch lives in ``<run>/branches/<name>/`` (``C1e+12`` for FLOPs, ``D2000000`` for tokens):
``config.yaml`` (the separate run's config), ``summary.json`` (the same keys a run writes, plus
the continuation score and where it forked), ``metrics.jsonl`` (the trunk's rows up to the fork,
then its own) and, with ``run.branch_checkpoints``, ``checkpoints/<step>/``. It is written under
a temporary name and renamed when complete, so a killed branch leaves nothing that looks done;
the resumed trunk (checkpointed at every fork) recomputes it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from archlab.errors import ConfigError
from archlab.schema import TrainConfig

log = logging.getLogger(__name__)

BRANCHES_DIR = "branches"


@dataclass(frozen=True)
class Branch:
    """One budget of ``run.branches``: the separate run it equals and where it leaves the trunk."""

    name: str
    budget: float
    cfg: TrainConfig  # the separate optimizer.schedule=wsd run to this budget
    total_steps: int
    fork_step: int  # the trunk step after which it forks (its cooldown's first update count)

    @property
    def points(self) -> tuple[float, float, float]:
        """The wsd step's ``(cooldown start, end, peak rate)``: the separate run's own."""
        return self.fork_step, self.total_steps, self.cfg.optimizer.lr

    def directory(self, run_dir: Path) -> Path:
        return Path(run_dir) / BRANCHES_DIR / self.name


def budget_key(cfg: TrainConfig) -> str:
    """``flops`` or ``tokens``: the run budget whose unit ``run.branches`` is in."""
    if cfg.run.flops is not None:
        return "flops"
    if cfg.run.tokens is not None:
        return "tokens"
    raise ConfigError("run.branches are budgets in run.flops's or run.tokens's unit; set one of them (the trunk's)")


def plan_branches(cfg: TrainConfig, vocab_size: int) -> list[Branch]:
    """Every branch of ``cfg`` with its steps, refused in one line if it cannot be a branch."""
    from archlab.train.optim import cooldown_start, warmup_steps
    from archlab.train.setup import make_plan

    budgets = list(cfg.run.branches)
    if not budgets:
        return []
    opt = cfg.optimizer
    if opt.schedule != "wsd":
        raise ConfigError(f"run.branches needs optimizer.schedule=wsd (a constant-rate trunk), not {opt.schedule}")
    if opt.warmup_tokens is None:
        raise ConfigError("run.branches needs optimizer.warmup_tokens: a warmup fraction would differ between budgets")
    key = budget_key(cfg)
    trunk_budget = float(getattr(cfg.run, key))
    if any(not math.isfinite(b) or b <= 0 for b in budgets):
        raise ConfigError(f"run.branches must be positive, finite budgets, got {budgets}")
    if any(b >= c for b, c in zip(budgets, budgets[1:])):
        raise ConfigError(f"run.branches must be strictly increasing, got {budgets}")
    if budgets[-1] > trunk_budget:
        raise ConfigError(f"run.branches: {budgets[-1]:g} is beyond the trunk's budget run.{key}={trunk_budget:g}")
    branches = []
    for budget in budgets:
        name = f"C{budget:g}" if key == "flops" else f"D{budget:g}"
        run = dataclasses.replace(cfg.run, branches=[], name=f"{cfg.run.name}-{name}",
                                  **{key: budget if key == "flops" else int(budget)})
        separate = dataclasses.replace(cfg, run=run)
        plan = make_plan(separate, vocab_size)
        warmup = warmup_steps(opt, plan.total_steps, plan.tokens_per_step)
        start = cooldown_start(opt, plan.total_steps, warmup)
        if start < opt.warmup_tokens // plan.tokens_per_step:
            raise ConfigError(
                f"run.branches: the branch at {budget:g} ({plan.total_steps} updates) is shorter than the warmup "
                f"({opt.warmup_tokens // plan.tokens_per_step} updates) and its cooldown"
            )
        branches.append(Branch(name, budget, separate, plan.total_steps, start))
    for a, b in zip(branches, branches[1:]):
        if a.total_steps > b.fork_step:
            raise ConfigError(
                f"run.branches: the cooldowns of {a.budget:g} (updates {a.fork_step}-{a.total_steps}) and "
                f"{b.budget:g} (from update {b.fork_step}) overlap"
            )
    return branches


def is_done(branch: Branch, run_dir: Path) -> bool:
    return (branch.directory(run_dir) / "summary.json").is_file()


def check_reachable(branches: list[Branch], run_dir: Path, trunk_step: int) -> None:
    """Refuse a branch the trunk, at ``trunk_step``, has already passed without running it."""
    for branch in branches:
        if branch.fork_step < trunk_step and not is_done(branch, run_dir):
            raise ConfigError(
                f"run.branches: {branch.name} forks after update {branch.fork_step}, but the trunk resumes at step "
                f"{trunk_step}; a trunk is extended only by branches that fork after its end"
            )


def run_branch(trainer, branch: Branch, data_state: dict, run_dir: Path, val_batches: list[dict]) -> dict:
    """Cool a copy of the trunk (at ``branch.fork_step``) down to the branch's budget; write its record."""
    import jax
    import jax.numpy as jnp

    from archlab.train.skips import SkipWatch

    record = BranchRecord(trainer, branch, run_dir)
    state = jax.tree.map(jnp.copy, trainer.state)  # the trunk goes on from its own buffers
    data = trainer.iterator()
    data.set_state(data_state)
    points = jnp.asarray(branch.points, jnp.float32)
    run = branch.cfg.run
    skips = (SkipWatch(run.max_skips_in_a_row, int(state.skipped), [branch.name])
             if run.on_nonfinite == "skip" else None)
    for step in range(branch.fork_step + 1, branch.total_steps + 1):
        state, metrics = trainer.train_step(state, trainer.device_batch(next(data)), points)
        if skips is not None:
            skips.after(step, int(state.skipped))
        record.log_step(step, metrics)
    return record.finish(state, data, trainer.evaluate(val_batches, params=state.params))


class BranchRecord:
    """A branch's run directory while it is written: under a temporary name until ``finish``."""

    def __init__(self, trainer, branch: Branch, run_dir: Path):
        from archlab.train.setup import make_plan
        from archlab.train.tracking import METRICS_FILE, Tracker

        self.trainer, self.branch, self.run_dir = trainer, branch, Path(run_dir)
        self.final_dir = branch.directory(run_dir)
        self.work = self.final_dir.with_name(f".{branch.name}.partial")
        if self.work.exists():
            shutil.rmtree(self.work)  # a killed attempt's leftovers: recomputed from the fork, bitwise
        self.work.mkdir(parents=True)
        _copy_trunk_rows(self.run_dir / METRICS_FILE, self.work / METRICS_FILE, branch.fork_step)
        self.plan = make_plan(branch.cfg, trainer.tokenizer.vocab_size)
        self.tracker = Tracker(self.work, backend="none", project="", group=None, name=branch.cfg.run.name, tags=[],
                               job_type="train", config={})

    def log_step(self, step: int, metrics: dict, member: int | None = None) -> None:
        """The train row of ``step`` (of one member's slice of packed metrics when ``member`` is given)."""
        if step % self.branch.cfg.run.log_every and step != self.branch.total_steps:
            return
        pick = (lambda v: v) if member is None else (lambda v: v[member])  # noqa: E731
        self.tracker.log({"train/loss": float(pick(metrics["loss"])), "train/grad_norm": float(pick(metrics["grad_norm"])),
                          "train/lr": self.trainer.learning_rate(step - 1, self.branch.points),
                          "tokens": step * self.plan.tokens_per_step,
                          "flops": step * self.plan.train_flops_per_step}, step)

    def finish(self, state, data, metrics: dict[str, float]) -> dict:
        """Evaluate and write everything, then give the directory its final name; returns the summary."""
        from archlab.train.checkpoint import Checkpointer
        from archlab.train.state import to_checkpoint
        from archlab.trainer import config_dict

        branch, plan, work = self.branch, self.plan, self.work
        if int(state.first_nonfinite_step) >= 0 and branch.cfg.run.on_nonfinite == "stop":
            raise ConfigError(f"branch {branch.name}: non-finite loss or gradients at step "
                              f"{int(state.first_nonfinite_step) + 1}")
        metrics = {**metrics, **_continuation(self.trainer, state)}
        self.tracker.log({**metrics, "tokens": branch.total_steps * plan.tokens_per_step,
                          "flops": branch.total_steps * plan.train_flops_per_step}, branch.total_steps)
        corpus = self.trainer.corpus
        summary = {**plan.derived(), "unigram_entropy_nats": corpus.unigram_entropy_nats,
                   "bytes_per_token_validation": corpus.bytes_per_token_validation, **metrics,
                   "step": branch.total_steps, "skipped_updates": int(state.skipped),
                   "branch_of": str(self.run_dir), "fork_step": branch.fork_step}
        self.tracker.summary(summary)
        self.tracker.finish()
        (work / "config.yaml").write_text(yaml.safe_dump(config_dict(branch.cfg), sort_keys=False))
        shutil.copy(self.run_dir / "tokenizer.json", work / "tokenizer.json")
        if branch.cfg.run.branch_checkpoints:
            with Checkpointer(work / "checkpoints", async_save=False) as checkpoints:
                checkpoints.save(branch.total_steps, to_checkpoint(state), data=data.get_state(),
                                 meta={"tokens": branch.total_steps * plan.tokens_per_step,
                                       "seed": branch.cfg.run.seed, "branch_of": str(self.run_dir)})
        if self.final_dir.exists():  # never overwrite a finished branch: it is set aside, not deleted
            self.final_dir.rename(self.final_dir.with_name(f"{branch.name}.replaced-{time.time_ns()}"))
        work.rename(self.final_dir)
        log.info("branch %s: val/loss %.4f after %d updates (forked at %d)", branch.name, metrics["val/loss"],
                 branch.total_steps, branch.fork_step)
        return summary


def _continuation(trainer, state) -> dict[str, float]:
    """The scaling study's continuation score (generative families) of the branch's parameters."""
    from flax import nnx

    from archlab.scaling.continuation import GENERATIVE_FAMILIES, model_continuation_score

    if trainer.cfg.model.family not in GENERATIVE_FAMILIES:
        return {}
    try:
        score = model_continuation_score(nnx.merge(trainer.graphdef, state.params), trainer.tokenizer, trainer.cfg)
    except ConfigError as why:  # a corpus or length that cannot give the windows: no score
        log.warning("no continuation score: %s", why)
        return {}
    return {"continuation/bits_per_byte": score.bits_per_byte, "continuation/nats_per_token": score.nats_per_token}


def _copy_trunk_rows(source: Path, target: Path, last_step: int) -> None:
    rows = []
    if source.is_file():
        for line in source.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= last_step:
                    rows.append(line)
            except ValueError:
                continue  # a torn line of a killed run
    target.write_text("".join(f"{row}\n" for row in rows))
