"""The training loop: build, resume, step, evaluate, checkpoint, log; stop cleanly on signals."""

from __future__ import annotations

import logging
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from archlab.accounting import device_peak_flops
from archlab.errors import ArchlabError
from archlab.nn.models import build_model
from archlab.data import build_iterator
from archlab.schema import TrainConfig
from archlab.train import run_dir as run_files
from archlab.train.checkpoint import Checkpointer
from archlab.train.metrics import Aggregate, eval_metrics, progress_bar
from archlab.train.optim import make_optimizer
from archlab.train.setup import (
    check_batch, load_corpus, make_plan, objective_transform, row_length_for, validation_batches,
)
from archlab.train.sharding import Mesh1D
from archlab.train.state import TrainState, abstract_like, from_checkpoint, to_checkpoint
from archlab.train.step import NONFINITE_KINDS, make_eval_step, make_train_step
from archlab.train.tracking import Tracker, new_run_id

log = logging.getLogger(__name__)


class NonFiniteError(ArchlabError):
    """The loss or gradients became NaN/Inf under ``run.on_nonfinite=stop``."""


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


def train(cfg: TrainConfig, run_dir: Path, *, resolved_config: dict) -> dict:
    """Train (or resume) the run in ``run_dir``; returns the final summary."""
    check_batch(cfg)
    make_plan(cfg, cfg.data.vocab_size)  # budget and lengths refused before any data is read
    objective_transform(cfg, cfg.data.vocab_size)  # objective options and vocabulary checked likewise
    run_files.check_resumable(run_dir, resolved_config)
    corpus = load_corpus(cfg.data, row_length_for(cfg), run_files.saved_tokenizer(run_dir))
    plan = make_plan(cfg, corpus.tokenizer.vocab_size)
    transform = objective_transform(cfg, corpus.tokenizer.vocab_size)
    val_batches = validation_batches(
        corpus.validation, transform, batch_size=cfg.run.batch_size, n_batches=cfg.run.eval_batches, seed=cfg.run.seed
    )
    with run_files.RunLock(run_dir), run_files.log_to_file(run_dir):
        run_files.write_once(run_dir, resolved_config, corpus.tokenizer)
        return _train_locked(cfg, run_dir, corpus, plan, transform, val_batches, resolved_config)


def _train_locked(cfg, run_dir, corpus, plan, transform, val_batches, resolved_config) -> dict:
    with StopRequested() as stop:
        model = build_model(plan.model, seed=cfg.run.seed)
        graphdef, params = nnx.split(model)
        tx, schedule = make_optimizer(cfg.optimizer, plan.total_steps, plan.tokens_per_step)
        mesh = Mesh1D()
        state = mesh.replicate(TrainState.create(params, tx))
        accum = cfg.optimizer.grad_accum_steps
        train_step = make_train_step(
            graphdef, tx, grad_accum_steps=accum, skip_nonfinite=cfg.run.on_nonfinite == "skip",
            inject_nan_at_step=cfg.run.inject_nan_at_step, inject_nan_into=cfg.run.inject_nan_into,
        )
        eval_step = make_eval_step(graphdef)
        data = build_iterator(corpus.train, batch_size=cfg.run.batch_size, seed=cfg.run.seed, transform=transform)

        checkpoints = Checkpointer(run_dir / "checkpoints", max_to_keep=cfg.run.keep_checkpoints)
        meta: dict = {}
        if checkpoints.latest_step() is not None:
            restored = checkpoints.restore(None, abstract_like(to_checkpoint(state)))
            resumed = from_checkpoint(restored.state, state)
            if cfg.run.on_nonfinite == "stop" and int(resumed.first_nonfinite_step) >= 0:
                # Updates skipped earlier under run.on_nonfinite=skip: watch for new ones from here.
                resumed = resumed.replace(first_nonfinite_step=jnp.full((), -1, jnp.int32),
                                          nonfinite_kind=jnp.zeros((), jnp.int32))
            state = mesh.replicate(resumed)
            data.set_state(restored.data)
            meta = dict(restored.meta)
            log.info("resumed from step %d in %s", restored.step, run_dir)
        start_step = int(state.step)

        derived = {**plan.derived(), "unigram_entropy_nats": corpus.unigram_entropy_nats,
                   "bytes_per_token_validation": corpus.bytes_per_token_validation}
        # The W&B run id is fixed on the first launch (before any checkpoint holds it), so a run
        # killed before its first checkpoint still continues the same W&B run.
        run_id = meta.get("wandb_run_id")
        if run_id is None and cfg.logger.backend == "wandb":
            run_id = run_files.wandb_run_id(run_dir, new_run_id)
        tracker = Tracker(
            run_dir, backend=cfg.logger.backend, project=cfg.logger.project, group=cfg.logger.group or cfg.experiment,
            name=cfg.run.name, tags=[plan.model.family, cfg.objective.name, cfg.size_name, *cfg.logger.tags],
            job_type="train", config={**resolved_config, "derived": derived}, mode=cfg.logger.mode,
            # Rows after the resumed step (all rows, from step 0) are a killed run's tail: dropped.
            run_id=run_id, resume_step=start_step, entity=cfg.logger.entity,
        )
        try:
            return _steps(cfg, plan, corpus, state, train_step, eval_step, schedule, mesh, data, val_batches,
                          checkpoints, tracker, stop, derived, start_step)
        except BaseException:
            # Let a good checkpoint still being written commit; mark the W&B run failed.
            tracker.finish(exit_code=1)
            try:
                checkpoints.close()
            except Exception as error:  # the first error is the one to report
                log.warning("while stopping after an error, a pending checkpoint failed: %s", error)
            raise


