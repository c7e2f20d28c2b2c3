"""The run directory: one writer (a lock a crash cannot leave stuck), config and tokenizer written once."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import time
from pathlib import Path
from typing import Callable, Iterator

import yaml

from archlab.config import resolve_auto_values
from archlab.errors import ConfigError

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
TOKENIZER_FILE = "tokenizer.json"
LOCK_FILE = ".lock"
LOG_FILE = "train.log"
WANDB_ID_FILE = "wandb_run_id"
# What must match for a run directory to be resumed rather than refused.
IDENTITY_KEYS = ("model", "objective", "data", "optimizer", "size_name")
IDENTITY_RUN_KEYS = ("seed", "batch_size", "tokens", "tokens_per_param", "flops", "steps", "branches")


class RunLock:
    """``flock`` on ``run_dir/.lock``: the kernel releases it when the holder dies, so no stale locks."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self.fd: int | None = None

    def __enter__(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(self.fd)
            raise ConfigError(
                f"run directory {self.path.parent} is in use by another archlab-train (pid {holder}); "
                "wait for it or choose another run.name"
            ) from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, str(os.getpid()).encode(), 0)
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)


def identity(resolved: dict) -> dict:
    data = {k: v for k, v in resolved.get("data", {}).items() if k != "cache_dir"}
    run = resolved.get("run", {})
    model = dict(resolved.get("model") or {})
    if "remat" in model and "head_chunk" in model:
        # Configs saved before the run assembly resolved them say "auto": compare what ran.
        model["remat"], model["head_chunk"] = resolve_auto_values(model["remat"], model["head_chunk"])
    return {
        **{k: resolved.get(k) for k in IDENTITY_KEYS},
        "model": model,
        "data": data,
        "run": {k: run.get(k) for k in IDENTITY_RUN_KEYS},
    }


def _first_difference(old, new, path: str = "") -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        # Keys on one side only come from a schema change between versions (a field added
        # with its default, or removed): they cannot differ in what the run trained.
        for key in sorted(set(old) & set(new)):
            found = _first_difference(old.get(key), new.get(key), f"{path}.{key}" if path else key)
            if found:
                return found
        return ""
    return "" if old == new else f"{path}: saved {old!r}, now {new!r}"


def check_resumable(run_dir: Path, resolved: dict) -> bool:
    """Refuse to continue a run directory whose saved config differs in what defines the run.

    Returns True when the new config extends a saved trunk (``run.branches``): the same run with a
    larger budget and more branches after the old ones, the only change a resume accepts.
    """
    saved_path = Path(run_dir) / CONFIG_FILE
    if not saved_path.is_file():
        return False
    saved = read_saved_config(saved_path)
    difference = _first_difference(identity(saved), identity(resolved))
    if not difference:
        return False
    if _extends_trunk(saved, resolved):
        return True
    raise ConfigError(
        f"run directory {run_dir} holds a different run ({difference}); choose another run.name or run.dir, "
        f"or start it over with run.restart=true (the old contents are kept beside it)"
    )


RESTARTED_NOTE = "restarted.json"
_RESTARTED_NAME = re.compile(r".+\.restarted-\d+")


def under_restarted(path: Path, root: Path) -> bool:
    """Whether ``path`` lies in a run moved aside by ``run.restart`` below ``root`` (searches skip those)."""
    return any(_RESTARTED_NAME.fullmatch(part) for part in Path(path).relative_to(root).parts)


def restart_in_place(run_dir: Path, reason: str = "run.restart=true") -> Path | None:
    """Move ``run_dir``, whole, to ``<run_dir>.restarted-<ns>`` beside it so the run can start over.

    Refused while another archlab-train holds the directory. Returns where the old contents went
    (None: nothing to move). The moved directory holds ``restarted.json``: when, why, and from where.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or not any(run_dir.iterdir()):
        return None
    target = run_dir.with_name(f"{run_dir.name}.restarted-{time.time_ns()}")
    with RunLock(run_dir):  # the lock file moves with the directory; the flock stays on it
        run_dir.rename(target)
    note = {"was": str(run_dir), "reason": reason, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        (target / RESTARTED_NOTE).write_text(yaml.safe_dump(note, sort_keys=False))
    except OSError as error:  # the rename is what keeps the data; the note only explains it
        log.warning("could not write %s in %s (%s)", RESTARTED_NOTE, target, error)
    log.warning("run.restart: moved the old contents of %s to %s; starting over",
                                        run_dir, target)
    return target


def read_saved_config(path: Path) -> dict:
    """A saved ``config.yaml`` as a mapping; a damaged one is refused with the file named."""
    try:
        saved = yaml.safe_load(Path(path).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise ConfigError(f"{path} is unreadable ({' '.join(str(error).split())[:200]}); fix it, or start the "
                          "run over with run.restart=true (the old contents are kept beside it)") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"{path} does not hold a config mapping; fix it, or start the run over with "
                          "run.restart=true (the old contents are kept beside it)")
    return saved


def _extends_trunk(saved: dict, new: dict) -> bool:
    """Whether ``new`` is ``saved``'s trunk continued: a budget at least as large, its branches a prefix."""
    old_run, new_run = saved.get("run") or {}, new.get("run") or {}
    old_branches, new_branches = list(old_run.get("branches") or []), list(new_run.get("branches") or [])
    key = "flops" if old_run.get("flops") is not None else "tokens"
    if not old_branches or old_run.get(key) is None or new_run.get(key) is None:
        return False
    if new_run[key] < old_run[key] or new_branches[:len(old_branches)] != old_branches:
        return False
    same = {**new, "run": {**new_run, key: old_run[key], "branches": old_branches}}
    return not _first_difference(identity(saved), identity(same))


def write_once(run_dir: Path, resolved: dict, tokenizer) -> None:
    """Write the resolved config and the tokenizer beside the checkpoints, never overwriting.

    An extended trunk's config replaces the old one, which is kept as ``config.<time>.yaml``.
    """
    run_dir = Path(run_dir)
    config_path = run_dir / CONFIG_FILE
    if check_resumable(run_dir, resolved):
        config_path.rename(config_path.with_name(f"config.{time.time_ns()}.yaml"))
    if not config_path.exists():
        tmp = config_path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(resolved, sort_keys=False))
        tmp.replace(config_path)
    tokenizer_path = run_dir / TOKENIZER_FILE
    if not tokenizer_path.exists():
        tokenizer.save(tokenizer_path)


def wandb_run_id(run_dir: Path, new: Callable[[], str]) -> str:
    """The run's W&B id: read from ``run_dir/wandb_run_id``, else drawn with ``new()`` and written there.

    Written on the first launch, before W&B starts, so every later launch (even one after a crash
    before the first checkpoint) continues the same W&B run. A checkpoint's own id wins over it.
    """
    path = Path(run_dir) / WANDB_ID_FILE
    if path.is_file():
        saved = path.read_text().strip()
        if re.fullmatch(r"[a-z0-9]{1,64}", saved):
            return saved
    run_id = new()
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(run_id + "\n")
    tmp.replace(path)
    return run_id


def saved_tokenizer(run_dir: Path) -> Path | None:
    """A resumed run keeps the tokenizer it started with."""
    path = Path(run_dir) / TOKENIZER_FILE
    return path if path.is_file() else None


@contextlib.contextmanager
def log_to_file(run_dir: Path) -> Iterator[None]:
    """Append archlab's log records to ``run_dir/train.log`` for the duration of the run."""
    handler = logging.FileHandler(Path(run_dir) / LOG_FILE)
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] %(message)s"))
    logger = logging.getLogger("archlab")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()
