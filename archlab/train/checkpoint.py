"""Checkpoints: train state, data-iterator state and run metadata in one orbax step, with checksums.

Layout (orbax ``CheckpointManager`` with ``ocp.args.Composite``)::

    checkpoints/<step>/state/       pytree of arrays (params, optimizer state, step, RNG key data)
    checkpoints/<step>/data/        grain iterator state (JSON)
    checkpoints/<step>/meta/        run metadata (JSON: W&B run id, tokens seen, version...)
    checkpoints/<step>/integrity/   checksums.json: a digest of every array and of data/ and meta/

Only the orbax directory is written here; the caller keeps the resolved config
beside it. orbax writes a step into ``<step>.orbax-checkpoint-tmp``, then writes
``_CHECKPOINT_METADATA`` and ``commit_success.txt`` and renames it into place, so
a step directory without both files never committed, and the checksums commit
with the step (``train/integrity.py``).

orbax lists any such directory as a step and does not check array files until
they are read, so ``restore`` reads a step in full and verifies it before
trusting it: commit markers, orbax's JSON files, the checksum record against
orbax's metadata, every array, data/ and meta/ against their digests, and
data/ as an iterator state. A step from an archlab that wrote no checksums
(its ``_CHECKPOINT_METADATA`` lists no ``integrity`` item) restores unverified,
with a warning; one that lists the item but lacks the file is corrupt. With
``step=None`` a corrupt step is skipped (one warning line) in favour of the
newest one that verifies. With ``set_aside=True`` (the training run, which owns
the directory) the skipped steps are renamed ``corrupt-<step>-<ns>`` once a good
one is found, so the resumed run saves those steps afresh, and rotation never
deletes them (``train/set_aside.py`` bounds how many are kept). When no step
verifies, nothing is moved. A crashed save's temporary directory is renamed
aside (``abandoned-<step>-<ns>``), not replaced, when its step is saved again.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Self

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from archlab.errors import CheckpointError, CorruptCheckpointError
from archlab.train import distributed, integrity
from archlab.train import set_aside as aside
from archlab.train.integrity import IntegrityError
from archlab.train.integrity import leaf_key as _key
from archlab.train.orbax_reads import contained_read_noise, describe

log = logging.getLogger(__name__)

PyTree = Any

ITEMS = integrity.ITEMS
JSON_FILE = integrity.JSON_FILE
_COMMIT_FILES = integrity.COMMIT_FILES
# orbax's in-progress directory for a step (some versions append -<timestamp>).
TMP_MARK = ".orbax-checkpoint-tmp"
_TMP_NAME = re.compile(r"(0|[1-9]\d*)" + re.escape(TMP_MARK) + r"(-\d+)?")
DEFAULT_KEEP_SET_ASIDE = 3


class Restored(NamedTuple):
    step: int
    state: PyTree
    data: dict
    meta: dict


class _Unusable(Exception):
    """A step that cannot be restored because of what is (or is not) on disk.

    ``in_reads``: raised by a failed orbax read, which leaves other reads in flight (see ``_attempt``).
    """

    def __init__(self, reason: str, *, in_reads: bool = False):
        super().__init__(reason)
        self.in_reads = in_reads


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


def set_aside_dirs(root: str | os.PathLike) -> list[dict]:
    """The ``corrupt-*`` and ``abandoned-*`` directories under a checkpoint root, oldest first
    (name, step, kind, reason, time): what a run's ``summary.json`` lists as ``set_aside``."""
    return aside.entries(Path(root))


def saved_state_shapes(step_dir: str | os.PathLike) -> PyTree:
    """The stored state of one step as ``jax.ShapeDtypeStruct`` leaves (a restore target)."""
    metadata = ocp.StandardCheckpointHandler().metadata(Path(step_dir) / "state")
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), getattr(metadata, "tree", metadata))


def _looks_like_step(path: Path) -> bool:
    return any((path / name).exists() for name in (*_COMMIT_FILES, *ITEMS))


@jax.jit
def _all_finite(leaves: list) -> list:
    return [jnp.isfinite(leaf).all() for leaf in leaves]


def _first_non_finite(state: PyTree) -> str | None:
    """Path of the first floating leaf holding NaN/Inf, checked with one host transfer."""
    paths, leaves = [], []
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        dtype = leaf.dtype if hasattr(leaf, "dtype") else np.asarray(leaf).dtype
        if jnp.issubdtype(dtype, jnp.inexact):
            paths.append(path)
            leaves.append(leaf)
    # One program for every leaf: over several processes, op-by-op checks (a program per leaf and op,
    # each with its own collective) were seen to hang a save on CPU devices.
    checks = _all_finite(leaves)
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


