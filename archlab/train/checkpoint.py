"""Checkpoints: train state, data-iterator state and run metadata in one orbax step.

Layout (orbax ``CheckpointManager`` with ``ocp.args.Composite``)::

    checkpoints/<step>/state/   pytree of arrays (params, optimizer state, step, RNG key data)
    checkpoints/<step>/data/    grain iterator state (JSON)
    checkpoints/<step>/meta/    run metadata (JSON: W&B run id, tokens seen, version...)

Only the orbax directory is written here; the caller keeps the resolved config
beside it. orbax writes a step into ``<step>.orbax-checkpoint-tmp``, then writes
``_CHECKPOINT_METADATA`` and ``commit_success.txt`` and renames it into place, so
a step directory without both files never committed. orbax itself lists such a
directory as a step, and does not check array files until they are read, so
``restore`` checks each step and reads it in full before trusting it: with
``step=None`` a corrupt newest step is skipped (one warning) in favour of the
newest one that restores. Corrupt steps are left in place for inspection
(orbax's ``max_to_keep`` still rotates them out like any old step, and counts
them); a crashed save's temporary directory is renamed aside, not replaced,
when its step is saved again.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from archlab.errors import CheckpointError

log = logging.getLogger(__name__)

PyTree = Any

ITEMS = ("state", "data", "meta")
# Both are written by orbax 0.12 before the rename that commits a step.
_COMMIT_FILES = ("_CHECKPOINT_METADATA", "commit_success.txt")
# orbax's in-progress directory for a step (some versions append -<timestamp>).
TMP_MARK = ".orbax-checkpoint-tmp"
_TMP_NAME = re.compile(r"(0|[1-9]\d*)" + re.escape(TMP_MARK) + r"(-\d+)?")
_REASON_CHARS = 300


class Restored(NamedTuple):
    step: int
    state: PyTree
    data: dict
    meta: dict


class _Unusable(Exception):
    """A step that cannot be restored because of what is (or is not) on disk."""


def _step_of(name: str) -> int | None:
    """The step a directory name stands for (orbax's unpadded format), else None."""
    return int(name) if name.isdigit() and str(int(name)) == name else None


def _step_dirs(root: Path) -> dict[int, Path]:
    """Every ``<step>`` directory under ``root``, committed or not."""
    if not root.is_dir():
        return {}
    found = {}
    for p in root.iterdir():
        step = _step_of(p.name)
        if step is not None and p.is_dir():
            found[step] = p
    return found


def _unfinished_dirs(root: Path) -> dict[int, Path]:
    """orbax temporary directories of saves that have not committed (yet)."""
    if not root.is_dir():
        return {}
    return {int(m.group(1)): p for p in root.iterdir() if (m := _TMP_NAME.fullmatch(p.name)) and p.is_dir()}


def _is_committed(step_dir: Path) -> bool:
    return all((step_dir / name).is_file() for name in _COMMIT_FILES)


def committed_steps(root: str | os.PathLike) -> list[int]:
    """Steps under a checkpoint root whose save committed, ascending (without asking orbax)."""
    return sorted(s for s, p in _step_dirs(Path(root)).items() if _is_committed(p))


def saved_state_shapes(step_dir: str | os.PathLike) -> PyTree:
    """The stored state of one step as ``jax.ShapeDtypeStruct`` leaves (a restore target)."""
    metadata = ocp.StandardCheckpointHandler().metadata(Path(step_dir) / "state")
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), getattr(metadata, "tree", metadata))


