"""Many members per process: M runs of one shape (their own learning rates and/or seeds) trained
at once, ``vmap`` over the stacked parameter and optimizer trees, each member with its own
schedule, initialisation and data order, each written as the separate run it stands for.

Small models leave a CPU (or a GPU) idle between tiny matrix products; packing M of them into one
program amortises the per-step overhead and makes the products M times larger. A member's run
directory, ``<run>/members/<member run.name>/``, holds what ``archlab-train`` would have written for
it alone (``config.yaml``, ``tokenizer.json``, ``metrics.jsonl``, ``summary.json``,
``checkpoints/``, and ``branches/`` with ``run.branches``), so ``archlab-eval``, the scaling
records and a resume read it as any run. Values equal the separate runs' up to the reordering of
floating-point sums that batching the products brings (``tests/test_members.py``: 1e-5 relative).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import yaml

from archlab.errors import ConfigError
from archlab.schema import TrainConfig

log = logging.getLogger(__name__)

MEMBERS_DIR = "members"
MEMBER_KEYS = ("seed", "lr")  # what may differ between members: the shape and the batch may not


def member_configs(cfg: TrainConfig) -> list[TrainConfig]:
    """Each member's own config (``run.members`` entries applied to the pack's), refused in one line
    if a member is not a dict of ``seed`` / ``lr`` or two members are the same run."""
    if not cfg.run.members:
        return []
    if cfg.optimizer.schedule != "wsd":
        raise ConfigError(
            f"run.members needs optimizer.schedule=wsd (its rates are values in one program), not {cfg.optimizer.schedule}"
        )
    if cfg.model.has_dropout:
        raise ConfigError("run.members trains without dropout (its members share one vmapped step); set the "
                          "model.*_dropout rates to 0 or train the runs separately")
    members = []
    for i, member in enumerate(cfg.run.members):
        if not isinstance(member, dict) or not member or set(member) - set(MEMBER_KEYS):
            raise ConfigError(f"run.members[{i}] must set seed and/or lr (e.g. {{seed: 1, lr: 3e-3}}), got {member!r}")
        seed, lr = int(member.get("seed", cfg.run.seed)), float(member.get("lr", cfg.optimizer.lr))
        if not math.isfinite(lr) or lr <= 0:
            raise ConfigError(f"run.members[{i}].lr must be a positive number, got {lr}")
        if not 0 <= seed < 2**32:
            raise ConfigError(f"run.members[{i}].seed must be in [0, 2**32), got {seed}")
        name = f"{cfg.run.name}-lr{lr:g}-s{seed}"
        run = dataclasses.replace(cfg.run, members=[], seed=seed, name=name)
        members.append(dataclasses.replace(cfg, run=run, optimizer=dataclasses.replace(cfg.optimizer, lr=lr)))
    names = [m.run.name for m in members]
    if len(set(names)) < len(names):
        raise ConfigError(f"run.members repeats a member: {', '.join(sorted(n for n in names if names.count(n) > 1))}")
    return members


def _stack(trees: list):
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def _member(tree, i: int):
    return jax.tree.map(lambda leaf: leaf[i], tree)


class Pack:
    """The members' trainers (one shape, one shared corpus) and their vmapped steps."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, tokenizer_file: Path | None):
        from archlab.train.step import make_eval_step, make_train_step
        from archlab.trainer import Trainer

        self.cfgs = member_configs(cfg)
        first = Trainer(self.cfgs[0], tokenizer_file=tokenizer_file)
        # One tokenized corpus for every member; each draws its own parameters from its own seed.
        self.trainers = [first, *(Trainer(c, corpus=first.corpus) for c in self.cfgs[1:])]
        self.plan, self.corpus = first.plan, first.corpus
        self.dirs = [Path(run_dir) / MEMBERS_DIR / c.run.name for c in self.cfgs]
        self.state = _stack([t.state for t in self.trainers])
        self.points = jnp.stack([jnp.asarray(t.schedule_points) for t in self.trainers])
        run = cfg.run
        update = make_train_step(
            first.graphdef, first.tx, grad_accum_steps=cfg.optimizer.grad_accum_steps,
            skip_nonfinite=run.on_nonfinite == "skip", inject_nan_at_step=run.inject_nan_at_step,
            inject_nan_into=run.inject_nan_into, jit=False,
        )
        self.train_step = jax.jit(jax.vmap(update), donate_argnums=(0,))
        self.run_dir = Path(run_dir)
        self.eval_step = jax.jit(jax.vmap(make_eval_step(first.graphdef, jit=False)))
        self.iterators = [t.iterator() for t in self.trainers]
        self.val_batches = [_stack(list(batches)) for batches in
                            zip(*(t.validation_batches() for t in self.trainers))]

    def device_batch(self, batches: list[dict]) -> dict:
        """The members' host batches stacked on a leading member axis (then micro-batches, then rows)."""
        accum = self.cfgs[0].optimizer.grad_accum_steps
        stacked = _stack(batches)
        if accum > 1:
            stacked = {k: v.reshape(v.shape[0], accum, -1, *v.shape[2:]) for k, v in stacked.items()}
        return self.trainers[0].mesh.shard_batch(stacked, leading_axes=2 if accum > 1 else 1)

    def step(self, points=None) -> dict:
        batches = [next(iterator) for iterator in self.iterators]
        self.state, metrics = self.train_step(self.state, self.device_batch(batches),
                                              self.points if points is None else points)
        return metrics

    def evaluate(self, params=None) -> list[dict[str, float]]:
        """Each member's validation metrics, on its own validation batches."""
        from archlab.train.metrics import Aggregate, eval_metrics

        params = self.state.params if params is None else params
        totals = [Aggregate() for _ in self.trainers]
        for batch in self.val_batches:
            sums = jax.device_get(self.eval_step(params, batch))
            for i, total in enumerate(totals):
                total.add({k: v[i] for k, v in sums.items()})
        return [eval_metrics(t, self.corpus.bytes_per_token_validation, prefix="val") for t in totals]


