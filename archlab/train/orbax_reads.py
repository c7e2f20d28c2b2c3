"""What a failed orbax read leaves behind: an exception to put in one line, and noise to contain.

orbax reads a step's arrays through tensorstore with many reads in flight on a private event
loop. When one fails, the error that says why is wrapped in a message that carries a tensorstore
spec dozens of lines long (``describe`` unwraps it), and the other reads are abandoned: as they
are collected, each prints a traceback as an unraisable exception (``contained_read_noise``
collects them at once and drops them; ``is_abandoned_read`` tells them from anything else).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import sys
import time
import types
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger(__name__)

_REASON_CHARS = 300

# orbax wraps a failed array read in "Encountered error while reading array index ... See full
# TensorStore details: <a spec of dozens of lines>"; the error it wraps is the one that says why.
_ORBAX_WRAPPER = "Encountered error while reading array index"


def describe(e: BaseException) -> str:
    """One line for an exception: type and message (orbax's wrapper of a failed read unwrapped), shortened."""
    while _ORBAX_WRAPPER in str(e) and e.__cause__ is not None:
        e = e.__cause__
    text = " ".join(str(e).split()) or "no message"
    if len(text) > _REASON_CHARS:
        text = text[: _REASON_CHARS - 3] + "..."
    return f"{type(e).__name__}: {text}"


def is_abandoned_read(unraisable: Any) -> bool:
    """Whether an unraisable exception is noise from orbax's reads of a step that failed.

    When one read fails, orbax abandons the others in flight; as they are collected each raises
    (its ``except BaseException`` turns the close into an error) or calls into the closed event
    loop, and Python prints a traceback for each: hundreds of lines around the one that matters.
    """
    error, obj = unraisable.exc_value, unraisable.object
    if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
        return True
    code = getattr(obj, "cr_code", None) if isinstance(obj, types.CoroutineType) else None
    return code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename


# How long a failed read's stragglers get to finish: tensorstore completes the reads orbax abandoned
# on its own threads, so their coroutines become garbage a little after the error, not with it
# (measured: within ~0.1 s for a few hundred small arrays). Any that come later still reach the
# hook archlab-train and archlab-eval install (cli.py), which drops them too.
_SETTLE_S, _SETTLE_POLL_S, _SETTLE_QUIET_POLLS = 3.0, 0.05, 4


@contextlib.contextmanager
def contained_read_noise() -> Iterator[Callable[[], None]]:
    """While open, orbax's abandoned reads are dropped from the unraisable hook (and nothing else is).

    It yields ``settle()``: after a failed read, collect them now (until a few polls find none),
    rather than have them print their tracebacks at some later step of training.
    """
    previous, dropped = sys.unraisablehook, [0]

    def hook(unraisable) -> None:
        if is_abandoned_read(unraisable):
            dropped[0] += 1
        else:
            previous(unraisable)

    def settle() -> None:
        deadline, quiet = time.monotonic() + _SETTLE_S, 0
        while quiet < _SETTLE_QUIET_POLLS and time.monotonic() < deadline:
            before = dropped[0]
            gc.collect()
            quiet = quiet + 1 if dropped[0] == before else 0
            time.sleep(_SETTLE_POLL_S)

    sys.unraisablehook = hook
    try:
        yield settle
    finally:
        sys.unraisablehook = previous
        if dropped[0]:
            log.debug("dropped %d unraisable errors from orbax's abandoned reads", dropped[0])
