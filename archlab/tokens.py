"""Special-token layout shared by the tokenizer, the objectives and the models.

The ids are fixed so every component agrees without passing a tokenizer around:
[PAD]=0 [CLS]=1 [SEP]=2 [MASK]=3 [BOS]=4 [EOS]=5; the 100 T5 sentinels sit at the
top of the vocabulary and count down: sentinel i has id ``vocab_size - 1 - i``.
"""

from __future__ import annotations

from dataclasses import dataclass

from archlab.errors import ConfigError

SPECIAL_TOKEN_NAMES: tuple[str, ...] = ("[PAD]", "[CLS]", "[SEP]", "[MASK]", "[BOS]", "[EOS]")
N_SENTINELS = 100


def sentinel_name(i: int) -> str:
    return f"<extra_id_{i}>"


@dataclass(frozen=True)
class SpecialTokens:
    pad: int = 0
    cls: int = 1
    sep: int = 2
    mask: int = 3
    bos: int = 4
    eos: int = 5
    n_sentinels: int = N_SENTINELS

    @property
    def n_reserved_low(self) -> int:
        """Number of fixed special ids at the bottom of the vocabulary."""
        return len(SPECIAL_TOKEN_NAMES)

    def sentinel_id(self, i: int, vocab_size: int) -> int:
        """Id of sentinel ``i`` (``<extra_id_i>``), counted down from the top of the vocabulary."""
        if not 0 <= i < self.n_sentinels:
            raise ConfigError(f"sentinel index {i} is outside 0..{self.n_sentinels - 1}")
        return vocab_size - 1 - i

    def first_sentinel_id(self, vocab_size: int) -> int:
        """Smallest sentinel id; ids >= this are sentinels."""
        return vocab_size - self.n_sentinels

    def check_vocab_has_sentinels(self, vocab_size: int) -> None:
        needed = self.n_reserved_low + self.n_sentinels + 1
        if vocab_size < needed:
            raise ConfigError(
                f"vocab_size {vocab_size} is too small for {self.n_reserved_low} special tokens, "
                f"{self.n_sentinels} sentinels and at least one ordinary token (need >= {needed})"
            )

    def is_special(self, token_ids, vocab_size: int):
        """Boolean array: True for the fixed specials and the sentinels (numpy or jax arrays)."""
        return (token_ids < self.n_reserved_low) | (token_ids >= self.first_sentinel_id(vocab_size))


SPECIAL = SpecialTokens()