def _on_disk_problem(step_dir: Path) -> str | None:
    """What makes a step directory unusable without reading its arrays, or None."""
    for name in _COMMIT_FILES:
        if not (step_dir / name).is_file():
            return f"half-written: no {name}, so the save never committed"
    try:
        meta = json.loads((step_dir / "_CHECKPOINT_METADATA").read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return f"_CHECKPOINT_METADATA is not valid JSON ({e})"
    if not isinstance(meta, dict):
        return "_CHECKPOINT_METADATA is not a JSON object"
    for item in ITEMS:
        if not (step_dir / item).is_dir():
            return f"item directory '{item}' is missing"
    return None


def _looks_like_step(path: Path) -> bool:
    return any((path / name).exists() for name in (*_COMMIT_FILES, *ITEMS))


def _key(path: tuple) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/") or "<root>"


def _first_non_finite(state: PyTree) -> str | None:
    """Path of the first floating leaf holding NaN/Inf, checked with one host transfer."""
    paths, checks = [], []
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        dtype = leaf.dtype if hasattr(leaf, "dtype") else np.asarray(leaf).dtype
        if jnp.issubdtype(dtype, jnp.inexact):
            paths.append(path)
            checks.append(jnp.isfinite(leaf).all())
    for path, ok in zip(paths, jax.device_get(checks)):
        if not ok:
            return _key(path)
    return None


def _structure_mismatch(saved: PyTree, wanted: PyTree) -> str | None:
    """How the stored state differs from the requested one (paths and shapes), or None.

    dtypes may differ (orbax casts on restore); containers may differ in kind
    (an optax NamedTuple is stored as a dict), so paths are compared by name.
    """
    saved_leaves = {_key(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(saved)}
    wanted_leaves = {_key(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(wanted)}
    if missing := sorted(wanted_leaves.keys() - saved_leaves.keys()):
        return f"it has no '{missing[0]}'" + _and_more(missing)
    if extra := sorted(saved_leaves.keys() - wanted_leaves.keys()):
        return f"it holds '{extra[0]}', which the target lacks" + _and_more(extra)
    for key, want in wanted_leaves.items():
        have = getattr(saved_leaves[key], "shape", None)
        if have is not None and tuple(have) != tuple(np.shape(want)):
            return f"'{key}' has shape {tuple(have)}, expected {tuple(np.shape(want))}"
    return None


# Top-level state entries earlier versions stored and this one no longer reads (train/state.py).
RETIRED_STATE_KEYS = ("nonfinite_kind",)


def _retired_keys(saved: PyTree, wanted: PyTree) -> list[str]:
    """Retired entries the stored state holds and the requested one lacks."""
    if not (isinstance(saved, Mapping) and isinstance(wanted, Mapping)):
        return []
    return [k for k in RETIRED_STATE_KEYS if k in saved and k not in wanted]


def _abstract_leaf(leaf) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(leaf.shape), leaf.dtype)


def _and_more(keys: list[str]) -> str:
    return f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""


def _describe(e: BaseException) -> str:
    text = " ".join(str(e).split()) or "no message"
    if len(text) > _REASON_CHARS:
        text = text[: _REASON_CHARS - 3] + "..."
    return f"{type(e).__name__}: {text}"


def find_checkpoint_dir(path: str | os.PathLike) -> tuple[Path, int | None]:
    """Locate a checkpoint root from a run directory, the root itself, or one step directory.

    Returns ``(checkpoint root, step)``; ``step`` is the step named by a step
    directory and None otherwise (meaning: the newest good step).
    """
    p = Path(path).expanduser()
    if p.is_dir() and _step_of(p.name) is not None and _looks_like_step(p):
        return p.parent, int(p.name)
    for root in (p / "checkpoints", p):
        if _step_dirs(root):
            return root, None
    raise CheckpointError(f"no checkpoints in {p}")


class Checkpointer:
    """Saves and restores (state, data-iterator state, metadata) by step; see the module docstring."""

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 3, async_save: bool = True):
        if max_to_keep < 1:
            raise CheckpointError(f"max_to_keep must be at least 1, got {max_to_keep}.")
        self.directory = Path(directory).expanduser().absolute()
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save),
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": ocp.JsonCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(),
            },
        )
        self._unusable: set[int] = set()  # committed steps this object failed to restore
        self._closed = False

    # -- listing -----------------------------------------------------------------

    def all_steps(self) -> list[int]:
        """Committed steps on disk, ascending, after pending saves finish.

        A committed step may still turn out to be corrupt when read; ``restore`` checks.
        """
        self.wait()
        return sorted(s for s, p in _step_dirs(self.directory).items() if _is_committed(p))

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    # -- saving ------------------------------------------------------------------

    def save(self, step: int, state: PyTree, *, data: dict, meta: dict, force: bool = False) -> bool:
        """Write ``step`` (asynchronously if enabled); returns whether a save was started.

        Raises CheckpointError for non-finite floating values or non-JSON data/meta.
        Never overwrites: an existing ``step`` is skipped with a warning. A step
        older than the newest usable checkpoint (e.g. after restoring an older
        step by hand) is also skipped with a warning unless ``force``.
        """
        if (bad := _first_non_finite(state)) is not None:
            raise CheckpointError(f"refusing to checkpoint step {step}: non-finite values in {bad}")
        for name, item in (("data", data), ("meta", meta)):
            try:
                json.dumps(item)
            except (TypeError, ValueError) as e:
                raise CheckpointError(
                    f"refusing to checkpoint step {step}: {name} is not JSON-serialisable ({e})"
                ) from None

        on_disk = _step_dirs(self.directory)
        in_flight = {s for s in self._manager.all_steps() if s not in on_disk}
        if step in on_disk or step in in_flight:
            log.warning("checkpoint step %d already exists in %s; not overwriting it", step, self.directory)
            return False
        if not force:
            committed = {s for s, p in on_disk.items() if _is_committed(p)}
            newer = sorted(s for s in (committed | in_flight) - self._unusable if s > step)
            if newer:
                log.warning(
                    "not saving step %d: %s already holds the newer step %d (pass force=True to save anyway)",
                    step, self.directory, newer[-1],
                )
                return False

        self._set_aside_unfinished(step)
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data),
                meta=ocp.args.JsonSave(meta),
            ),
            # The decision is ours: orbax would also skip any step below a half-written newer one.
            force=True,
        )
        return True

    def _set_aside_unfinished(self, step: int) -> None:
        """Rename a crashed save's temporary directory for ``step`` so orbax does not delete it."""
        stale = _unfinished_dirs(self.directory).get(step)
        if stale is None or jax.process_index() != 0:
            return
        # A name that does not start with the step number: orbax would take "<step>.<anything>"
        # for that step and could delete it in max_to_keep rotation instead of the real old step.
        target = stale.with_name(f"abandoned-{step}-{time.time_ns()}")
        stale.rename(target)
        log.warning("an unfinished save of step %d was left in %s; moved it to %s", step, stale, target.name)

    # -- restoring ---------------------------------------------------------------

    def restore(self, step: int | None, abstract_state: PyTree) -> Restored:
        """Restore ``step``, or with None the newest step that restores cleanly.

        ``abstract_state`` is a pytree of ``jax.ShapeDtypeStruct`` (or arrays)
        with the target structure, shapes, dtypes and shardings. A state that
        does not match it raises CheckpointError; it is not treated as corruption.
        """
        self.wait()
        self._manager.reload()
        steps = _step_dirs(self.directory)
        unfinished = {s: p for s, p in _unfinished_dirs(self.directory).items() if s not in steps}
        if step is not None:
            if step in unfinished:
                raise CheckpointError(
                    f"checkpoint step {step} in {self.directory} is unusable: "
                    f"half-written (orbax temporary directory {unfinished[step].name}, never committed)."
                )
            if step not in steps:
                available = sorted(s for s, p in steps.items() if _is_committed(p))
                raise CheckpointError(
                    f"no checkpoint for step {step} in {self.directory} (available steps: {available})."
                )
            try:
                return self._restore_step(step, steps[step], abstract_state)
            except _Unusable as e:
                raise CheckpointError(f"checkpoint step {step} in {self.directory} is unusable: {e}.") from None

        candidates = sorted({**unfinished, **steps}.items(), reverse=True)
        if not candidates:
            raise CheckpointError(f"no checkpoints in {self.directory}")
        skipped: dict[int, str] = {}
        for s, path in candidates:
            if s in unfinished:
                skipped[s] = f"half-written: orbax temporary directory {path.name}, never committed"
                continue
            try:
                restored = self._restore_step(s, path, abstract_state)
            except _Unusable as e:
                skipped[s] = str(e)
                continue
            if len(skipped) == 1:
                ((bad, why),) = skipped.items()
                log.warning(
                    "checkpoint step %d in %s is unusable (%s); restored step %d instead", bad, self.directory, why, s
                )
            elif skipped:
                log.warning(
                    "checkpoint steps %s in %s are unusable (%s); restored step %d instead",
                    ", ".join(map(str, skipped)),
                    self.directory,
                    "; ".join(f"{k}: {v}" for k, v in skipped.items()),
                    s,
                )
            return restored
        details = "; ".join(f"step {k}: {v}" for k, v in skipped.items())
        raise CheckpointError(f"no usable checkpoint in {self.directory} ({details}).")

    def _restore_step(self, step: int, step_dir: Path, abstract_state: PyTree) -> Restored:
        if (problem := _on_disk_problem(step_dir)) is not None:
            self._unusable.add(step)
            raise _Unusable(problem)
        try:
            saved = ocp.StandardCheckpointHandler().metadata(step_dir / "state")
        except Exception as e:  # whatever orbax raises on unreadable metadata
            self._unusable.add(step)
            raise _Unusable(f"state metadata unreadable ({_describe(e)})") from None
        saved_tree = getattr(saved, "tree", saved)  # orbax's tree metadata wraps a dict
        retired = _retired_keys(saved_tree, abstract_state)
        if retired:  # restore them as stored, then drop them: older checkpoints stay readable
            abstract_state = {**abstract_state, **{k: _abstract_leaf(saved_tree[k]) for k in retired}}
        if (mismatch := _structure_mismatch(saved, abstract_state)) is not None:
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} does not match the expected state: {mismatch}."
            )
        try:
            out = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state),
                    data=ocp.args.JsonRestore(),
                    meta=ocp.args.JsonRestore(),
                ),
            )
        except Exception as e:  # structure was checked above, so a failure here is the files
            self._unusable.add(step)
            raise _Unusable(_describe(e)) from None
        state = {k: v for k, v in out.state.items() if k not in retired} if retired else out.state
        return Restored(step=step, state=state, data=out.data, meta=out.meta)

    # -- lifecycle ---------------------------------------------------------------

    def wait(self) -> None:
        """Block until asynchronous saves have committed (re-raising their errors)."""
        if not self._closed:
            self._manager.wait_until_finished()

    def close(self) -> None:
        """Wait for pending saves, then release orbax's resources (idempotent)."""
        if not self._closed:
            self._manager.wait_until_finished()
            self._manager.close()
            self._closed = True

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
