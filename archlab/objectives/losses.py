"""Weighted token-level losses and metrics, returned as (sum, weight) pairs.

Sums rather than means so that gradient accumulation, multi-device reductions and
evaluation over many batches stay exact: divide once, at the very end.
"""

from __future__ import annotations

from functools import partial

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


def _loss_terms(logits_MV, targets_M, weights_M):
    """``(loss sum, correct sum, shift_M, exp_MV, total_M)``: the two sums, and the pieces of the
    softmax ``exp_MV / total_M`` with ``exp_MV = exp(logits - shift)``, for a gradient to reuse."""
    max_M = jnp.max(logits_MV, axis=-1)
    shift_M = jnp.where(jnp.isfinite(max_M), max_M, 0.0)  # as jax.nn.logsumexp: an inf row stays inf, not NaN
    exp_MV = jnp.exp(logits_MV - shift_M[:, None])
    total_M = jnp.sum(exp_MV, axis=-1)
    target_logit_M = jnp.take_along_axis(logits_MV, targets_M[:, None], axis=-1)[:, 0]
    live_M = weights_M != 0  # weight-0 positions contribute exactly 0, even with non-finite logits
    loss_sum = jnp.sum(jnp.where(live_M, (shift_M + jnp.log(total_M) - target_logit_M) * weights_M, 0.0))
    correct_sum = jnp.sum(jnp.where(live_M & (target_logit_M == max_M), weights_M, 0.0))
    return loss_sum, correct_sum, shift_M, exp_MV, total_M


def _cross_entropy_forward(logits_MV, targets_M, weights_M):
    loss_sum, correct_sum, shift_M, _, total_M = _loss_terms(logits_MV, targets_M, weights_M)
    log_normalizer_M = shift_M + jnp.log(total_M)
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


def head_cross_entropy_and_accuracy(
    features_MD: jax.Array,
    table_VD: jax.Array,
    bias_V: jax.Array | None,
    targets_M: jax.Array,
    weights_M: jax.Array,
    *,
    chunk: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``cross_entropy_and_accuracy`` of the logits ``features @ table.T + bias``, ``chunk`` rows at a time.

    The output head and the loss fused, so the ``[M, V]`` logits (and their gradient) never exist
    whole: rows are processed in chunks of ``chunk`` tokens under ``lax.scan``, and under
    differentiation each chunk also yields its share of the gradients (``d_logits @ table`` for the
    features, ``d_logits.T @ features`` accumulated for the table, the column sums for the bias)
    while its logits are still in cache, so the backward pass is a scalar multiply. At the CPU
    target shape (2048 tokens x 8192 vocabulary) a chunk of 512 rows keeps the logits block at
    16 MB; the memory traffic and page faults of two 64 MB arrays go away (experiments/throughput/).

    Same values and semantics as ``cross_entropy_and_accuracy`` on the materialised logits
    (tests/test_objectives.py checks values and gradients): float32 logits and sums, weight-0
    positions contribute exactly 0, a position counts as correct when its target's logit is the
    row maximum. Returns ``(loss sum, correct sum, weight sum)``.
    """
    weights_M = weights_M.astype(jnp.float32)
    loss_sum, correct_sum = _fused_head_cross_entropy(
        features_MD, table_VD, bias_V, targets_M.astype(jnp.int32), weights_M, chunk
    )
    return loss_sum, correct_sum, jnp.sum(weights_M)


def _head_chunks(features_MD, table_VD, bias_V, targets_M, weights_M, chunk: int, with_grads: bool):
    """Loss and correct sums over row chunks; with ``with_grads`` also the unscaled gradients."""
    rows, width = features_MD.shape
    chunk = max(1, min(chunk, rows))
    n_chunks = -(-rows // chunk)
    pad = n_chunks * chunk - rows
    if pad:  # padded rows have weight 0: no loss, no gradient
        features_MD = jnp.pad(features_MD, ((0, pad), (0, 0)))
        targets_M, weights_M = jnp.pad(targets_M, (0, pad)), jnp.pad(weights_M, (0, pad))
    xs = (
        features_MD.reshape(n_chunks, chunk, width),
        targets_M.reshape(n_chunks, chunk),
        weights_M.reshape(n_chunks, chunk),
    )
    contract_last = (((1,), (1,)), ((), ()))

    def one_chunk(carry, x):
        features_CD, targets_C, weights_C = x
        logits_CV = jax.lax.dot_general(features_CD, table_VD, contract_last, preferred_element_type=jnp.float32)
        if bias_V is not None:
            logits_CV = logits_CV + bias_V.astype(jnp.float32)
        loss, correct, _, exp_CV, total_C = _loss_terms(logits_CV, targets_C, weights_C)
        sums = (carry[0] + loss, carry[1] + correct)
        if not with_grads:
            return (*sums, *carry[2:]), None
        live_C = weights_C != 0
        index_CV = jax.lax.broadcasted_iota(jnp.int32, logits_CV.shape, 1)
        scale_C = jnp.where(live_C, weights_C / total_C, 0.0)
        d_logits_CV = (exp_CV * scale_C[:, None]) - jnp.where(index_CV == targets_C[:, None], weights_C[:, None], 0.0)
        d_logits_CV = jnp.where(live_C[:, None], d_logits_CV, 0.0).astype(features_CD.dtype)
        d_features_CD = jnp.dot(d_logits_CV, table_VD, preferred_element_type=jnp.float32)
        d_table_VD = carry[2] + jax.lax.dot_general(
            d_logits_CV, features_CD, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
        )
        d_bias_V = None if bias_V is None else carry[3] + jnp.sum(d_logits_CV.astype(jnp.float32), axis=0)
        return (*sums, d_table_VD, d_bias_V), d_features_CD.astype(features_CD.dtype)

    zero = jnp.zeros((), jnp.float32)
    init = (zero, zero)
    if with_grads:
        bias_init = None if bias_V is None else jnp.zeros(bias_V.shape, jnp.float32)
        init = (*init, jnp.zeros(table_VD.shape, jnp.float32), bias_init)
    carry, d_features = jax.lax.scan(one_chunk, init, xs)
    if not with_grads:
        return carry
    d_features_MD = d_features.reshape(n_chunks * chunk, width)[:rows]
    d_bias_V = None if bias_V is None else carry[3].astype(bias_V.dtype)
    return carry[:2], (d_features_MD, carry[2].astype(table_VD.dtype), d_bias_V)


@partial(jax.custom_vjp, nondiff_argnums=(5,))
def _fused_head_cross_entropy(features_MD, table_VD, bias_V, targets_M, weights_M, chunk):
    return _head_chunks(features_MD, table_VD, bias_V, targets_M, weights_M, chunk, with_grads=False)


def _fused_head_forward(features_MD, table_VD, bias_V, targets_M, weights_M, chunk):
    sums, grads = _head_chunks(features_MD, table_VD, bias_V, targets_M, weights_M, chunk, with_grads=True)
    return sums, grads


def _fused_head_backward(chunk, residuals, cotangents):
    d_features_MD, d_table_VD, d_bias_V = residuals
    scale = cotangents[0]  # the accuracy has no gradient
    d_bias_V = None if d_bias_V is None else d_bias_V * scale.astype(d_bias_V.dtype)
    d_features_MD = d_features_MD * scale.astype(d_features_MD.dtype)
    return d_features_MD, d_table_VD * scale.astype(d_table_VD.dtype), d_bias_V, None, None


_fused_head_cross_entropy.defvjp(_fused_head_forward, _fused_head_backward)
