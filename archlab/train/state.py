"""The train state: parameters, optimizer state and counters, as one pytree."""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # updates applied (int32 scalar)
    params: nnx.State
    opt_state: optax.OptState
    skipped: jax.Array  # updates skipped for non-finite loss or gradients
    first_nonfinite_step: jax.Array  # first step whose loss/gradients were non-finite; -1 if none
    nonfinite_kind: jax.Array  # what was non-finite at that step: 0 nothing, 1 the loss, 2 the gradient norm

    @classmethod
    def create(cls, params: nnx.State, tx: optax.GradientTransformation) -> "TrainState":
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            skipped=jnp.zeros((), jnp.int32),
            first_nonfinite_step=jnp.full((), -1, jnp.int32),
            nonfinite_kind=jnp.zeros((), jnp.int32),
        )


def abstract_like(tree):
    """Shape/dtype skeleton of a pytree (shardings kept), the restore target for a checkpoint."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x), sharding=getattr(x, "sharding", None)), tree)


def to_checkpoint(state: TrainState) -> dict:
    """Plain nested dicts of arrays (what orbax stores): readable parameter names, flat optimizer leaves."""
    opt_leaves = jax.tree.leaves(state.opt_state)
    return {
        "step": state.step,
        "skipped": state.skipped,
        "first_nonfinite_step": state.first_nonfinite_step,
        "params": nnx.to_pure_dict(state.params),
        "opt_state": {f"{i:05d}": leaf for i, leaf in enumerate(opt_leaves)},
    }


def from_checkpoint(tree: dict, like: TrainState) -> TrainState:
    """Rebuild a TrainState with ``like``'s structure from ``to_checkpoint`` output."""
    params = jax.tree.map(lambda x: x, like.params)
    nnx.replace_by_pure_dict(params, tree["params"])
    opt_leaves = [tree["opt_state"][key] for key in sorted(tree["opt_state"])]
    opt_state = jax.tree.unflatten(jax.tree.structure(like.opt_state), opt_leaves)
    return TrainState(
        step=jnp.asarray(tree["step"], jnp.int32),
        params=params,
        opt_state=opt_state,
        skipped=jnp.asarray(tree["skipped"], jnp.int32),
        first_nonfinite_step=jnp.asarray(tree["first_nonfinite_step"], jnp.int32),
        # Not stored (checkpoints keep their format): under run.on_nonfinite=stop no checkpoint
        # holds a non-finite step, and under skip the kind is never reported.
        nonfinite_kind=jnp.zeros((), jnp.int32),
    )
