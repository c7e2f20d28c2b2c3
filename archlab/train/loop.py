"""The training loop: build, resume, step, evaluate, checkpoint, log; stop cleanly on signals."""

from __future__ import annotations

import logging
import signal
import time
from pathlib import Path

from contextlib import nullcontext
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from tqdm.contrib.logging import logging_redirect_tqdm

from archlab.accounting import device_peak_flops
from archlab.errors import ArchlabError, NonFiniteError
from archlab.samples import sample_continuations, validation_prompts
from archlab.schema import TrainConfig
from archlab.train import branches, console, distributed, run_dir as run_files
from archlab.train.checkpoint import Checkpointer, committed_steps, set_aside_dirs
from archlab.train.metrics import progress_bar
from archlab.train.skips import SkipWatch
from archlab.train.state import TrainState, to_checkpoint
from archlab.train.step import NONFINITE_KINDS
from archlab.train.run_end import SAMPLE_COLUMNS, log_run_end
from archlab.train.tracking import QuietTracker, Tracker, new_run_id, wandb_options

log = logging.getLogger(__name__)

# run.samples: greedy continuations of this many tokens after each validation document's opening.
SAMPLE_PROMPT_TOKENS, SAMPLE_NEW_TOKENS = 16, 32


class StopRequested:
    """SIGTERM/SIGINT set a flag; the loop checkpoints at the next step boundary and exits (code 0).

    A second signal is handled as it would be without this class (SIGINT raises
    KeyboardInterrupt, SIGTERM terminates), for a user who cannot wait for the checkpoint.
    """

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopRequested":
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame) -> None:
        if self.signal_name is not None:
            self.__exit__()
            signal.raise_signal(signum)
            return
        self.signal_name = signal.Signals(signum).name
        log.warning("%s received: checkpointing after the current step, then exiting (send it again to stop now)",
                    self.signal_name)

    def __exit__(self, *exc) -> None:
        previous, self._previous = self._previous, {}
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def train(cfg: TrainConfig, run_dir: Path) -> dict:
    """Train (or resume) the run in ``run_dir``; returns the final summary."""
    from archlab.trainer import Trainer, check_config, config_dict, resolved

    distributed.check_launch(cfg)  # refused before joining: a refused process would leave its peers waiting
    distributed.initialize(cfg.distributed)  # before anything asks JAX for its devices
    cfg = resolved(cfg)
    check_config(cfg)  # budget, lengths and objective options refused before any data is read
    from archlab.train.memory import check_memory
    from archlab.train.setup import make_plan

    check_memory(cfg, make_plan(cfg, cfg.data.vocab_size))  # an impossible size, before anything is allocated
    if cfg.run.members:
        from archlab.train.members import train_members

        return train_members(cfg, run_dir)
    recorded = config_dict(cfg)
    restart = cfg.run.restart and run_dir.is_dir() and any(run_dir.iterdir())
    if not restart:
        run_files.check_resumable(run_dir, recorded)  # refused before any data is read
    newest = 0 if restart else max(committed_steps(run_dir / "checkpoints"), default=0)
    # model.init_from's weights are read only for a run that starts at step 0.
    trainer = Trainer(cfg, tokenizer_file=None if restart else run_files.saved_tokenizer(run_dir),
                      init_weights=newest == 0)
    # Before anything is written: an extended trunk's new branches must fork after its newest step.
    branches.check_reachable(trainer.branches, run_dir, newest)
    val_batches = trainer.validation_batches()
    # Every process built its own tokenizer and rows from the same text: they must be the same.
    distributed.check_same(trainer.tokenizer.id, "tokenizer")
    primary = distributed.is_primary()  # only process 0 writes the run directory
    if restart:  # every check passed and the data is read: only now is the old run moved aside
        distributed.barrier("read-old-run")
        if primary:
            run_files.restart_in_place(run_dir)
    with (run_files.RunLock(run_dir) if primary else nullcontext()), \
            (run_files.log_to_file(run_dir) if primary else nullcontext()):
        if primary:
            run_files.write_once(run_dir, recorded, trainer.corpus.tokenizer)
        distributed.barrier("run-dir-written")
        with StopRequested() as stop:
            return _train_locked(trainer, run_dir, val_batches, recorded, stop)


