"""Batches of packed rows with ``grain``: order and randomness are pure functions of (seed, step).

Batch ``k`` holds rows ``k*B .. k*B+B-1`` of an endless stream of epochs; each
epoch is a fresh permutation (grain's index shuffle seeded with ``seed + epoch``),
and a batch may straddle two epochs. The optional ``transform`` (e.g. MLM
masking) gets ``np.random.default_rng([seed, k])``, so batch ``k`` is the same
whatever ran before, and resuming from ``it.get_state()`` (a small JSON-able
dict, e.g. ``{"next_index": 1234}``) continues with exactly the next batch.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import grain
import numpy as np

from archlab.data.packing import PackedRows
from archlab.errors import ConfigError

Batch = dict[str, np.ndarray]
Transform = Callable[[Batch, np.random.Generator], Batch]


def batch_dataset(
    rows: PackedRows,
    *,
    batch_size: int,
    seed: int,
    transform: Transform | None = None,
    shuffle: bool = True,
    num_epochs: int | None = None,
    drop_remainder: bool = True,
) -> grain.MapDataset:
    """A random-access grain dataset of batches (``ds[k]`` is batch ``k``); ``num_epochs=None`` repeats forever."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    if not 0 <= seed < 2**32:
        raise ConfigError(f"data seed must be in [0, 2**32), got {seed}")
    if num_epochs is not None and drop_remainder and num_epochs * rows.n_rows < batch_size:
        raise ConfigError(
            f"batch_size {batch_size} exceeds the {num_epochs * rows.n_rows} rows of {num_epochs} epoch(s); "
            "no full batch can be made"
        )
    arrays = rows.as_dict()

    def gather(index_B: np.ndarray) -> Batch:
        # batching indices first and gathering once is one fancy-index per array, not B row copies
        return {name: a[index_B] for name, a in arrays.items()}

    ds = grain.MapDataset.range(rows.n_rows)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs).batch(batch_size, drop_remainder=drop_remainder).map(gather)
    if transform is not None:
        ds = ds.map_with_index(lambda step, batch: transform(batch, batch_rng(seed, step)))
    return ds


def batch_rng(seed: int, step: int) -> np.random.Generator:
    """The generator handed to the transform for batch ``step``."""
    return np.random.default_rng([seed, step])


def build_iterator(
    rows: PackedRows,
    *,
    batch_size: int,
    seed: int,
    transform: Transform | None = None,
    shuffle: bool = True,
    num_epochs: int | None = None,
    drop_remainder: bool = True,
    prefetch: int = 2,
) -> grain.DatasetIterator:
    """Iterator over batches (dicts of ``[batch_size, row_length]`` arrays) with ``get_state``/``set_state``.

    ``prefetch`` batches are prepared ahead in one background thread (0: none);
    more threads would only contend for the GIL over in-memory arrays.
    """
    ds = batch_dataset(
        rows,
        batch_size=batch_size,
        seed=seed,
        transform=transform,
        shuffle=shuffle,
        num_epochs=num_epochs,
        drop_remainder=drop_remainder,
    )
    options = grain.ReadOptions(num_threads=1 if prefetch > 0 else 0, prefetch_buffer_size=prefetch)
    return iter(ds.to_iter_dataset(options))


def iterator_state_problem(state: object) -> str | None:
    """Why ``state`` cannot be a ``build_iterator`` state, or None.

    grain's ``set_state`` reads only ``next_index`` and fails on anything else deep inside the
    iterator (a KeyError, a TypeError), so a checkpoint's state is checked before it is used.
    """
    if not isinstance(state, dict):
        return f"holds a JSON {type(state).__name__}, not an iterator state object"
    index = state.get("next_index")
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        shown = json.dumps(state)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        return f"is not an iterator state: {shown} has no non-negative integer 'next_index'"
    return None


def batch_at(
    rows: PackedRows,
    step: int,
    *,
    batch_size: int,
    seed: int,
    transform: Transform | None = None,
    shuffle: bool = True,
) -> Batch:
    """Batch ``step`` of the endless stream, computed directly (the same one the iterator yields)."""
    return batch_dataset(rows, batch_size=batch_size, seed=seed, transform=transform, shuffle=shuffle)[step]
