"""What a good checkpoint step is: its files (``on_disk_problem``) and its checksums (recorded at save).

Every step holds ``integrity/checksums.json``, an orbax JSON item written inside the step's
temporary directory, so it commits (or not) together with the rest of the step::

    {"format": 1, "algorithm": "sha256",
     "state": {"params/w": {"dtype": "float32", "shape": [3, 4], "digest": "<hex>"}, ...},
     "data": "<hex>", "meta": "<hex>"}

A leaf's digest covers its dtype name, shape and C-order bytes on the host; a JSON item's digest
covers its canonical text (sorted keys, no spaces), so it does not depend on how orbax lays out
the file. The state's digests are computed from the host copy of the state being saved, before an
asynchronous save is handed to orbax; in a run over several processes every process gathers the
full arrays (``distributed.host_arrays``) and computes the same record, which process 0 writes.

Before any array is read, ``on_disk_problem`` checks the commit markers, the item directories and
every JSON file orbax and archlab wrote (a torn or emptied one would otherwise fail deep inside
orbax's asynchronous reads, far from a message that names it).
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from archlab.train.orbax_reads import describe

ITEMS = ("state", "data", "meta")
JSON_ITEMS = ("data", "meta")
JSON_FILE = "metadata"  # the file orbax's JsonCheckpointHandler writes in data/ and meta/ (its default)
ITEM = "integrity"
FILENAME = "checksums.json"
# Both are written by orbax 0.12 before the rename that commits a step.
MARKER = "commit_success.txt"
COMMIT_FILES = ("_CHECKPOINT_METADATA", MARKER)
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax 0.12's suffix of a step being written
FORMAT = 1
ALGORITHM = "sha256"
# hashlib releases the GIL on large buffers, so a few threads hash a large state several times faster.
_THREADS = max(1, min(4, os.cpu_count() or 1))


class IntegrityError(Exception):
    """A checksum record that is invalid, or a step that does not match its record (the message says which)."""


def leaf_key(path: tuple) -> str:
    """A pytree path as ``a/b/0``: the same for a dict and an optax NamedTuple (orbax stores both as dicts)."""
    import jax

    return jax.tree_util.keystr(path, simple=True, separator="/") or "<root>"


def array_digest(array: Any) -> str:
    """Digest of an array's dtype name, shape and C-order bytes."""
    a = np.asarray(array)
    digest = hashlib.new(ALGORITHM)
    digest.update(f"{a.dtype.name}{list(a.shape)}\0".encode())
    digest.update(np.ascontiguousarray(a).reshape(-1).view(np.uint8))
    return digest.hexdigest()


