"""Rewrite docs/errors.md by running every bad-input case through the real CLI.

    python tests/error_catalogue.py

The messages in the table are the ones the commands printed (temporary paths shown as <tmp>).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

# Run as a script, this file's folder (tests/) is on the import path: the cases are beside it.
from bad_input_cases import CASES, SMALL, materialise

REPO = Path(__file__).resolve().parent.parent

HEADER = """# Bad inputs and what archlab says

Every row was produced by `python tests/error_catalogue.py`, which runs the command
in a scratch directory and records the one line printed on stderr and the exit code;
`tests/test_bad_inputs.py` runs the same cases and checks the message, the exit code, and
that no file in the scratch directory was created, changed or deleted (a run directory's
`.lock` excepted: it holds the pid of the last process that took the lock). `{tmp}` is the
scratch directory, `{corpus}` a folder of good, empty and Latin-1 text files, `{run}` a
small trained run. Every command is `archlab-train` or `archlab-eval` plus the small-run
overrides `{small}`, or `archlab-runs`.

| case | input | arguments | message (stderr) | exit |
|---|---|---|---|---|
"""


def run(app: str, args: list[str], cwd: Path, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_SILENT": "true", "ARCHLAB_CACHE": str(cache)}
    code = f"from archlab.cli import {app}; {app}()"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True)


def main() -> None:
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        cache = scratch / "cache"
        prepared = scratch / "prepared"
        trained = run("train_main", [*SMALL, f"data.cache_dir={cache}", f"run.dir={prepared}"], scratch, cache)
        if trained.returncode:
            sys.exit(f"could not train the reference run:\n{trained.stderr[-2000:]}")
        rows = []
        for case in CASES:
            case_dir = scratch / case.name
            case_dir.mkdir()
            args = materialise(case, case_dir, cache, prepared)
            result = run(case.app, args, case_dir, cache)
            message = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "(nothing)"
            message = message.replace(str(case_dir), "<tmp>").replace(str(cache), "<cache>").replace("|", "\\|").replace("`", "'")
            shown = " ".join(a for a in case.args).replace("|", "\\|")
            rows.append(f"| `{case.name}` | {case.what} | `{shown}` | `{message}` | {result.returncode} |")
            print(rows[-1], flush=True)
    text = HEADER.format(tmp="{tmp}", corpus="{corpus}", run="{run}", small=" ".join(SMALL)) + "\n".join(rows) + "\n"
    (REPO / "docs" / "errors.md").write_text(text)
    print(f"wrote {REPO / 'docs' / 'errors.md'} ({len(rows)} cases)")


if __name__ == "__main__":
    main()
