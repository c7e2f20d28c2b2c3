"""Every bad input gets one clear line on stderr, exit code 2, and leaves every file as it was.

The cases are the catalogue in docs/errors.md (``python tests/error_catalogue.py`` rewrites
it from these very runs, and ``test_catalogue_is_current`` keeps the two in step).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bad_input_cases import CASES, REPO, materialise, snapshot

pytestmark = pytest.mark.usefixtures("cache_dir")


def run_cli(app: str, args: list[str], cwd: Path, cache_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_SILENT": "true", "ARCHLAB_CACHE": str(cache_dir), "HYDRA_FULL_ERROR": "0"}
    code = f"from archlab.cli import {app}; {app}()"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_refused_in_one_line(case, tmp_path, cache_dir, prepared_run):
    args = materialise(case, tmp_path, cache_dir, prepared_run)
    before = snapshot(tmp_path)
    result = run_cli(case.app, args, tmp_path, cache_dir)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == case.exit_code, result.stderr[-3000:]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{result.stderr[-3000:]}"
    assert lines[0].startswith(f"archlab-{case.app.split('_')[0]}: error: ")
    assert case.message.search(lines[0].replace(str(tmp_path), "<tmp>")), lines[0]
    assert snapshot(tmp_path) == before, "a bad input changed or deleted files"


def test_catalogue_is_current():
    from bad_input_cases import catalogue_rows

    doc = (REPO / "docs" / "errors.md").read_text()
    for row in catalogue_rows():
        assert row in doc, f"docs/errors.md is missing or out of date for: {row[:80]}"
