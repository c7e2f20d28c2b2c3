"""Attention masks, built once at the top of a model and passed down to every layer.

A mask is a boolean array ``mask_BQK`` (True = may attend), broadcast over heads.
Segment ids carry both padding and packing: 0 marks padding, and tokens attend only
within their own nonzero segment, so packed documents never see each other.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from archlab.errors import ConfigError

Array = jnp.ndarray


def default_segment_ids(tokens_BT: Array) -> Array:
    """Every token in one segment: no padding, no packing."""
    return jnp.ones(tokens_BT.shape, jnp.int32)


def default_positions(tokens_BT: Array) -> Array:
    return jnp.broadcast_to(jnp.arange(tokens_BT.shape[1], dtype=jnp.int32), tokens_BT.shape)


def padding_mask(kv_segment_ids_BK: Array, q_len: int) -> Array:
    """Queries may attend every non-padding key."""
    valid_BK = kv_segment_ids_BK != 0
    return jnp.broadcast_to(valid_BK[:, None, :], (valid_BK.shape[0], q_len, valid_BK.shape[1]))


def segment_mask(q_segment_ids_BQ: Array, kv_segment_ids_BK: Array) -> Array:
    """Attend within the same nonzero segment (packing and padding in one rule)."""
    same_BQK = q_segment_ids_BQ[:, :, None] == kv_segment_ids_BK[:, None, :]
    return same_BQK & (kv_segment_ids_BK != 0)[:, None, :]


def causal_mask(q_len: int, kv_len: int | None = None, q_offset: Array | int = 0) -> Array:
    """``[1, Q, K]``: query i (at absolute position ``q_offset + i``) sees keys at positions <= its own."""
    kv_len = q_len if kv_len is None else kv_len
    q_pos_Q = jnp.arange(q_len) + q_offset
    return (jnp.arange(kv_len)[None, :] <= q_pos_Q[:, None])[None]


def bidirectional_mask(segment_ids_BT: Array) -> Array:
    """Encoder self-attention: full attention within each segment."""
    return segment_mask(segment_ids_BT, segment_ids_BT)


def decoder_mask(segment_ids_BT: Array) -> Array:
    """Decoder self-attention: causal within each segment."""
    seq_len = segment_ids_BT.shape[1]
    return segment_mask(segment_ids_BT, segment_ids_BT) & causal_mask(seq_len)


def prefix_lm_mask(segment_ids_BT: Array, prefix_BT: Array) -> Array:
    """Prefix-LM: causal, plus every prefix key is visible to all queries of its segment.

    The prefix is thus attended bidirectionally, and the continuation sees the whole prefix
    and itself causally (T5's prefix-LM, UniLM).
    """
    seq_len = segment_ids_BT.shape[1]
    visible_BQK = causal_mask(seq_len) | prefix_BT.astype(bool)[:, None, :]
    return segment_mask(segment_ids_BT, segment_ids_BT) & visible_BQK


def cache_prefix_mask(prefix_BT: Array, cache_len: int, cache_index: Array | int = 0) -> Array:
    """``[B, 1, S]``: the cache slots ``cache_index ..`` holding prefix tokens, visible to every query
    (a prefix-LM prefill: or'ed with the causal mask, it is ``prefix_lm_mask`` over cache slots)."""
    prefix_BS = jnp.zeros((prefix_BT.shape[0], cache_len), bool)
    prefix_BS = jax.lax.dynamic_update_slice(prefix_BS, prefix_BT.astype(bool), (0, cache_index))
    return prefix_BS[:, None, :]


def cross_mask(dec_segment_ids_BQ: Array, enc_segment_ids_BK: Array) -> Array:
    """Decoder-to-encoder attention: same segment, encoder padding excluded."""
    return segment_mask(dec_segment_ids_BQ, enc_segment_ids_BK)


def check_mask(mask_BQK: Array, batch: int, q_len: int, kv_len: int) -> None:
    """Refuse a mask that cannot broadcast to ``[batch, q_len, kv_len]`` with one sentence."""
    shape = tuple(mask_BQK.shape)
    ok = len(shape) == 3 and shape[0] in (1, batch) and shape[1] in (1, q_len) and shape[2] in (1, kv_len)
    if not ok:
        raise ConfigError(
            f"attention mask has shape {shape}; expected (batch, queries, keys) broadcastable to "
            f"({batch}, {q_len}, {kv_len})"
        )
