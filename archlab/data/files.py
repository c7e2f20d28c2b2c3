"""The ``files`` document source: local .txt / .md / .jsonl / .parquet files matched by globs.

Files are read through Hugging Face ``datasets`` (streamed, so nothing is
copied into an Arrow cache): a text file is one document
(``sample_by="document"``; its line endings become ``\\n``), a jsonl or parquet
file gives one document per row from ``text_field``. Empty and whitespace-only
documents are dropped.

Text and jsonl files are checked for UTF-8 byte by byte first, because the
error ``datasets`` raises names neither the file nor the position.
"""

from __future__ import annotations

import codecs
import contextlib
import glob
import hashlib
import logging
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

from archlab.data.cache import cache_root
from archlab.errors import DataError

log = logging.getLogger(__name__)

# suffix -> datasets' packaged builder
FORMATS: dict[str, str] = {
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
}
_CHUNK_BYTES = 1 << 24


def files(
    split: str = "train",
    *,
    train: str | Sequence[str],
    validation: str | Sequence[str] | None = None,
    validation_fraction: float = 0.05,
    text_field: str = "text",
    on_decode_error: Literal["raise", "skip"] = "raise",
    cache_dir: str | os.PathLike | None = None,
) -> list[str]:
    """Documents of ``split`` from local files.

    ``train`` / ``validation`` are glob patterns (``**`` allowed). Without a
    ``validation`` glob, the train files are split by document: the
    ``validation_fraction`` of documents with the smallest SHA-256 of their
    text (at least one) are held out, a rule that does not depend on file
    order, machine or Python version.

    ``on_decode_error="skip"`` drops a file that is not UTF-8 with one warning
    instead of raising. ``cache_dir`` is the archlab cache root (``datasets``
    keeps its lock files under ``<root>/datasets``).
    """
    if split not in ("train", "validation"):
        raise DataError(f"unknown split {split!r}; use train or validation")
    if on_decode_error not in ("raise", "skip"):
        raise DataError(f"on_decode_error must be 'raise' or 'skip', not {on_decode_error!r}")
    if validation is not None:
        patterns = train if split == "train" else validation
        return read_documents(expand_globs(patterns), text_field, on_decode_error, cache_dir)

    if not 0.0 < validation_fraction < 1.0:
        raise DataError(
            f"validation_fraction must be strictly between 0 and 1 (got {validation_fraction}), "
            "or give a separate validation glob"
        )
    docs = read_documents(expand_globs(train), text_field, on_decode_error, cache_dir)
    if len(docs) < 2:
        raise DataError(
            f"cannot split {len(docs)} document into train and validation; add documents or give a validation glob"
        )
    held_out = validation_indices(docs, validation_fraction)
    return [d for i, d in enumerate(docs) if (i in held_out) == (split == "validation")]


def validation_indices(docs: Sequence[str], fraction: float) -> set[int]:
    """Indices of the held-out documents: the ``fraction`` with the smallest text hash (>= 1, <= n-1)."""
    n_val = min(len(docs) - 1, max(1, math.floor(fraction * len(docs) + 0.5)))
    keys = sorted((hashlib.sha256(d.encode("utf-8")).digest(), i) for i, d in enumerate(docs))
    return {i for _, i in keys[:n_val]}


def expand_globs(patterns: str | Sequence[str]) -> list[Path]:
    """Sorted, de-duplicated files matched by each pattern; a pattern matching nothing is an error."""
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    if not patterns:
        raise DataError("no file patterns given for the files data source")
    paths: dict[Path, None] = {}
    for pattern in patterns:
        matched = sorted(p for p in glob.glob(os.path.expanduser(str(pattern)), recursive=True) if os.path.isfile(p))
        if not matched:
            raise DataError(f"no file matches {str(pattern)!r}")
        paths.update((Path(p), None) for p in matched)
    return list(paths)


def first_bad_utf8(path: Path) -> tuple[int, int] | None:
    """``(byte offset, byte value)`` of the first byte that is not valid UTF-8, or None.

    Reads in chunks so a multi-GB jsonl shard is never held in memory at once.
    """
    decoder = codecs.getincrementaldecoder("utf-8")()
    consumed = 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_CHUNK_BYTES)
            # bytes of a character cut by the previous chunk boundary, re-fed with this chunk
            pending = len(decoder.getstate()[0])
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                return consumed - pending + e.start, e.object[e.start]
            if not chunk:
                return None
            consumed += len(chunk)


def read_documents(
    paths: Sequence[Path],
    text_field: str,
    on_decode_error: str,
    cache_dir: str | os.PathLike | None,
) -> list[str]:
    """All non-empty documents of ``paths`` in file order."""
    docs: list[str] = []
    for path in paths:
        builder = FORMATS.get(path.suffix.lower())
        if builder is None:
            raise DataError(f"{path} has an unsupported file type; use one of {', '.join(FORMATS)}")
        if builder != "parquet":  # parquet is binary; Arrow validates its strings itself
            bad = first_bad_utf8(path)
            if bad is not None:
                offset, byte = bad
                message = f"{path} is not UTF-8: byte 0x{byte:02x} at byte offset {offset}"
                if on_decode_error == "skip":
                    log.warning("skipping %s", message)
                    continue
                raise DataError(message)
        docs.extend(_read_one(path, builder, text_field, cache_dir))
    if not docs:
        shown = ", ".join(str(p) for p in paths[:3]) + (" ..." if len(paths) > 3 else "")
        raise DataError(f"the corpus is empty: {len(paths)} file(s) ({shown}) hold no non-empty documents")
    return docs


def _read_one(path: Path, builder: str, text_field: str, cache_dir: str | os.PathLike | None) -> list[str]:
    import datasets  # imported here: slow to import and unused by the other sources

    field = "text" if builder == "text" else text_field
    kwargs = {"sample_by": "document"} if builder == "text" else {}
    try:
        with _no_download_counter(datasets):
            ds = datasets.load_dataset(
                builder,
                data_files=[str(path)],
                split="train",
                streaming=True,
                cache_dir=str(cache_root(cache_dir) / "datasets"),
                **kwargs,
            )
            rows = list(ds)
    except Exception as e:  # datasets / Arrow raise many unrelated types; one clear line instead
        raise DataError(f"cannot read {path} as {builder}: {e}") from e
    docs = []
    for i, row in enumerate(rows):
        if field not in row:
            raise DataError(f"{path} row {i} has no field {field!r}; fields are {', '.join(row) or 'none'}")
        text = row[field]
        if text is None:
            continue
        if not isinstance(text, str):
            raise DataError(f"{path} row {i}: field {field!r} holds {type(text).__name__}, not text")
        if text.strip():
            docs.append(text)
    return docs


@contextlib.contextmanager
def _no_download_counter(datasets) -> Iterator[None]:
    """Stop ``load_dataset`` from pinging the hub's download counter for a local file.

    datasets 5 sends that request (3 s timeout) on every call, even for local
    files; reading local data must never touch the network or wait on it.
    """
    saved = datasets.config.HF_UPDATE_DOWNLOAD_COUNTS
    datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False
    try:
        yield
    finally:
        datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = saved
