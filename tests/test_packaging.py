"""The package as a user installs it: a built wheel that trains from an empty directory, the apps'
--help, and a hyperparameter search with Hydra's Optuna sweeper."""

import csv
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from conftest import SHRINK

REPO = Path(__file__).resolve().parent.parent


def _app(app: str, *args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    code = f"from archlab.cli import {app}; {app}()"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "WANDB_SILENT": "true", **(env or {})}, timeout=600)


def test_a_built_wheel_holds_the_configs_and_trains_from_an_empty_directory(tmp_path, cache_dir):
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path / "dist"), "-q"], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("archlab-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {p.relative_to(REPO).as_posix() for p in (REPO / "archlab" / "conf").rglob("*.yaml")}
    assert shipped <= names and "archlab/py.typed" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert not any(n.startswith(("tests/", "experiments/", "conf/")) for n in names)

    installed = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(installed)  # what pip installs, without the dependencies it has here
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {"PYTHONPATH": str(installed)}
    where = subprocess.run([sys.executable, "-c", "import archlab; print(archlab.__file__)"], cwd=empty, env={
        **os.environ, **env}, capture_output=True, text=True)
    assert where.stdout.startswith(str(installed)), where  # the wheel's copy, not the checkout
    result = _app("train_main", *SHRINK, f"data.cache_dir={cache_dir}", cwd=empty, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    (run,) = (empty / "runs" / "default").iterdir()
    assert (run / "checkpoints" / "2").is_dir()
    assert yaml.safe_load((run / "config.yaml").read_text())["run"]["steps"] == 2


def test_help_lists_each_apps_groups_and_every_setting_with_its_description(tmp_path):
    from archlab.config import PRESETS

    train = _app("train_main", "--help", cwd=tmp_path)
    assert train.returncode == 0 and "powered by Hydra" not in train.stdout
    assert train.stdout.startswith("archlab-train: train one run")
    groups = {line.split(":")[0].strip(): line.split(":", 1)[1] for line in train.stdout.splitlines()
              if line.startswith("  ") and ":" in line and "(" not in line.split(":")[0]}
    for group in ("model", "size", "objective", "data", "optimizer", "logger", "rules", "experiment", "sweep"):
        assert group in groups, group
    assert all(name in groups["model"] for name in PRESETS) and " nano" in groups["size"]
    assert "  run.steps (int) = 600: " in train.stdout
    assert "  optimizer.lr (float) = " in train.stdout and "  logger.mode (str) = 'offline': " in train.stdout

    evaluation = _app("eval_main", "--help", cwd=tmp_path)
    assert evaluation.returncode == 0 and evaluation.stdout.startswith("archlab-eval: evaluate")
    assert "  checkpoint (str) = required: " in evaluation.stdout and "  max_new_tokens (int) = 40: " in evaluation.stdout
    assert "  size:" not in evaluation.stdout and "  model:" not in evaluation.stdout  # training-only groups
    assert not list(tmp_path.iterdir())  # help writes nothing


def test_an_optuna_search_of_two_trials_minimises_the_validation_loss(tmp_path, cache_dir):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    shrink = [s for s in SHRINK if s != "size=nano"]
    result = _app("train_main", "-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=2",
                  "hydra.sweeper.sampler.seed=0", "optimizer.lr=tag(log,interval(1e-4,3e-2))", "size=nano",
                  *shrink, f"data.cache_dir={cache_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    sweep = tmp_path / "runs" / "default"
    (table,) = sweep.glob("sweep-*.csv")
    rows = list(csv.DictReader(table.open()))
    assert len(rows) == 2 and {r["status"] for r in rows} == {"done"}
    assert len({r["run"] for r in rows}) == 2  # each trial its own run
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == min(float(r["val_loss"]) for r in rows)
    assert f"optimizer.lr={best['best_params']['optimizer.lr']}," in min(rows, key=lambda r: float(r["val_loss"]))["run"]