def _train_locked(trainer, run_dir: Path, val_batches: list[dict], recorded: dict, stop: StopRequested) -> dict:
    cfg, plan, corpus = trainer.cfg, trainer.plan, trainer.corpus
    data = trainer.iterator()
    checkpoints = Checkpointer(run_dir / "checkpoints", max_to_keep=cfg.run.keep_checkpoints,
                               keep_set_aside=cfg.run.keep_set_aside)
    meta: dict = {}
    if checkpoints.latest_step() is not None:
        # Corrupt newer steps are set aside, so the steps recomputed from here are saved afresh.
        restored = trainer.load(checkpoints, set_aside=True)
        resumed = trainer.state
        if cfg.run.on_nonfinite == "stop" and int(resumed.first_nonfinite_step) >= 0:
            # Updates skipped earlier under run.on_nonfinite=skip: watch for new ones from here.
            resumed = resumed.replace(first_nonfinite_step=jnp.full((), -1, jnp.int32),
                                      nonfinite_kind=jnp.zeros((), jnp.int32))
        trainer.state = trainer.mesh.place(resumed)
        data.set_state(restored.data)
        meta = dict(restored.meta)
        log.info("resumed from step %d in %s", restored.step, run_dir)
    start_step = int(trainer.state.step)
    branches.check_reachable(trainer.branches, run_dir, start_step)  # a fallback to an older step passes

    derived = {**plan.derived(), "unigram_entropy_nats": corpus.unigram_entropy_nats,
               "bytes_per_token_validation": corpus.bytes_per_token_validation}
    # The W&B run id is fixed on the first launch (before any checkpoint holds it), so a run
    # killed before its first checkpoint still continues the same W&B run.
    run_id = meta.get("wandb_run_id")
    if not distributed.is_primary():
        return _run_steps(trainer, _Run(run_dir, data, val_batches, checkpoints, QuietTracker(), stop, derived,
                                        start_step))
    if run_id is None and cfg.logger.backend == "wandb":
        run_id = run_files.wandb_run_id(run_dir, new_run_id)
    tracker = Tracker(
        run_dir, backend=cfg.logger.backend, project=cfg.logger.project, group=cfg.logger.group or cfg.experiment,
        name=cfg.run.name, tags=[plan.model.family, cfg.objective.name, cfg.size_name, *cfg.logger.tags],
        job_type="train", config={**recorded, "derived": derived}, mode=cfg.logger.mode,
        # Rows after the resumed step (all rows, from step 0) are a killed run's tail: dropped.
        run_id=run_id, resume_step=start_step, entity=cfg.logger.entity,
        online_timeout=cfg.logger.online_timeout, **wandb_options(cfg.logger, run_dir),
    )
    return _run_steps(trainer, _Run(run_dir, data, val_batches, checkpoints, tracker, stop, derived, start_step))


def _run_steps(trainer, run: _Run) -> dict:
    """``_steps``, and on any error: the reason in the summary, W&B marked failed, a pending save let commit."""
    tracker, checkpoints = run.tracker, run.checkpoints
    try:
        # Log lines are written above the progress bar, not through it.
        with logging_redirect_tqdm() if trainer.cfg.run.progress else nullcontext():
            return _steps(trainer, run)
    except BaseException as error:
        if isinstance(error, ArchlabError):  # a non-finite stop, a skip limit: the run tables show why
            tracker.summary({"stopped": str(error)})
        # Let a good checkpoint still being written commit; mark the W&B run failed.
        tracker.finish(exit_code=1)
        try:
            checkpoints.close()
        except Exception as error:  # the first error is the one to report
            log.warning("while stopping after an error, a pending checkpoint failed: %s", error)
        raise


@dataclass
class _Run:
    """What the step loop drives besides the trainer."""

    run_dir: Path
    data: object  # the grain iterator
    val_batches: list[dict]
    checkpoints: Checkpointer
    tracker: Tracker
    stop: StopRequested
    derived: dict
    start_step: int


