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


def cross_entropy_and_accuracy(
    logits_BTV: jax.Array, targets_BT: jax.Array, weights_BT: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(loss sum, correct sum, weight sum): ``weighted_cross_entropy`` and ``weighted_accuracy`` fused.

    The same values (tests/test_objectives.py checks them and the gradient against the two
    reference functions above), with one row maximum shared by the log-normaliser and the
    accuracy, and a hand-written gradient, ``(softmax - one_hot(target)) * weight``, computed in
    one elementwise pass instead of autodiff's softmax pass plus a scatter-add of the target
    term. A position counts as correct when its target's logit *is* the row maximum; this
    differs from ``jnp.argmax == target`` only at an exact tie for the top logit (argmax takes
    the first index, here every tied target counts), and it costs no pass over the logits:
    an exact first-index test cost ~5% of the CPU training step. Altogether the step ran ~9%
    faster than with the two reference functions (experiments/throughput/README.md).
    """
    vocab = logits_BTV.shape[-1]
    weights_M = weights_BT.reshape(-1).astype(jnp.float32)
    loss_sum, correct_sum = _fused_cross_entropy(
        logits_BTV.reshape(-1, vocab).astype(jnp.float32), targets_BT.reshape(-1).astype(jnp.int32), weights_M
    )
    return loss_sum, correct_sum, jnp.sum(weights_M)


def _cross_entropy_forward(logits_MV, targets_M, weights_M):
    max_M = jnp.max(logits_MV, axis=-1)
    shift_M = jnp.where(jnp.isfinite(max_M), max_M, 0.0)  # as jax.nn.logsumexp: an inf row stays inf, not NaN
    log_normalizer_M = shift_M + jnp.log(jnp.sum(jnp.exp(logits_MV - shift_M[:, None]), axis=-1))
    target_logit_M = jnp.take_along_axis(logits_MV, targets_M[:, None], axis=-1)[:, 0]
    live_M = weights_M != 0  # weight-0 positions contribute exactly 0, even with non-finite logits
    loss_sum = jnp.sum(jnp.where(live_M, (log_normalizer_M - target_logit_M) * weights_M, 0.0))
    correct_sum = jnp.sum(jnp.where(live_M & (target_logit_M == max_M), weights_M, 0.0))
    return (loss_sum, correct_sum), (logits_MV, log_normalizer_M, targets_M, weights_M)


def _cross_entropy_backward(residuals, cotangents):
    logits_MV, log_normalizer_M, targets_M, weights_M = residuals
    live_M = weights_M != 0
    scale_M = jnp.where(live_M, cotangents[0] * weights_M, 0.0)  # the accuracy has no gradient
    index_MV = jax.lax.broadcasted_iota(jnp.int32, logits_MV.shape, 1)
    softmax_MV = jnp.exp(logits_MV - log_normalizer_M[:, None])
    d_logits_MV = (softmax_MV - (index_MV == targets_M[:, None])) * scale_M[:, None]
    return jnp.where(live_M[:, None], d_logits_MV, 0.0), None, None


@jax.custom_vjp
def _fused_cross_entropy(logits_MV, targets_M, weights_M):
    return _cross_entropy_forward(logits_MV, targets_M, weights_M)[0]


_fused_cross_entropy.defvjp(_cross_entropy_forward, _cross_entropy_backward)
