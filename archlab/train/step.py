"""Pure, jitted train and eval steps over ``(state, batch)``, with buffer donation.

The model is rebuilt inside the trace from its static ``graphdef`` and the parameter
state (``nnx.merge``), so the hot path is a plain JAX function.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from archlab.objectives.model_io import loss_and_metrics
from archlab.schema import NAN_TARGETS
from archlab.train.state import TrainState

Batch = dict[str, jax.Array]


def _tree_add(a, b):
    return jax.tree.map(jnp.add, a, b)


# ``TrainState.nonfinite_kind``: what was non-finite at ``first_nonfinite_step``.
NONFINITE_KINDS = {1: "loss", 2: "gradient norm"}
DROPOUT_STREAM = 0xD40  # folded into the run seed's key for training's dropout draws


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    *,
    grad_accum_steps: int,
    skip_nonfinite: bool,
    inject_nan_at_step: int | None = None,
    inject_nan_into: str = "loss",
    jit: bool = True,
    shard=None,
    dropout_seed: int | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """One update, ``train_step(state, batch, schedule_points=None)``. With ``grad_accum_steps > 1``
    every batch array has a leading micro-batch axis; ``schedule_points`` (a wsd optimizer's cooldown
    start and end, ``optim.schedule_points``) are traced, so a trunk and its branches share one program.

    ``inject_nan_at_step`` (1-based, as logged) is a debugging knob: that step's loss (and so its
    gradients) or only its gradients are multiplied by NaN. It is compared with the traced
    ``state.step`` inside the jitted step (one program for every step); with None nothing is added.
    ``jit=False`` returns the plain function (``train.members`` vmaps it over packed runs, then jits).
    ``shard`` (a ``sharding.MeshPlan``) pins the batch and the new state to the run's mesh: the outputs
    keep the inputs' shardings, so the donated state is updated in place and the step compiles once.
    ``dropout_seed`` switches on the model's dropout: update ``k`` (micro-batch ``m``) draws from
    ``fold_in(fold_in(key(seed), k), m)``, so a resumed run drops exactly what the uninterrupted one did.
    """
    if inject_nan_into not in NAN_TARGETS:
        raise ValueError(f"inject_nan_into must be one of {NAN_TARGETS}, got {inject_nan_into!r}")

    def loss_fn(params: nnx.State, batch: Batch, loss_scale, dropout_key):
        loss, sums = loss_and_metrics(nnx.merge(graphdef, params), batch, dropout_key)
        return (loss if loss_scale is None else loss * loss_scale), sums

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    # Its own stream of the run seed (the parameters' initialisation draws from nnx.Rngs(seed)).
    dropout_stream = None if dropout_seed is None else jax.random.fold_in(jax.random.key(dropout_seed), DROPOUT_STREAM)

    def micro_key(step_key, index):
        return None if step_key is None else jax.random.fold_in(step_key, index)

    def gradients(params: nnx.State, batch: Batch, loss_scale, step_key):
        if grad_accum_steps == 1:
            return grad_fn(params, batch, loss_scale, micro_key(step_key, 0))

        def accumulate(carry, inputs):
            micro_batch, index = inputs
            (loss, sums), grads = grad_fn(params, micro_batch, loss_scale, micro_key(step_key, index))
            return _tree_add(carry, ((loss, sums), grads)), None

        first = jax.tree.map(lambda x: x[0], batch)
        rest = jax.tree.map(lambda x: x[1:], batch)
        indices = jnp.arange(1, grad_accum_steps)
        total, _ = jax.lax.scan(accumulate, grad_fn(params, first, loss_scale, micro_key(step_key, 0)), (rest, indices))
        (loss, sums), grads = total
        scale = 1.0 / grad_accum_steps
        return (loss * scale, sums), jax.tree.map(lambda g: g * scale, grads)

    def train_step(state: TrainState, batch: Batch, schedule_points=None):
        if shard is not None:
            batch = shard.constrain_batch(batch, leading_axes=1 if grad_accum_steps > 1 else 0)
        poison = None
        if inject_nan_at_step is not None:
            poison = jnp.where(state.step + 1 == inject_nan_at_step, jnp.nan, 1.0).astype(jnp.float32)
        step_key = None if dropout_seed is None else jax.random.fold_in(dropout_stream, state.step)
        (loss, sums), grads = gradients(state.params, batch, poison if inject_nan_into == "loss" else None, step_key)
        if poison is not None and inject_nan_into == "gradients":
            grads = jax.tree.map(lambda g: g * poison.astype(g.dtype), grads)
        grad_norm = optax.global_norm(grads)
        loss_finite = jnp.isfinite(loss)
        finite = loss_finite & jnp.isfinite(grad_norm)
        extra = {} if schedule_points is None else {"schedule_points": schedule_points}
        updates, opt_state = tx.update(grads, state.opt_state, state.params, **extra)
        params = optax.apply_updates(state.params, updates)
        if skip_nonfinite:
            # Keep the old parameters and moments: a skipped update leaves no trace.
            params, opt_state = jax.tree.map(
                lambda new, old: jnp.where(finite, new, old), (params, opt_state), (state.params, state.opt_state)
            )
        is_first = (state.first_nonfinite_step < 0) & ~finite
        first_bad = jnp.where(is_first, state.step, state.first_nonfinite_step)
        kind = jnp.where(is_first, jnp.where(loss_finite, 2, 1), state.nonfinite_kind).astype(jnp.int32)
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            skipped=state.skipped + (~finite).astype(jnp.int32),
            first_nonfinite_step=first_bad,
            nonfinite_kind=kind,
        )
        if shard is not None:
            new_state = shard.constrain_state(new_state)
        metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite, **sums}
        return new_state, metrics

    return jax.jit(train_step, donate_argnums=(0,)) if jit else train_step


def make_eval_step(graphdef: nnx.GraphDef, jit: bool = True, shard=None) -> Callable[[nnx.State, Batch], dict[str, jax.Array]]:
    """Sums (loss, weight, correct) over one batch; averaged by the caller across batches."""

    def eval_step(params: nnx.State, batch: Batch):
        if shard is not None:
            batch = shard.constrain_batch(batch)
        _, sums = loss_and_metrics(nnx.merge(graphdef, params), batch)
        return sums

    return jax.jit(eval_step) if jit else eval_step