def _steps(trainer, run: _Run) -> dict:
    cfg, plan, corpus = trainer.cfg, trainer.plan, trainer.corpus
    tracker, checkpoints, start_step = run.tracker, run.checkpoints, run.start_step
    # On a resume the same values (an extended trunk's new budget), and what the resume set aside.
    start = {**run.derived, "set_aside": set_aside_dirs(checkpoints.directory)}
    if tracker.summary_value("stopped"):
        start["stopped"] = None  # a launch after a stop: the old reason no longer describes the run
    tracker.summary(start)
    peak = device_peak_flops() * jax.device_count()
    pending = [b for b in trainer.branches if not branches.is_done(b, run.run_dir)]
    run_start = time.perf_counter()
    console.log_lines(console.start_block(
        run_dir=run.run_dir, family=plan.model.family, objective=cfg.objective.name, size=cfg.size_name,
        derived=run.derived, seq_len=cfg.data.seq_len, batch_size=cfg.run.batch_size,
        devices=f"{jax.device_count()} x {jax.devices()[0].device_kind}, mesh {trainer.mesh.describe()}",
        start_step=start_step,
        init_from=cfg.model.init_from))

    def evaluate(step: int) -> dict[str, float]:
        began = time.perf_counter()
        metrics = trainer.evaluate(run.val_batches)
        tracker.log({**metrics, "tokens": step * plan.tokens_per_step, "flops": step * plan.train_flops_per_step}, step)
        console.log_evaluation(step, plan.total_steps, metrics, time.perf_counter() - began)
        return metrics

    def save(step: int) -> None:
        _raise_if_nonfinite(trainer.state, cfg, checkpoints)
        meta_now = {"wandb_run_id": tracker.run_id, "tokens": step * plan.tokens_per_step, "seed": cfg.run.seed}
        checkpoints.save(step, to_checkpoint(trainer.state), data=run.data.get_state(), meta=meta_now)

    def fork(step: int) -> None:
        """Run the branches that leave the trunk after ``step``, the trunk checkpointed there first."""
        due = [b for b in pending if b.fork_step == step]
        if not due:
            return
        _raise_if_nonfinite(trainer.state, cfg, checkpoints)
        if step > start_step and step % cfg.run.checkpoint_every and step != plan.total_steps:
            save(step)  # a branch killed midway is recomputed from here
        for branch in due:
            val_loss = branches.run_branch(trainer, branch, run.data.get_state(), run.run_dir, run.val_batches)["val/loss"]
            summary[f"{branch.name}/val/loss"] = val_loss
            console.log_branch(branch.name, val_loss)

    summary: dict = {}
    fork(start_step)
    bar = progress_bar(cfg.run.progress and distributed.is_primary(), start_step, plan.total_steps)
    skips = (SkipWatch(cfg.run.max_skips_in_a_row, int(trainer.state.skipped))
             if cfg.run.on_nonfinite == "skip" else None)
    window_start = time.perf_counter()
    for step in range(start_step + 1, plan.total_steps + 1):
        if step == start_step + 1:
            console.log_compiling("the training step")
            began = time.perf_counter()
            metrics = jax.block_until_ready(trainer.step(next(run.data)))
            console.log_compiled("the training step", time.perf_counter() - began)
        else:
            metrics = trainer.step(next(run.data))
        if skips is not None:
            skips.after(step, int(trainer.state.skipped), checkpoints.latest_step)
        if step % cfg.run.log_every == 0 or step == plan.total_steps:
            _raise_if_nonfinite(trainer.state, cfg, checkpoints)
            elapsed = time.perf_counter() - window_start
            steps_done = min(cfg.run.log_every, step - start_step)
            tokens_per_s = steps_done * plan.tokens_per_step / elapsed
            flops_per_s = steps_done * plan.train_flops_per_step / elapsed
            row = {
                "train/loss": float(metrics["loss"]), "train/grad_norm": float(metrics["grad_norm"]),
                "train/lr": trainer.learning_rate(step - 1), "train/tokens_per_s": tokens_per_s,
                "train/mfu": flops_per_s / peak, "train/skipped_updates": int(trainer.state.skipped),
                "tokens": step * plan.tokens_per_step, "flops": step * plan.train_flops_per_step,
            }
            tracker.log(row, step)
            bar.set_postfix(loss=f"{row['train/loss']:.3f}", tok_s=f"{tokens_per_s:,.0f}", mfu=f"{row['train/mfu']:.1%}")
            window_start = time.perf_counter()
        bar.update(1)
        if step % cfg.run.eval_every == 0 or step == plan.total_steps:
            _raise_if_nonfinite(trainer.state, cfg, checkpoints)
            summary.update(evaluate(step))
        if step % cfg.run.checkpoint_every == 0 or step == plan.total_steps:
            save(step)
        fork(step)
        reason = ("run.stop_at_step" if step == cfg.run.stop_at_step else None) or _signal(run.stop, step, cfg)
        if reason is not None and step < plan.total_steps:
            if step % cfg.run.checkpoint_every:
                save(step)
            checkpoints.wait()
            checkpoints.close()
            bar.close()
            if distributed.is_primary():
                log_run_end(tracker, run.run_dir, step, val_loss=None, log_checkpoint=False)  # the curve so far
            tracker.finish()
            log.warning("%s: checkpoint saved at step %d; run the same command again to resume", reason, step)
            return {"stopped_at": step, **summary}
    bar.close()
    checkpoints.wait()
    checkpoints.close()
    final = {**summary, "step": int(trainer.state.step), "skipped_updates": int(trainer.state.skipped),
             "unigram_entropy_nats": corpus.unigram_entropy_nats, "set_aside": set_aside_dirs(checkpoints.directory)}
    tracker.summary(final)
    if cfg.run.samples and distributed.multi_process():
        log.info("run.samples: no samples in a multi-process run (generation runs in one process: archlab-generate)")
    elif cfg.run.samples and plan.model.family != "encoder_only" and not cfg.task.enabled:
        prompts = validation_prompts(corpus.validation, cfg.run.samples, SAMPLE_PROMPT_TOKENS)
        samples = sample_continuations(trainer.model, trainer.tokenizer, prompts, SAMPLE_NEW_TOKENS,
                                       prefix=cfg.objective.name == "prefix_lm")
        console.log_samples(samples)
        tracker.log_table("samples", SAMPLE_COLUMNS, [[final["step"], s["prompt"], s["continuation"]] for s in samples])
    if distributed.is_primary():
        log_run_end(tracker, run.run_dir, final["step"], val_loss=final.get("val/loss"),
                    log_checkpoint=cfg.logger.log_checkpoints,
                    checkpoint_dir=checkpoints.directory / str(final["step"]))
    tracker.finish()
    console.log_lines(console.summary_lines(final, run.run_dir, time.perf_counter() - run_start))
    return final