def train_members(cfg: TrainConfig, run_dir: Path) -> dict:
    """Train (or resume) every member of ``cfg.run.members`` in ``run_dir``; returns their summaries."""
    from archlab.train import branches, run_dir as run_files
    from archlab.train.checkpoint import Checkpointer, restore_together, set_aside_dirs
    from archlab.train.loop import StopRequested
    from archlab.train.metrics import progress_bar
    from archlab.train.skips import SkipWatch
    from archlab.train.state import from_checkpoint, to_checkpoint, abstract_like
    from archlab.train.run_end import log_run_end
    from archlab.train.tracking import Tracker, wandb_options
    from archlab.trainer import config_dict

    recorded = config_dict(cfg)
    restart = cfg.run.restart and run_dir.is_dir() and any(run_dir.iterdir())
    if not restart:
        run_files.check_resumable(run_dir, recorded)
        for member in member_configs(cfg):
            run_files.check_resumable(Path(run_dir) / MEMBERS_DIR / member.run.name, config_dict(member))
    pack = Pack(cfg, run_dir, None if restart else run_files.saved_tokenizer(run_dir))
    if restart:  # after every check and the data: only now is the old run moved aside
        run_files.restart_in_place(run_dir)
    plan, total = pack.plan, pack.plan.total_steps
    with run_files.RunLock(run_dir), run_files.log_to_file(run_dir), StopRequested() as stop:
        run_files.write_once(run_dir, recorded, pack.corpus.tokenizer)
        checkpointers = []
        for trainer, member_dir in zip(pack.trainers, pack.dirs):
            member_dir.mkdir(parents=True, exist_ok=True)
            run_files.write_once(member_dir, config_dict(trainer.cfg), pack.corpus.tokenizer)
            checkpointers.append(Checkpointer(member_dir / "checkpoints", max_to_keep=cfg.run.keep_checkpoints,
                                              keep_set_aside=cfg.run.keep_set_aside))
        steps = [c.latest_step() for c in checkpointers]
        if any(s is not None for s in steps):
            common = min(s or 0 for s in steps)
            if common:  # every member restored at the newest step that verifies in all of them
                likes = [_member(pack.state, i) for i in range(len(checkpointers))]
                restored = restore_together(checkpointers, [abstract_like(to_checkpoint(x)) for x in likes], common)
                for i, r in enumerate(restored):
                    pack.iterators[i].set_state(r.data)
                pack.state = _stack([from_checkpoint(r.state, like) for r, like in zip(restored, likes)])
        start = int(pack.state.step[0])
        trackers = [Tracker(d, backend=cfg.logger.backend, project=cfg.logger.project,
                            group=cfg.logger.group or cfg.experiment, name=c.run.name,
                            tags=[plan.model.family, cfg.objective.name, cfg.size_name, "member", *cfg.logger.tags],
                            job_type="train", config=config_dict(c), mode=cfg.logger.mode, resume_step=start,
                            entity=cfg.logger.entity, online_timeout=cfg.logger.online_timeout,
                            **wandb_options(cfg.logger, run_dir))  # the trunk's experiment folder
                    for c, d in zip(pack.cfgs, pack.dirs)]
        derived = {**plan.derived(), "unigram_entropy_nats": pack.corpus.unigram_entropy_nats,
                   "bytes_per_token_validation": pack.corpus.bytes_per_token_validation, "members": len(pack.cfgs)}
        for tracker, checkpoints in zip(trackers, checkpointers):
            tracker.summary({**derived, "set_aside": set_aside_dirs(checkpoints.directory)})

        def save(step: int) -> None:
            for i, checkpoints in enumerate(checkpointers):
                checkpoints.save(step, to_checkpoint(_member(pack.state, i)), data=pack.iterators[i].get_state(),
                                 meta={"tokens": step * plan.tokens_per_step, "seed": pack.cfgs[i].run.seed})

        finals: list[dict] = [{} for _ in pack.cfgs]
        pending = [i for i, b in enumerate(pack.trainers[0].branches)
                   if not all(branches.is_done(t.branches[i], d) for t, d in zip(pack.trainers, pack.dirs))]

        def fork(step: int) -> None:
            due = [i for i in pending if pack.trainers[0].branches[i].fork_step == step]
            if due and step > start and step % cfg.run.checkpoint_every and step != total:
                save(step)  # a branch killed midway is recomputed from here
            for i in due:
                run_packed_branch(pack, i)

        fork(start)
        bar = progress_bar(cfg.run.progress, start, total)
        window, stopped = time.perf_counter(), False
        skips = (SkipWatch(cfg.run.max_skips_in_a_row, jax.device_get(pack.state.skipped),
                           [c.run.name for c in pack.cfgs]) if cfg.run.on_nonfinite == "skip" else None)
        for step in range(start + 1, total + 1):
            metrics = pack.step()
            if skips is not None:
                skips.after(step, jax.device_get(pack.state.skipped), checkpointers[0].latest_step)
            if step % cfg.run.log_every == 0 or step == total:
                loss, norm = jax.device_get((metrics["loss"], metrics["grad_norm"]))
                elapsed = time.perf_counter() - window
                for i, (tracker, trainer) in enumerate(zip(trackers, pack.trainers)):
                    tracker.log({"train/loss": float(loss[i]), "train/grad_norm": float(norm[i]),
                                 "train/lr": trainer.learning_rate(step - 1),
                                 "train/tokens_per_s": min(cfg.run.log_every, step - start) * plan.tokens_per_step
                                 / elapsed, "tokens": step * plan.tokens_per_step,
                                 "flops": step * plan.train_flops_per_step}, step)
                window = time.perf_counter()
            bar.update(1)
            if step % cfg.run.eval_every == 0 or step == total:
                for i, (tracker, values) in enumerate(zip(trackers, pack.evaluate())):
                    tracker.log({**values, "tokens": step * plan.tokens_per_step,
                                 "flops": step * plan.train_flops_per_step}, step)
                    finals[i].update(values)
            if step % cfg.run.checkpoint_every == 0 or step == total:
                save(step)
            fork(step)
            if (stop.signal_name or step == cfg.run.stop_at_step) and step < total:
                if step % cfg.run.checkpoint_every:
                    save(step)
                stopped = True
                break
        bar.close()
        for checkpoints in checkpointers:
            checkpoints.close()
        for i, tracker in enumerate(trackers):
            if not stopped:
                tracker.summary({**finals[i], "step": int(pack.state.step[i]),
                                 "skipped_updates": int(pack.state.skipped[i]),
                                 "unigram_entropy_nats": pack.corpus.unigram_entropy_nats,
                                 "set_aside": set_aside_dirs(checkpointers[i].directory)})
            step_i = int(pack.state.step[i])
            log_run_end(tracker, pack.dirs[i], step_i, val_loss=finals[i].get("val/loss"),
                        log_checkpoint=cfg.logger.log_checkpoints and not stopped,
                        checkpoint_dir=checkpointers[i].directory / str(step_i))
            tracker.finish()
    (Path(run_dir) / "members.yaml").write_text(yaml.safe_dump([c.run.name for c in pack.cfgs]))
    return {c.run.name: f for c, f in zip(pack.cfgs, finals)}