def _at_stored_dtypes(target: PyTree, record: dict | None) -> tuple[PyTree, dict[str, Any]]:
    """``target`` with each leaf at the dtype it was saved in, and the dtypes to cast to afterwards.

    orbax casts on restore; a cast leaf could not be checked against its digest.
    """
    casts: dict[str, Any] = {}
    if record is None:
        return target, casts

    def leaf(path, x):
        key = _key(path)
        stored, wanted = jnp.dtype(record["state"][key]["dtype"]), jnp.result_type(x)
        if stored == wanted:
            return x
        casts[key] = wanted
        return jax.ShapeDtypeStruct(tuple(np.shape(x)), stored, sharding=getattr(x, "sharding", None))

    return jax.tree_util.tree_map_with_path(leaf, target), casts


def _and_more(keys: list[str]) -> str:
    return f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""


def restore_together(checkpointers: Sequence[Checkpointer], targets: Sequence[PyTree], at_most: int) -> list[Restored]:
    """The newest step, at most ``at_most``, that verifies in every one of ``checkpointers`` (runs that
    share one step counter: packed members), restored in each; the corrupt steps skipped are set aside.

    A checkpointer that falls back pulls the others back with it; their newer good steps stay on disk.
    """
    while True:
        restored = [c.restore(None, t, set_aside=True, at_most=at_most) for c, t in zip(checkpointers, targets)]
        common = min(r.step for r in restored)
        if all(r.step == common for r in restored):
            return restored
        at_most = common  # strictly lower each round: a restored step is never above at_most


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
    """Saves and restores (state, data-iterator state, metadata) by step; see the module docstring.

    ``keep_set_aside``: how many set-aside directories (``corrupt-*``, ``abandoned-*``) to keep
    whenever this checkpointer sets one aside; older ones are deleted (``train/set_aside.py``).
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 3, async_save: bool = True,
                 keep_set_aside: int = DEFAULT_KEEP_SET_ASIDE):
        if max_to_keep < 1:
            raise CheckpointError(f"max_to_keep must be at least 1, got {max_to_keep}.")
        if keep_set_aside < 0:
            raise CheckpointError(f"keep_set_aside must be at least 0, got {keep_set_aside}.")
        self.directory = Path(directory).expanduser().absolute()
        self.keep_set_aside = keep_set_aside
        handlers = {
            "state": ocp.StandardCheckpointHandler(),
            "data": ocp.JsonCheckpointHandler(filename=JSON_FILE),
            "meta": ocp.JsonCheckpointHandler(filename=JSON_FILE),
            integrity.ITEM: ocp.JsonCheckpointHandler(filename=integrity.FILENAME),
        }
        self._handler_names = {item: h.typestr() for item, h in handlers.items()}
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save),
            item_handlers=handlers,
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

        The checksums are computed here, from a host copy of ``state``, before orbax takes over.
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

        # Process 0 decides: another process may already see process 0's new temporary directory and
        # skip a save the others are in (orbax's save is collective: they would wait for it forever).
        reason = self._reason_not_to_save(step, force)
        if distributed.agree(reason is not None):
            log.warning("%s", reason or f"not saving step {step}: process 0 skips it")
            return False

        record = integrity.make_record(state, data, meta, self._handler_names)
        self._set_aside_unfinished(step)
        distributed.barrier(f"save-{step}")  # the stale directory is gone before any process writes
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data),
                meta=ocp.args.JsonSave(meta),
                **{integrity.ITEM: ocp.args.JsonSave(record)},
            ),
            # The decision is ours: orbax would also skip any step below a half-written newer one.
            force=True,
        )
        self._unusable.discard(step)  # a step set aside as corrupt is being written afresh
        return True

    def _reason_not_to_save(self, step: int, force: bool) -> str | None:
        on_disk = _step_dirs(self.directory)
        in_flight = {s for s in self._manager.all_steps() if s not in on_disk}
        if step in on_disk or step in in_flight:
            return f"checkpoint step {step} already exists in {self.directory}; not overwriting it"
        if not force:
            committed = {s for s, p in on_disk.items() if _is_committed(p)}
            newer = sorted(s for s in (committed | in_flight) - self._unusable if s > step)
            if newer:
                return (f"not saving step {step}: {self.directory} already holds the newer step {newer[-1]} "
                        "(pass force=True to save anyway)")
        return None

    def _set_aside_unfinished(self, step: int) -> None:
        """Rename a crashed save's temporary directory for ``step`` so orbax does not delete it."""
        stale = _unfinished_dirs(self.directory).get(step)
        if stale is None or jax.process_index() != 0:
            return
        target = self._set_aside(stale, step, "abandoned", f"half-written: orbax temporary directory {stale.name}, "
                                 "never committed")
        log.warning("an unfinished save of step %d was left in %s; moved it to %s", step, stale, target.name)

    def _set_aside(self, path: Path, step: int, kind: str, reason: str) -> Path:
        # A name that does not start with the step number: orbax would take "<step>.<anything>"
        # for that step and could delete it in max_to_keep rotation instead of the real old step.
        target = aside.set_aside(path, step, kind, reason)
        aside.prune(self.directory, self.keep_set_aside)
        return target

    # -- restoring ---------------------------------------------------------------

    def restore(self, step: int | None, abstract_state: PyTree, *, set_aside: bool = False,
                at_most: int | None = None) -> Restored:
        """Restore ``step``, or with None the newest step (at most ``at_most``) that verifies.

        ``abstract_state`` is a pytree of ``jax.ShapeDtypeStruct`` (or arrays)
        with the target structure, shapes, dtypes and shardings. A state that
        does not match it raises CheckpointError; it is not treated as corruption.
        A named step that fails its checks raises CorruptCheckpointError. With
        ``set_aside`` (only for the run that owns the directory), the newer steps
        skipped on the way to a good one are renamed ``corrupt-<step>-<ns>``
        (``abandoned-...`` for temporary directories).
        """
        self.wait()
        self._manager.reload()
        steps = _step_dirs(self.directory)
        unfinished = {s: p for s, p in _unfinished_dirs(self.directory).items() if s not in steps}
        if step is not None:
            if step in unfinished:
                raise CorruptCheckpointError(
                    f"checkpoint step {step} in {self.directory} is unusable: "
                    f"half-written (orbax temporary directory {unfinished[step].name}, never committed)."
                )
            if step not in steps:
                available = sorted(s for s, p in steps.items() if _is_committed(p))
                raise CheckpointError(
                    f"no checkpoint for step {step} in {self.directory} (available steps: {available})."
                )
            result = self._attempt(step, steps[step], abstract_state)
            if isinstance(result, str):
                raise CorruptCheckpointError(f"checkpoint step {step} in {self.directory} is unusable: {result}.")
            return result

        candidates = sorted({**unfinished, **steps}.items(), reverse=True)
        if at_most is not None:
            candidates = [(s, p) for s, p in candidates if s <= at_most]
        if not candidates:
            raise CheckpointError(f"no checkpoints in {self.directory}")
        skipped: dict[int, str] = {}
        for s, path in candidates:
            if s in unfinished:
                skipped[s] = f"half-written: orbax temporary directory {path.name}, never committed"
                continue
            result = self._attempt(s, path, abstract_state)
            if isinstance(result, str):
                skipped[s] = result
                continue
            if (chosen := distributed.agree(s)) != s:  # every process read the same files: they choose alike
                raise CheckpointError(f"the processes of this run chose different checkpoint steps in "
                                      f"{self.directory} (process 0: {chosen}, this one: {s}); do they share one "
                                      "file system?")
            distributed.barrier(f"restored-{s}")  # nobody still reads a step process 0 sets aside
            moved = self._set_aside_skipped(skipped, steps, unfinished) if set_aside else []
            if skipped:
                self._warn_skipped(skipped, moved, s)
            return result
        # Nothing verified: leave every directory as it is, for whoever decides what to keep.
        details = "; ".join(f"step {k}: {v}" for k, v in skipped.items())
        raise CheckpointError(f"no usable checkpoint in {self.directory} ({details}).")

    def _set_aside_skipped(self, skipped: dict[int, str], steps: dict[int, Path],
                           unfinished: dict[int, Path]) -> list[str]:
        if jax.process_index() != 0:
            return []
        moved = []
        for s, why in skipped.items():
            kind, path = ("abandoned", unfinished[s]) if s in unfinished else ("corrupt", steps[s])
            moved.append(self._set_aside(path, s, kind, why).name)
        self._manager.reload()  # orbax must not try to rotate out a step that is no longer there
        return moved

    def _warn_skipped(self, skipped: dict[int, str], moved: list[str], restored: int) -> None:
        where = f"set aside as {', '.join(moved)}; " if moved else ""
        if len(skipped) == 1:
            ((bad, why),) = skipped.items()
            log.warning("checkpoint step %d in %s is unusable (%s); %srestored step %d instead",
                        bad, self.directory, why, where, restored)
        else:
            log.warning("checkpoint steps %s in %s are unusable (%s); %srestored step %d instead",
                        ", ".join(map(str, skipped)), self.directory,
                        "; ".join(f"{k}: {v}" for k, v in skipped.items()), where, restored)

    def _attempt(self, step: int, step_dir: Path, abstract_state: PyTree) -> Restored | str:
        """The verified step, or why it is unusable (the exception is not kept: it would keep
        orbax's abandoned reads alive past the collection that silences them)."""
        with contained_read_noise() as settle:
            try:
                return self._restore_step(step, step_dir, abstract_state)
            except _Unusable as e:
                reason, in_reads = str(e), e.in_reads
            self._unusable.add(step)
            if in_reads:
                settle()  # the exception (and the frames it held) is gone: the abandoned reads are garbage now
            return reason

    def _restore_step(self, step: int, step_dir: Path, abstract_state: PyTree) -> Restored:
        if (problem := integrity.on_disk_problem(step_dir)) is not None:
            raise _Unusable(problem)
        record = None
        if integrity.lists_integrity(step_dir):
            try:
                record = integrity.check_record(
                    json.loads((step_dir / integrity.ITEM / integrity.FILENAME).read_text()))
            except IntegrityError as e:
                raise _Unusable(str(e)) from None
            if (problem := integrity.commit_record_problem(record, step_dir)) is not None:
                raise _Unusable(problem)
        try:
            saved = ocp.StandardCheckpointHandler().metadata(step_dir / "state")
        except Exception as e:  # noqa: BLE001 - whatever orbax raises on unreadable metadata
            raise _Unusable(f"state metadata unreadable ({describe(e)})", in_reads=True) from None
        saved_tree = getattr(saved, "tree", saved)  # orbax's tree metadata wraps a dict
        if record is not None and (problem := integrity.metadata_problem(record, saved_tree)) is not None:
            raise _Unusable(problem)
        retired = _retired_keys(saved_tree, abstract_state)
        if retired:  # restore them as stored, then drop them: older checkpoints stay readable
            abstract_state = {**abstract_state, **{k: _abstract_leaf(saved_tree[k]) for k in retired}}
        if (mismatch := _structure_mismatch(saved, abstract_state)) is not None:
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} does not match the expected state: {mismatch}."
            )
        target, casts = _at_stored_dtypes(abstract_state, record)
        try:
            out = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target),
                    data=ocp.args.JsonRestore(),
                    meta=ocp.args.JsonRestore(),
                ),
            )
        except Exception as e:  # noqa: BLE001 - the structure was checked above, so a failure here is the files
            raise _Unusable(describe(e), in_reads=True) from None
        if (problem := self._content_problem(record, out.state, out.data, out.meta)) is not None:
            raise _Unusable(problem)
        state = out.state
        if casts:
            state = jax.tree_util.tree_map_with_path(
                lambda p, x: x.astype(casts[_key(p)]) if _key(p) in casts else x, state)
        if retired:
            state = {k: v for k, v in state.items() if k not in retired}
        if record is None:
            log.warning("checkpoint step %d in %s has no checksums (saved by an older archlab); restored it unverified",
                        step, self.directory)
        return Restored(step=step, state=state, data=out.data, meta=out.meta)

    @staticmethod
    def _content_problem(record: dict | None, state: PyTree, data: Any, meta: Any) -> str | None:
        """What is wrong with what was read: digests (when recorded), then the items' own form."""
        from archlab.data.pipeline import iterator_state_problem

        if record is not None:
            for problem in (integrity.state_problem(record, state), integrity.json_problem(record, "data", data),
                            integrity.json_problem(record, "meta", meta)):
                if problem is not None:
                    return problem
        if (problem := iterator_state_problem(data)) is not None:
            return f"data/ {problem}"
        if not isinstance(meta, dict):
            return f"meta/ holds a JSON {type(meta).__name__}, not an object"
        return None

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

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
