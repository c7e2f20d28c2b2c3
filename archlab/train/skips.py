"""``run.on_nonfinite=skip``, watched: a warning on every skipped update, a stop after too many in a row.

The step function skips an update whose loss or gradients are non-finite and counts it in
``TrainState.skipped``; the loop reads that counter after each step (one scalar per step, only
under ``skip``). A run whose every update is skipped is not training, so ``run.max_skips_in_a_row``
skips in a row stop it with the last good checkpoint kept, like ``run.on_nonfinite=stop``.
"""

from __future__ import annotations

import logging

import numpy as np

from archlab.errors import NonFiniteError

log = logging.getLogger(__name__)


class SkipWatch:
    """Follows one run's (or each packed member's) skip counter from step to step."""

    def __init__(self, limit: int, skipped_now, names: list[str] | None = None) -> None:
        self.limit = limit
        self.last = np.atleast_1d(np.asarray(skipped_now, dtype=np.int64)).copy()
        self.in_a_row = np.zeros_like(self.last)
        self.names = names

    def after(self, step: int, skipped, kept_step=None) -> None:
        """Warn about the updates skipped at ``step``; raise NonFiniteError past the limit.

        ``kept_step``: a callable giving the newest checkpoint step, named in the error.
        """
        total = np.atleast_1d(np.asarray(skipped, dtype=np.int64))
        new = total > self.last
        self.in_a_row = np.where(new, self.in_a_row + (total - self.last), 0)
        self.last = total.copy()
        for i in np.flatnonzero(new):
            who = f"{self.names[i]}: " if self.names else ""
            log.warning("%sstep %d: non-finite loss or gradients, update skipped (%d in a row, %d in all; "
                        "run.max_skips_in_a_row=%d stops the run)", who, step, self.in_a_row[i], total[i], self.limit)
        over = np.flatnonzero(self.in_a_row >= self.limit)
        if over.size:
            i = int(over[0])
            who = f"{self.names[i]}: " if self.names else ""
            kept = kept_step() if kept_step is not None else None
            last = f"the last good checkpoint, step {kept}, is kept" if kept is not None else "no checkpoint was written"
            raise NonFiniteError(
                f"{who}{int(self.in_a_row[i])} updates in a row skipped for non-finite loss or gradients "
                f"(steps {step - int(self.in_a_row[i]) + 1}-{step}; run.max_skips_in_a_row={self.limit}); stopped "
                f"({last}; lower optimizer.lr or fix the data, then start over with run.restart=true)"
            )
