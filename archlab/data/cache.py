"""Where archlab keeps derived data (tokenizers, packed corpora) and how cache keys are made.

The root is, in order: an explicit ``cache_dir`` argument, the ``ARCHLAB_CACHE``
environment variable, ``~/.cache/archlab``. Keys are content hashes, so a cache
entry can never be stale: changed text gives a new key, not a wrong hit.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

CACHE_ENV_VAR = "ARCHLAB_CACHE"

# 16 hex digits (64 bits) keep file names short; collisions among a user's corpora are not a concern.
_ID_CHARS = 16


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache root: ``cache_dir``, else ``$ARCHLAB_CACHE``, else ``~/.cache/archlab``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV_VAR)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "archlab"


def content_id(documents: Iterable[str]) -> str:
    """Stable hash of an ordered list of documents (same on every machine and Python version).

    Each document is length-prefixed so that moving text across a document
    boundary changes the id (it changes where [EOS] goes).
    """
    digest = hashlib.sha256()
    for doc in documents:
        data = doc.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()[:_ID_CHARS]


def text_id(text: str) -> str:
    """Stable hash of one string (e.g. a serialised tokenizer)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:_ID_CHARS]


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_path)`` and move the result onto ``path`` in one step.

    Runs of a sweep may share a cache; a reader must never see a half-written file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