def _signal(stop: StopRequested, step: int, cfg: TrainConfig) -> str | None:
    """The signal that stops the run after ``step``. Over several processes, a signal any of them got,
    agreed at logging steps (``run.log_every``): each process may get it at a different step, and they
    must all save the same one (an agreement at every step would stall the device queue)."""
    if not distributed.multi_process():
        return stop.signal_name
    if step % cfg.run.log_every:
        return None
    return "a signal" if distributed.agree_any(stop.signal_name is not None) else None


def _raise_if_nonfinite(state: TrainState, cfg: TrainConfig, checkpoints: Checkpointer) -> None:
    if cfg.run.on_nonfinite != "stop":
        return
    bad_step = int(state.first_nonfinite_step)
    if bad_step >= 0:
        what = NONFINITE_KINDS.get(int(state.nonfinite_kind), "loss or gradient norm")
        kept = checkpoints.latest_step()  # waits for a save in flight: the good checkpoint commits
        last = f"the last good checkpoint, step {kept}, is kept" if kept is not None else "no checkpoint was written"
        raise NonFiniteError(
            f"non-finite {what} at step {bad_step + 1}; stopped without checkpointing "
            f"({last}; run.on_nonfinite=skip skips such updates; to retry with a changed config, "
            f"start over in place with run.restart=true)"
        )