def run_packed_branch(pack: Pack, index: int) -> None:
    """Branch ``index`` of every member at once: one vmapped cooldown from a copy of the packed trunk."""
    from archlab.train.branches import BranchRecord
    from archlab.train.skips import SkipWatch

    due = [t.branches[index] for t in pack.trainers]
    records = [BranchRecord(t, b, d) for t, b, d in zip(pack.trainers, due, pack.dirs)]
    state = jax.tree.map(jnp.copy, pack.state)
    iterators = []
    for trainer, trunk_iterator in zip(pack.trainers, pack.iterators):
        iterators.append(trainer.iterator())
        iterators[-1].set_state(trunk_iterator.get_state())
    points = jnp.stack([jnp.asarray(b.points, jnp.float32) for b in due])
    run = due[0].cfg.run
    skips = (SkipWatch(run.max_skips_in_a_row, jax.device_get(state.skipped), [b.cfg.run.name for b in due])
             if run.on_nonfinite == "skip" else None)
    for step in range(due[0].fork_step + 1, due[0].total_steps + 1):
        state, metrics = pack.train_step(state, pack.device_batch([next(it) for it in iterators]), points)
        if skips is not None:
            skips.after(step, jax.device_get(state.skipped))
        if step % due[0].cfg.run.log_every == 0 or step == due[0].total_steps:
            metrics = jax.device_get(metrics)
            for i, record in enumerate(records):
                record.log_step(step, metrics, member=i)
    for i, (record, values) in enumerate(zip(records, pack.evaluate(state.params))):
        record.finish(_member(state, i), iterators[i], values)