def _steps(cfg, plan, corpus, state, train_step, eval_step, schedule, mesh, data, val_batches,
           checkpoints, tracker, stop, derived, start_step) -> dict:
    accum = cfg.optimizer.grad_accum_steps
    if start_step == 0:
        tracker.summary(derived)
    peak = device_peak_flops() * jax.device_count()

    def evaluate(step: int) -> dict[str, float]:
        totals = Aggregate()
        for batch in val_batches:
            totals.add(jax.device_get(eval_step(state.params, mesh.shard_batch(batch))))
        metrics = eval_metrics(totals, corpus.bytes_per_token_validation, prefix="val")
        tracker.log({**metrics, "tokens": step * plan.tokens_per_step, "flops": step * plan.train_flops_per_step}, step)
        return metrics

    def save(step: int) -> None:
        _raise_if_nonfinite(state, cfg, checkpoints)
        meta_now = {"wandb_run_id": tracker.run_id, "tokens": step * plan.tokens_per_step, "seed": cfg.run.seed}
        checkpoints.save(step, to_checkpoint(state), data=data.get_state(), meta=meta_now)

    summary: dict = {}
    window_start = time.perf_counter()
    bar = progress_bar(cfg.run.progress, start_step, plan.total_steps)
    for step in range(start_step + 1, plan.total_steps + 1):
        batch = next(data)
        if accum > 1:
            batch = {k: v.reshape(accum, -1, *v.shape[1:]) for k, v in batch.items()}
        state, metrics = train_step(state, mesh.shard_batch(batch, leading_axes=1 if accum > 1 else 0))
        if step % cfg.run.log_every == 0 or step == plan.total_steps:
            _raise_if_nonfinite(state, cfg, checkpoints)
            elapsed = time.perf_counter() - window_start
            steps_done = min(cfg.run.log_every, step - start_step)
            tokens_per_s = steps_done * plan.tokens_per_step / elapsed
            flops_per_s = steps_done * plan.train_flops_per_step / elapsed
            row = {
                "train/loss": float(metrics["loss"]), "train/grad_norm": float(metrics["grad_norm"]),
                "train/lr": float(schedule(step - 1)), "train/tokens_per_s": tokens_per_s,
                "train/mfu": flops_per_s / peak, "train/skipped_updates": int(state.skipped),
                "tokens": step * plan.tokens_per_step, "flops": step * plan.train_flops_per_step,
            }
            tracker.log(row, step)
            bar.set_postfix(loss=f"{row['train/loss']:.3f}", tok_s=f"{tokens_per_s:,.0f}", mfu=f"{row['train/mfu']:.1%}")
            window_start = time.perf_counter()
        bar.update(1)
        if step % cfg.run.eval_every == 0 or step == plan.total_steps:
            _raise_if_nonfinite(state, cfg, checkpoints)
            summary.update(evaluate(step))
        if step % cfg.run.checkpoint_every == 0 or step == plan.total_steps:
            save(step)
        reason = stop.signal_name or ("run.stop_at_step" if step == cfg.run.stop_at_step else None)
        if reason is not None and step < plan.total_steps:
            if step % cfg.run.checkpoint_every:
                save(step)
            checkpoints.wait()
            checkpoints.close()
            bar.close()
            tracker.finish()
            log.warning("%s: checkpoint saved at step %d; run the same command again to resume", reason, step)
            return {"stopped_at": step, **summary}
    bar.close()
    checkpoints.wait()
    checkpoints.close()
    final = {**summary, "step": int(state.step), "skipped_updates": int(state.skipped),
             "unigram_entropy_nats": corpus.unigram_entropy_nats}
    tracker.summary(final)
    tracker.finish()
    return final


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
            f"({last}; run.on_nonfinite=skip skips such updates)"
        )
