"""A saved run's config.yaml is data, not a program: interpolations are refused, not resolved, and a
damaged file is named in the refusal (archlab.trainer.load_run_config)."""

import shutil

import pytest
import yaml

from archlab.errors import CheckpointError


def test_an_interpolation_in_a_saved_config_is_refused_not_resolved(prepared_run, tmp_path, monkeypatch):
    from archlab.trainer import load_run_config

    run_dir = tmp_path / "run"
    shutil.copytree(prepared_run, run_dir)
    monkeypatch.setenv("ARCHLAB_TEST_SECRET", "hunter2")
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    saved["run"]["name"] = "${oc.env:ARCHLAB_TEST_SECRET}"
    (run_dir / "config.yaml").write_text(yaml.safe_dump(saved))
    with pytest.raises(CheckpointError, match=r"config.yaml holds an interpolation") as refusal:
        load_run_config(run_dir)
    assert "hunter2" not in str(refusal.value)


@pytest.mark.parametrize("text", ["run: [unclosed", "just a string", "model: {d_model: not-a-number}"])
def test_a_damaged_saved_config_is_named(prepared_run, tmp_path, text):
    from archlab.trainer import load_run_config

    run_dir = tmp_path / "run"
    shutil.copytree(prepared_run, run_dir)
    (run_dir / "config.yaml").write_text(text)
    with pytest.raises(CheckpointError, match=r"config.yaml"):
        load_run_config(run_dir)
