"""Pure, jitted train and eval steps over ``(state, batch)``, with buffer donation.

The model is rebuilt inside the trace from its static ``graphdef`` and the parameter
state (``nnx.merge``), so the hot path is a plain JAX function.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from archlab.objectives.model_io import loss_and_metrics
from archlab.train.state import TrainState

Batch = dict[str, jax.Array]


def _tree_add(a, b):
    return jax.tree.map(jnp.add, a, b)


def make_train_step(
    graphdef: nnx.GraphDef, tx: optax.GradientTransformation, *, grad_accum_steps: int, skip_nonfinite: bool
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """One update. With ``grad_accum_steps > 1`` every batch array has a leading micro-batch axis."""

    def loss_fn(params: nnx.State, batch: Batch):
        return loss_and_metrics(nnx.merge(graphdef, params), batch)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def gradients(params: nnx.State, batch: Batch):
        if grad_accum_steps == 1:
            return grad_fn(params, batch)

        def accumulate(carry, micro_batch):
            (loss, sums), grads = grad_fn(params, micro_batch)
            return _tree_add(carry, ((loss, sums), grads)), None

        first = jax.tree.map(lambda x: x[0], batch)
        rest = jax.tree.map(lambda x: x[1:], batch)
        total, _ = jax.lax.scan(accumulate, grad_fn(params, first), rest)
        (loss, sums), grads = total
        scale = 1.0 / grad_accum_steps
        return (loss * scale, sums), jax.tree.map(lambda g: g * scale, grads)

    @partial(jax.jit, donate_argnums=(0,))
    def train_step(state: TrainState, batch: Batch):
        (loss, sums), grads = gradients(state.params, batch)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        if skip_nonfinite:
            # Keep the old parameters and moments: a skipped update leaves no trace.
            params, opt_state = jax.tree.map(
                lambda new, old: jnp.where(finite, new, old), (params, opt_state), (state.params, state.opt_state)
            )
        first_bad = jnp.where(
            (state.first_nonfinite_step < 0) & ~finite, state.step, state.first_nonfinite_step
        )
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            skipped=state.skipped + (~finite).astype(jnp.int32),
            first_nonfinite_step=first_bad,
        )
        metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite, **sums}
        return new_state, metrics

    return train_step


def make_eval_step(graphdef: nnx.GraphDef) -> Callable[[nnx.State, Batch], dict[str, jax.Array]]:
    """Sums (loss, weight, correct) over one batch; averaged by the caller across batches."""

    @jax.jit
    def eval_step(params: nnx.State, batch: Batch):
        _, sums = loss_and_metrics(nnx.merge(graphdef, params), batch)
        return sums

    return eval_step