def json_digest(item: Any) -> str:
    """Digest of a JSON value's canonical text."""
    text = json.dumps(item, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.new(ALGORITHM, text.encode()).hexdigest()


def host_leaves(tree: Any) -> dict[str, np.ndarray]:
    """Every leaf of ``tree`` on the host (one transfer, or gathered from every process), by ``leaf_key``."""
    import jax

    from archlab.train.distributed import host_arrays

    flat = jax.tree_util.tree_leaves_with_path(tree)
    host = host_arrays([leaf for _, leaf in flat])
    return {leaf_key(path): x for (path, _), x in zip(flat, host)}


def _digests(leaves: dict[str, np.ndarray]) -> dict[str, str]:
    with ThreadPoolExecutor(_THREADS) as pool:
        return dict(zip(leaves, pool.map(array_digest, leaves.values())))


def make_record(state: Any, data: Any, meta: Any, handlers: dict[str, str]) -> dict:
    """The checksum record of a step about to be saved (``data`` and ``meta`` must be JSON-serialisable).

    ``handlers`` (item -> orbax handler type name) is what orbax will write into the step's
    ``_CHECKPOINT_METADATA``; recording it here lets a damaged commit record be told apart.
    """
    leaves = host_leaves(state)
    digests = _digests(leaves)
    return {
        "format": FORMAT,
        "algorithm": ALGORITHM,
        "handlers": dict(handlers),
        "state": {k: {"dtype": a.dtype.name, "shape": list(a.shape), "digest": digests[k]} for k, a in leaves.items()},
        # Through a JSON round trip, as orbax stores them: tuples become lists, int keys strings.
        "data": json_digest(json.loads(json.dumps(data))),
        "meta": json_digest(json.loads(json.dumps(meta))),
    }


def _is_digest(value: Any) -> bool:
    return isinstance(value, str) and len(value) == hashlib.new(ALGORITHM).digest_size * 2


def check_record(record: Any) -> dict:
    """``record`` if it is a well-formed checksum record; raises IntegrityError saying what is wrong."""
    if not isinstance(record, dict) or record.get("format") != FORMAT or record.get("algorithm") != ALGORITHM:
        raise IntegrityError(f"{ITEM}/{FILENAME} is not a format-{FORMAT} {ALGORITHM} checksum record")
    state = record.get("state")
    if not isinstance(state, dict) or not state:
        raise IntegrityError(f"{ITEM}/{FILENAME} lists no state arrays")
    for key, entry in state.items():
        if not (isinstance(entry, dict) and isinstance(entry.get("dtype"), str) and _is_digest(entry.get("digest"))
                and isinstance(entry.get("shape"), list) and all(isinstance(n, int) for n in entry["shape"])):
            raise IntegrityError(f"{ITEM}/{FILENAME} has a malformed entry for '{key}'")
    for name in ("data", "meta"):
        if not _is_digest(record.get(name)):
            raise IntegrityError(f"{ITEM}/{FILENAME} has no digest for {name}/")
    handlers = record.get("handlers")  # absent in records written before it was added
    if handlers is not None and not (isinstance(handlers, dict) and all(isinstance(v, str) for v in handlers.values())):
        raise IntegrityError(f"{ITEM}/{FILENAME} has a malformed handler list")
    return record


def commit_record_problem(record: dict, step_dir: Path) -> str | None:
    """How the step's ``_CHECKPOINT_METADATA`` disagrees with the handlers the checksum record lists, or None."""
    if (recorded := record.get("handlers")) is None:
        return None
    listed = json.loads((step_dir / "_CHECKPOINT_METADATA").read_text()).get("item_handlers")
    if listed != recorded:
        return f"_CHECKPOINT_METADATA lists item handlers {listed!r}, {ITEM}/{FILENAME} recorded {recorded!r}"
    return None


def _json_file_problem(path: Path, rel: str, *, required: bool = True) -> str | None:
    """Why a JSON file of a step is unusable (missing, empty, torn), or None."""
    if not path.is_file():
        return f"{rel} is missing" if required else None
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        return f"{rel} is unreadable ({describe(e)})"
    if not text.strip():
        return f"{rel} is empty"
    try:
        json.loads(text)
    except ValueError as e:
        return f"{rel} is not valid JSON ({e})"
    return None


def lists_integrity(step_dir: Path) -> bool:
    """Whether the step was saved with checksums (its commit record names the integrity item)."""
    meta = json.loads((step_dir / "_CHECKPOINT_METADATA").read_text())
    handlers = meta.get("item_handlers")
    return isinstance(handlers, dict) and ITEM in handlers


def _commit_metadata_problem(meta: Any, step_dir: Path) -> str | None:
    """What is wrong with the parsed ``_CHECKPOINT_METADATA`` on its own, or None."""
    if not isinstance(meta, dict):
        return "_CHECKPOINT_METADATA is not a JSON object"
    handlers = meta.get("item_handlers")
    if not isinstance(handlers, dict) or not set(ITEMS) <= handlers.keys():
        return f"_CHECKPOINT_METADATA does not list the items {', '.join(ITEMS)}"
    if ITEM not in handlers and (step_dir / ITEM).is_dir():
        # a step saved without checksums has no integrity/ directory: one that has it lost its listing
        return f"_CHECKPOINT_METADATA does not list the '{ITEM}' item the step holds"
    init, commit = meta.get("init_timestamp_nsecs"), meta.get("commit_timestamp_nsecs")
    if not (type(init) is int and type(commit) is int and 0 < init <= commit):
        return "_CHECKPOINT_METADATA has no valid save and commit times"
    return None


def _markers_problem(step_dir: Path, items: tuple[str, ...]) -> str | None:
    """Whether orbax's commit markers (one for the step, one per item) all name the same save.

    Their text is ``<message> <path>``: the step's names its final directory, an item's the
    temporary directory the step was written in, plus the item. One damaged marker disagrees
    with the others, so any change to any of them is caught without knowing where the run was.
    """
    texts = {}
    for rel in (MARKER, *(f"{item}/{MARKER}" for item in items)):
        try:
            texts[rel] = (step_dir / rel).read_text()
        except FileNotFoundError:
            return f"{rel} is missing"
        except (OSError, UnicodeDecodeError) as e:
            return f"{rel} is unreadable ({describe(e)})"
    top = texts[MARKER]
    if "/" not in top or not top.rsplit("/", 1)[1].isdigit():
        return f"{MARKER} does not name a step directory"
    for item in items:
        if texts[f"{item}/{MARKER}"] not in (f"{top}{TMP_SUFFIX}/{item}", f"{top}/{item}"):
            return f"{item}/{MARKER} does not match the step's {MARKER}"
    return None


def on_disk_problem(step_dir: Path) -> str | None:
    """What makes a step directory unusable without reading its arrays, or None."""
    for name in COMMIT_FILES:
        if not (step_dir / name).is_file():
            return f"half-written: no {name}, so the save never committed"
    try:
        meta = json.loads((step_dir / "_CHECKPOINT_METADATA").read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return f"_CHECKPOINT_METADATA is not valid JSON ({e})"
    if (problem := _commit_metadata_problem(meta, step_dir)) is not None:
        return problem
    with_checksums = ITEM in meta["item_handlers"]
    items = (*ITEMS, ITEM) if with_checksums else ITEMS
    for item in items:
        if not (step_dir / item).is_dir():
            return f"item directory '{item}' is missing"
    # Only steps saved with checksums are held to the marker layout of the orbax they were saved with.
    if with_checksums and (problem := _markers_problem(step_dir, items)) is not None:
        return problem
    # orbax's own JSON files: a torn or emptied one fails deep inside its async reads otherwise.
    state = step_dir / "state"
    checks = [(state / "_METADATA", "state/_METADATA", True), (state / "_sharding", "state/_sharding", with_checksums)]
    if (state / "array_metadatas").is_dir():
        checks += [(p, f"state/array_metadatas/{p.name}", True) for p in sorted((state / "array_metadatas").iterdir())]
    checks += [(step_dir / item / JSON_FILE, f"{item}/{JSON_FILE}", True) for item in JSON_ITEMS]
    if ITEM in items:
        checks.append((step_dir / ITEM / FILENAME, f"{ITEM}/{FILENAME}", True))
    for path, rel, required in checks:
        if (problem := _json_file_problem(path, rel, required=required)) is not None:
            return problem
    return _state_names_problem(state) if with_checksums else None


_ARRAY_METADATA_KEYS = {"param_name", "write_shape", "chunk_shape", "ext_metadata"}


def _state_names_problem(state: Path) -> str | None:
    """Whether orbax's three descriptions of the stored arrays name the same arrays.

    ``_METADATA`` (the tree), ``_sharding`` (keyed by base64 of each name) and
    ``array_metadatas/process_<i>`` each list every array of the save. orbax reads only some of
    them when the target's shardings are given, so a damaged one could pass unnoticed: here a
    missing or edited entry in any of them disagrees with the other two.
    """
    import ast
    import base64
    import binascii

    tree = json.loads((state / "_METADATA").read_text()).get("tree_metadata")
    if not isinstance(tree, dict) or not tree:
        return "state/_METADATA lists no arrays"
    try:  # leaves that are not arrays (an optax state's None) have neither sharding nor array metadata
        names = {".".join(ast.literal_eval(key)) for key, leaf in tree.items()
                 if leaf["value_metadata"]["value_type"] == "jax.Array"}
    except (ValueError, SyntaxError, TypeError, KeyError):
        return "state/_METADATA has a malformed array entry"
    try:
        sharded = {base64.b64decode(key, validate=True).decode() for key in json.loads((state / "_sharding").read_text())}
    except (binascii.Error, UnicodeDecodeError, AttributeError, TypeError):
        return "state/_sharding has a malformed array name"
    if sharded != names:
        return "state/_sharding does not list the arrays state/_METADATA lists"
    files = sorted((state / "array_metadatas").glob("process_*")) if (state / "array_metadatas").is_dir() else []
    if not files:
        return "state/array_metadatas/ holds no array metadata"
    described = set()
    for path in files:
        entries = json.loads(path.read_text())
        entries = entries.get("array_metadatas") if isinstance(entries, dict) else None
        if not isinstance(entries, list) or not all(
                isinstance(e, dict) and isinstance(e.get("array_metadata"), dict)
                and e["array_metadata"].keys() == _ARRAY_METADATA_KEYS for e in entries):
            return f"state/array_metadatas/{path.name} is not a list of array descriptions"
        described |= {e["array_metadata"]["param_name"] for e in entries}
    if described != names:
        return "state/array_metadatas/ does not describe the arrays state/_METADATA lists"
    return None


def _and_more(keys: list[str]) -> str:
    return f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""


def metadata_problem(record: dict, saved_tree: Any) -> str | None:
    """How orbax's metadata of the stored state disagrees with the checksum record, or None.

    Both were written by the same save, so any difference is corruption of one of them (and not
    a state that merely differs from the one a caller expects).
    """
    import jax

    saved = {leaf_key(p): m for p, m in jax.tree_util.tree_leaves_with_path(saved_tree)}
    recorded = record["state"]
    if missing := sorted(recorded.keys() - saved.keys()):
        return f"the state's metadata lacks '{missing[0]}', which {ITEM}/{FILENAME} lists" + _and_more(missing)
    if extra := sorted(saved.keys() - recorded.keys()):
        return f"the state's metadata lists '{extra[0]}', which {ITEM}/{FILENAME} lacks" + _and_more(extra)
    for key, entry in recorded.items():
        shape, dtype = getattr(saved[key], "shape", None), getattr(saved[key], "dtype", None)
        if shape is not None and list(shape) != entry["shape"]:
            return f"'{key}' has shape {tuple(shape)} in the state's metadata, {tuple(entry['shape'])} in {FILENAME}"
        if dtype is not None and np.dtype(dtype).name != entry["dtype"]:
            return f"'{key}' has dtype {np.dtype(dtype).name} in the state's metadata, {entry['dtype']} in {FILENAME}"
    return None


def state_problem(record: dict, restored: Any) -> str | None:
    """Which restored leaf does not match its recorded digest, or None (``restored``: the stored structure)."""
    leaves = host_leaves(restored)
    if leaves.keys() != record["state"].keys():  # the caller checked the structure; this is a guard
        return f"the restored state's leaves differ from those {ITEM}/{FILENAME} lists"
    digests = _digests(leaves)
    bad = [k for k in leaves if digests[k] != record["state"][k]["digest"]]
    return f"'{bad[0]}' does not match its checksum" + _and_more(bad) if bad else None


def json_problem(record: dict, name: str, item: Any) -> str | None:
    """Whether the restored JSON item ``name`` (``data`` or ``meta``) differs from its recorded digest."""
    return None if json_digest(item) == record[name] else f"{name}/ does not match its checksum"
