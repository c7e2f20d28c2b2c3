"""Weighted token-level losses and metrics, returned as (sum, weight) pairs.

Sums rather than means so that gradient accumulation, multi-device reductions and
evaluation over many batches stay exact: divide once, at the very end.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def weighted_cross_entropy(
    logits_BTV: jax.Array, targets_BT: jax.Array, weights_BT: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(sum of weight * negative log-likelihood of the target, sum of weights), both float32 scalars.

    Computed in float32 whatever the logits dtype; the log-normaliser is a stable logsumexp.
    Positions with weight 0 contribute exactly 0, even if their logits are not finite.
    """
    logits_BTV = logits_BTV.astype(jnp.float32)
    weights_BT = weights_BT.astype(jnp.float32)
    log_normalizer_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    target_logit_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None].astype(jnp.int32), axis=-1)[..., 0]
    nll_BT = log_normalizer_BT - target_logit_BT
    loss_sum = jnp.sum(jnp.where(weights_BT != 0, nll_BT * weights_BT, 0.0))
    return loss_sum, jnp.sum(weights_BT)


def weighted_accuracy(
    logits_BTV: jax.Array, targets_BT: jax.Array, weights_BT: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(sum of weight where the arg-max logit is the target, sum of weights), both float32 scalars."""
    weights_BT = weights_BT.astype(jnp.float32)
    correct_BT = jnp.argmax(logits_BTV, axis=-1) == targets_BT
    return jnp.sum(jnp.where(correct_BT, weights_BT, 0.0)), jnp.sum(weights_BT)
