"""BERT masked-language-model corruption (Devlin et al. 2019, section 3.1 and appendix C.2)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from archlab.errors import ConfigError
from archlab.objectives.clm import read_packed_batch
from archlab.tokens import SPECIAL


def _check_rates(mask_rate: float, mask_token_fraction: float, random_token_fraction: float) -> None:
    if not 0.0 < mask_rate <= 1.0:
        raise ConfigError(f"mask_rate must be in (0, 1], got {mask_rate}")
    if mask_token_fraction < 0 or random_token_fraction < 0 or mask_token_fraction + random_token_fraction > 1:
        raise ConfigError(
            f"mask_token_fraction ({mask_token_fraction}) and random_token_fraction "
            f"({random_token_fraction}) must be >= 0 and sum to at most 1"
        )


def mask_tokens(
    batch: Mapping[str, np.ndarray],
    rng: np.random.Generator,
    *,
    vocab_size: int,
    mask_rate: float = 0.15,
    mask_token_fraction: float = 0.8,
    random_token_fraction: float = 0.1,
) -> dict[str, np.ndarray]:
    """Choose tokens to predict and corrupt them the BERT way.

    Eligible tokens are non-special (``SPECIAL.is_special``) tokens in a nonzero segment.
    Selection is exact-count per row: ``k = round(mask_rate * n_eligible)`` (half to even),
    at least 1 when the row has any eligible token, drawn uniformly without replacement.
    Each chosen token independently becomes [MASK] with probability ``mask_token_fraction``,
    a uniformly random ordinary (non-special) id with probability ``random_token_fraction``,
    and stays unchanged otherwise. ``targets`` are the original tokens; ``weights`` is 1.0
    exactly at the chosen positions.

    ``prediction_positions`` ``[B, K]`` lists each row's chosen positions in order, then other
    positions (weight 0) up to ``K = max(1, round(mask_rate * T))``, the most a row can choose
    (BERT's ``masked_lm_positions``). The loss reads the output head at these K positions only
    instead of all T (``model_io.hidden_and_targets``): the same loss at ~mask_rate of the head's cost.
    """
    _check_rates(mask_rate, mask_token_fraction, random_token_fraction)
    SPECIAL.check_vocab_has_sentinels(vocab_size)
    tokens_BT, segment_ids_BT, positions_BT = read_packed_batch(batch)
    B, T = tokens_BT.shape

    eligible_BT = (segment_ids_BT != 0) & ~SPECIAL.is_special(tokens_BT, vocab_size)
    n_eligible_B = eligible_BT.sum(axis=1)
    k_B = np.where(n_eligible_B > 0, np.maximum(np.rint(mask_rate * n_eligible_B), 1), 0).astype(np.int64)

    # A uniform random subset of size k: rank eligible positions by a random key and take
    # the k smallest. Ineligible positions get key 2.0 so they always rank last.
    key_BT = np.where(eligible_BT, rng.random((B, T)), 2.0)
    order_BT = np.argsort(key_BT, axis=1, kind="stable")
    rank_BT = np.empty_like(order_BT)
    np.put_along_axis(rank_BT, order_BT, np.arange(T)[None, :].repeat(B, axis=0), axis=1)
    chosen_BT = eligible_BT & (rank_BT < k_B[:, None])

    # Draws have fixed shapes so the random stream does not depend on the data.
    action_BT = rng.random((B, T))
    random_ids_BT = rng.integers(SPECIAL.n_reserved_low, SPECIAL.first_sentinel_id(vocab_size), size=(B, T))
    to_mask_BT = chosen_BT & (action_BT < mask_token_fraction)
    to_random_BT = (
        chosen_BT & (action_BT >= mask_token_fraction) & (action_BT < mask_token_fraction + random_token_fraction)
    )

    inputs_BT = np.where(to_mask_BT, SPECIAL.mask, tokens_BT)
    inputs_BT = np.where(to_random_BT, random_ids_BT, inputs_BT).astype(np.int32)
    # k <= round(mask_rate * T) for every row (round is monotone and n_eligible <= T).
    n_predictions = max(1, int(np.rint(mask_rate * T)))
    prediction_positions_BK = np.argsort(~chosen_BT, axis=1, kind="stable")[:, :n_predictions].astype(np.int32)
    return {
        "inputs": inputs_BT,
        "targets": tokens_BT.copy(),
        "weights": chosen_BT.astype(np.float32),
        "segment_ids": segment_ids_BT,
        "positions": positions_BT,
        "prediction_positions": prediction_positions_BK,
    }
