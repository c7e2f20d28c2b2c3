"""Sweep job names (archlab/sweeps.py) and the runs table (archlab/runs_table.py), without training."""

import csv
import fcntl
import json
import os

import pytest
import yaml

from archlab.runs_table import COLUMNS, main, table_rows
from archlab.sweeps import MAX_NAME, job_suffix


def test_a_job_name_carries_what_changes_the_run_sorted():
    assert job_suffix(["size=nano", "run.steps=20", "optimizer.lr=1e-3", "run.seed=1", "model=encoder_only"]) == \
        ",optimizer.lr=1e-3,run.steps=20"
    # What does not change what is trained stays out: the same job with these resumes the same run.
    assert job_suffix(["logger=none", "run.progress=false", "run.restart=true", "data.cache_dir=/c",
                       "run.eval_every=5", "experiment=x", "sweep=sizes", "hydra/launcher=slurm"]) == ""
    assert job_suffix(["+model.rope_base=500", "data=english", "rules=ladder_v2", "run.flops=1e12"]) == \
        ",data=english,model.rope_base=500,rules=ladder_v2,run.flops=1e12"


def test_a_job_name_is_one_plain_directory_name():
    suffix = job_suffix(["data.options.train=/work/../corpora/*.txt"])
    assert "/" not in suffix and ".." not in suffix and suffix.startswith(",data.options.train=")
    long = job_suffix([f"model.option_{i}={'x' * 20}" for i in range(20)])
    assert len(long) == MAX_NAME and long != job_suffix([f"model.option_{i}={'y' * 20}" for i in range(20)])


def _run(path, *, step, total, family="decoder_only", size="nano", **summary):
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump({"model": {"family": family}, "size_name": size}))
    (path / "summary.json").write_text(json.dumps({"step": step, "total_steps": total, "params_total": 15296,
                                                   "token_budget": 512, "train_flops_total": 5.0e7,
                                                   "val/loss": 6.1, "val/bits_per_byte": 5.1, **summary}))
    return path


def test_the_table_reads_each_run_status_from_its_directory(tmp_path, capsys):
    root = tmp_path / "sweep"
    _run(root / "a", step=4, total=4)
    _run(root / "a" / "branches" / "D256", step=2, total=2)
    _run(root / "b", step=2, total=4)
    _run(root / "c", step=3, total=4, stopped="non-finite loss at step 3")
    _run(root / "c" / "checkpoints" / "2", step=0, total=0)  # a step directory is not a run
    _run(root / "d", step=1, total=4, family="encoder_only", size="tiny")
    _run(root / "e.restarted-123", step=4, total=4)  # moved aside by run.restart
    (root / "f").mkdir()
    (root / "f" / "config.yaml").write_text("model: {family: decoder_only}\n")  # killed before any summary
    (root / "f" / "summary.json").write_text("{not json")
    with open(root / "d" / ".lock", "w") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        rows = {row.run: row for row in table_rows([root])}
    assert list(rows) == ["a", "a/branches/D256", "b", "c", "d", "f"]
    assert [rows[n].status for n in rows] == ["done", "done", "incomplete (step 2/4)",
                                              "stopped: non-finite loss at step 3", "running", "incomplete (step 0/?)"]
    assert (rows["d"].family, rows["d"].size, rows["a"].params, rows["f"].val_loss) == ("encoder_only", "tiny", 15296, "")
    assert not list((root / "f").glob("summary.json.damaged-*"))  # a table only reads

    main([str(root)])
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split() == list(COLUMNS) and printed[-1] == f"6 runs; table written to {root / 'runs.csv'}"
    written = list(csv.DictReader((root / "runs.csv").open()))
    assert [r["run"] for r in written] == list(rows) and float(written[0]["val_loss"]) == 6.1

    other = _run(tmp_path / "other" / "g", step=4, total=4).parent
    main([str(root), str(other), "--csv", str(tmp_path / "both.csv")])
    assert [r["run"] for r in csv.DictReader((tmp_path / "both.csv").open())][-2:] == ["sweep/f", "other/g"]


@pytest.mark.parametrize("args, message", [
    (["{tmp}/absent"], "no such directory"),
    (["{tmp}", "{tmp}"], "several directories need --csv"),
    (["{tmp}"], "no runs (no config.yaml) under"),
])
def test_the_table_command_refuses_bad_input_in_one_line(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        main([a.format(tmp=tmp_path) for a in args])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("archlab-runs: error: ") and message in error and "\n" not in error
    assert not os.listdir(tmp_path)  # nothing written
