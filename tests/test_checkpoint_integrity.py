"""Checkpoint integrity (archlab/train/integrity.py, set_aside.py): every step carries checksums; a
step that fails them, or any other check, is skipped for the newest good one by training and
evaluation alike; the training run sets it aside where rotation never reaches, recomputes it and
saves it afresh; set-aside directories are listed in summary.json and bounded."""

from __future__ import annotations

import gc
import json
import logging
import re
import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_checkpoint import (
    ABSTRACT,
    _assert_bitwise_equal,
    _data,
    _meta,
    _save,
    _snapshot,
    _state,
)

from archlab.errors import CheckpointError, CorruptCheckpointError
from archlab.train import integrity
from archlab.train.checkpoint import (
    Checkpointer,
    restore_together,
    saved_state_shapes,
    set_aside_dirs,
)
from archlab.train.set_aside import NOTE_FILE

LOGGER = "archlab.train.checkpoint"


def _warnings(caplog, logger: str = LOGGER) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger and r.levelno >= logging.WARNING]


def _flip_bit(path: Path, offset: int | None = None) -> None:
    """One bit flipped in the middle of ``path`` (or at ``offset``)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if offset is None else offset] ^= 0x08
    path.write_bytes(bytes(data))


def _largest_array_file(step_dir: Path) -> Path:
    return max((p for p in (step_dir / "state").rglob("d/*") if p.is_file()), key=lambda p: p.stat().st_size)


def _big_state(n_arrays: int = 4, seed: int = 0) -> dict:
    """Random arrays large enough to live in tensorstore's data files (small ones are inlined in its index)."""
    keys = jax.random.split(jax.random.key(seed), n_arrays)
    return {f"w{i:03d}": jax.random.normal(k, (64, 64)) for i, k in enumerate(keys)}


def _as_older_archlab(step_dir: Path) -> None:
    """Make a step look saved by an archlab that wrote no checksums (no integrity item at all)."""
    shutil.rmtree(step_dir / integrity.ITEM)
    meta_path = step_dir / "_CHECKPOINT_METADATA"
    meta = json.loads(meta_path.read_text())
    del meta["item_handlers"][integrity.ITEM]
    meta_path.write_text(json.dumps(meta))


def _write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value))


# -- what a step records --------------------------------------------------------------------------


def test_every_step_records_a_digest_of_every_leaf_and_item(tmp_path):
    with Checkpointer(tmp_path, async_save=True) as ckpt:
        _save(ckpt, 3)
    record = json.loads((tmp_path / "3" / integrity.ITEM / integrity.FILENAME).read_text())
    leaves = {integrity.leaf_key(p): x for p, x in jax.tree_util.tree_leaves_with_path(_state(3))}
    assert record["format"] == 1 and record["algorithm"] == "sha256"
    assert record["state"].keys() == leaves.keys()
    for key, x in leaves.items():
        entry = record["state"][key]
        assert entry == {"dtype": x.dtype.name, "shape": list(x.shape), "digest": integrity.array_digest(x)}
    assert record["data"] == integrity.json_digest(_data(3)) and record["meta"] == integrity.json_digest(_meta(3))
    handlers = json.loads((tmp_path / "3" / "_CHECKPOINT_METADATA").read_text())["item_handlers"]
    assert integrity.ITEM in handlers  # committed with the step, by orbax's own commit


# -- what a restore detects -------------------------------------------------------------------------


def _swap_in_other_arrays(tmp_path: Path) -> None:
    """Step 2's array files replaced by those of another step of the same shapes: orbax reads them fine."""
    with Checkpointer(tmp_path / "other", async_save=False) as other:
        other.save(2, _state(7), data=_data(2), meta=_meta(2))
    marker = (tmp_path / "ckpt/2/state/commit_success.txt").read_text()  # names this step's save, so it stays
    shutil.rmtree(tmp_path / "ckpt" / "2" / "state")
    shutil.copytree(tmp_path / "other" / "2" / "state", tmp_path / "ckpt" / "2" / "state")
    (tmp_path / "ckpt/2/state/commit_success.txt").write_text(marker)


def _edit_json(path: Path, edit) -> None:
    item = json.loads(path.read_text())
    edit(item)
    path.write_text(json.dumps(item))


CORRUPTIONS = {
    "other_arrays": (_swap_in_other_arrays, "'params/b' does not match its checksum (and 4 more)"),
    "hello_data": (lambda t: _write_json(t / "ckpt/2/data/metadata", {"hello": 1}), "data/ does not match its checksum"),
    "edited_meta": (lambda t: _write_json(t / "ckpt/2/meta/metadata", {**_meta(2), "tokens_seen": 1}),
                    "meta/ does not match its checksum"),
    "torn_checksums": (lambda t: (t / "ckpt/2/integrity/checksums.json").write_text('{"format": 1, "alg'),
                       "integrity/checksums.json is not valid JSON (Unterminated string"),
    "wrong_checksums": (lambda t: _write_json(t / "ckpt/2/integrity/checksums.json", {"format": 1}),
                        "integrity/checksums.json is not a format-1 sha256 checksum record"),
    "no_checksums": (lambda t: shutil.rmtree(t / "ckpt/2/integrity"), "item directory 'integrity' is missing"),
    "empty_array_metadata": (lambda t: (t / "ckpt/2/state/array_metadatas/process_0").write_text(""),
                             "state/array_metadatas/process_0 is empty"),
    "no_data_file": (lambda t: (t / "ckpt/2/data/metadata").unlink(), "data/metadata is missing"),
    # orbax reads neither a marker's text nor the handler names, so only the cross-checks can notice these
    "edited_item_marker": (lambda t: (t / "ckpt/2/meta/commit_success.txt").write_text("Checkpoint commit"),
                           "meta/commit_success.txt does not match the step's commit_success.txt"),
    "no_item_marker": (lambda t: (t / "ckpt/2/data/commit_success.txt").unlink(), "data/commit_success.txt is missing"),
    "renamed_handler": (lambda t: _edit_json(t / "ckpt/2/_CHECKPOINT_METADATA", lambda m: m["item_handlers"].update(
        state=m["item_handlers"]["state"].replace("Standard", "Ttandard"))),
                        "_CHECKPOINT_METADATA lists item handlers"),
    "no_sharding_file": (lambda t: (t / "ckpt/2/state/_sharding").unlink(), "state/_sharding is missing"),
    "renamed_array_metadata": (lambda t: _edit_json(
        t / "ckpt/2/state/array_metadatas/process_0",
        lambda m: m["array_metadatas"][0]["array_metadata"].update(param_name="renamed")),
        "state/array_metadatas/ does not describe the arrays state/_METADATA lists"),
    "unlisted_integrity": (lambda t: _edit_json(t / "ckpt/2/_CHECKPOINT_METADATA",
                                                lambda m: m["item_handlers"].pop("integrity")),
                           "_CHECKPOINT_METADATA does not list the 'integrity' item the step holds"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_a_corrupt_step_is_skipped_with_one_line_naming_what_failed(tmp_path, caplog, case):
    corrupt, reason = CORRUPTIONS[case]
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        _save(ckpt, 1, 2)
    corrupt(tmp_path)
    caplog.set_level(logging.WARNING, logger=LOGGER)
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        restored = ckpt.restore(None, ABSTRACT)
        assert restored.step == 1
        _assert_bitwise_equal(restored.state, _state(1))
        (message,) = _warnings(caplog)
        assert message.startswith(f"checkpoint step 2 in {tmp_path / 'ckpt'} is unusable ({reason}")
        assert message.endswith("; restored step 1 instead")
        with pytest.raises(CorruptCheckpointError, match=rf"^checkpoint step 2 in .* is unusable: {re.escape(reason)}"):
            ckpt.restore(2, ABSTRACT)
    assert (tmp_path / "ckpt" / "2").is_dir()  # a reader moves nothing


def test_a_flipped_bit_in_an_array_file_is_caught(tmp_path, caplog):
    state = _big_state()
    with Checkpointer(tmp_path) as ckpt:
        for step in (1, 2):
            assert ckpt.save(step, state, data=_data(step), meta=_meta(step))
    _flip_bit(_largest_array_file(tmp_path / "2"))
    caplog.set_level(logging.WARNING, logger=LOGGER)
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.restore(None, state).step == 1
    (message,) = _warnings(caplog)
    assert message.startswith("checkpoint step 2 in ") and message.endswith("restored step 1 instead")


def test_a_step_from_an_older_archlab_restores_unverified_but_bad_data_is_still_caught(tmp_path, caplog):
    with Checkpointer(tmp_path) as ckpt:
        _save(ckpt, 1, 2)
    for step in (1, 2):
        _as_older_archlab(tmp_path / str(step))
    _write_json(tmp_path / "2" / "data" / "metadata", {"hello": 1})
    caplog.set_level(logging.WARNING, logger=LOGGER)
    with Checkpointer(tmp_path) as ckpt:
        restored = ckpt.restore(None, ABSTRACT)
    assert restored.step == 1
    _assert_bitwise_equal(restored.state, _state(1))
    assert _warnings(caplog) == [
        f"checkpoint step 1 in {tmp_path} has no checksums (saved by an older archlab); restored it unverified",
        (f"checkpoint step 2 in {tmp_path} is unusable (data/ is not an iterator state: {{\"hello\": 1}} has no "
         "non-negative integer 'next_index'); restored step 1 instead"),
    ]


def test_a_target_of_another_dtype_is_verified_at_the_saved_one_then_cast(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        _save(ckpt, 1)
        target = {**ABSTRACT, "params": {**ABSTRACT["params"], "w": jax.ShapeDtypeStruct((3, 4), jnp.bfloat16)}}
        restored = ckpt.restore(1, target)
    assert restored.state["params"]["w"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(restored.state["params"]["w"], _state(1)["params"]["w"].astype(jnp.bfloat16))


def test_a_failed_read_prints_nothing_but_its_one_line(tmp_path):
    """orbax abandons its other reads when one fails; their collection must not reach the hook."""
    state = _big_state(n_arrays=64)
    with Checkpointer(tmp_path) as ckpt:
        for step in (1, 2):
            assert ckpt.save(step, state, data=_data(step), meta=_meta(step))
    for p in (tmp_path / "2" / "state").rglob("d/*"):
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    seen, hook = [], sys.unraisablehook
    sys.unraisablehook = seen.append
    try:
        for _ in range(3):  # how many reads are in flight when one fails varies from run to run
            with Checkpointer(tmp_path) as ckpt:  # a concrete target: orbax's async path, as in training
                assert ckpt.restore(None, state).step == 1
        gc.collect()
    finally:
        sys.unraisablehook = hook
    assert seen == []


# -- setting aside (the run that owns the directory) --------------------------------------------------


def test_set_aside_steps_are_saved_afresh_and_survive_rotation(tmp_path, caplog):
    with Checkpointer(tmp_path, max_to_keep=2) as ckpt:
        _save(ckpt, 1, 2)
    _write_json(tmp_path / "2" / "data" / "metadata", {"hello": 1})
    caplog.set_level(logging.WARNING, logger=LOGGER)
    with Checkpointer(tmp_path, max_to_keep=2) as ckpt:
        assert ckpt.restore(None, ABSTRACT, set_aside=True).step == 1
        (moved,) = tmp_path.glob("corrupt-2-*")
        assert _warnings(caplog) == [(f"checkpoint step 2 in {tmp_path} is unusable (data/ does not match its "
                                      f"checksum); set aside as {moved.name}; restored step 1 instead")]
        _save(ckpt, 2)  # the recomputed step replaces the corrupt one
        assert ckpt.restore(None, ABSTRACT).step == 2
        _save(ckpt, 3, 4, 5)  # max_to_keep=2 rotates out 1, 2 and 3, not the set-aside directory
        assert ckpt.all_steps() == [4, 5]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["4", "5", moved.name]
    note = json.loads((moved / NOTE_FILE).read_text())
    assert note["step"] == 2 and note["was"] == "2" and note["reason"] == "data/ does not match its checksum"
    assert [(e["name"], e["step"], e["kind"], e["reason"]) for e in set_aside_dirs(tmp_path)] == [
        (moved.name, 2, "corrupt", "data/ does not match its checksum")]


def test_packed_members_fall_back_together(tmp_path, caplog):
    """Members share one step counter: when one member's newest step is corrupt, every member
    restores the step before; only the corrupt step is set aside, the others' good ones stay."""
    dirs = [tmp_path / "a", tmp_path / "b"]
    for d in dirs:
        with Checkpointer(d) as ckpt:
            _save(ckpt, 1, 2)
    _write_json(dirs[1] / "2" / "data" / "metadata", {"hello": 1})
    caplog.set_level(logging.WARNING, logger=LOGGER)
    checkpointers = [Checkpointer(d) for d in dirs]
    try:
        restored = restore_together(checkpointers, [ABSTRACT, ABSTRACT], at_most=2)
    finally:
        for ckpt in checkpointers:
            ckpt.close()
    assert [r.step for r in restored] == [1, 1]
    for r in restored:
        _assert_bitwise_equal(r.state, _state(1))
    assert sorted(p.name for p in dirs[0].iterdir()) == ["1", "2"]
    assert [e["step"] for e in set_aside_dirs(dirs[1])] == [2] and (dirs[1] / "1").is_dir()
    assert len(_warnings(caplog)) == 1


def test_nothing_is_moved_when_no_step_verifies(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        _save(ckpt, 1)
    _write_json(tmp_path / "1" / "meta" / "metadata", {"tokens_seen": 0})
    before = _snapshot(tmp_path)
    with Checkpointer(tmp_path) as ckpt, pytest.raises(CheckpointError, match=r"no usable checkpoint in .* \(step 1: "
                                                                     "meta/ does not match"):
        ckpt.restore(None, ABSTRACT, set_aside=True)
    assert _snapshot(tmp_path) == before


def test_only_the_newest_set_aside_directories_are_kept(tmp_path, caplog):
    """run.keep_set_aside: each directory set aside deletes those beyond the newest K (an abandoned-*
    left by an older archlab, without a note, counts too)."""
    old = tmp_path / "abandoned-1-100"
    old.mkdir(parents=True)
    (old / "x").write_text("half a save")
    caplog.set_level(logging.WARNING)
    with Checkpointer(tmp_path, keep_set_aside=2) as ckpt:
        _save(ckpt, 1)
        for step in (2, 3, 4):  # each saved, found corrupt on the next resume, set aside
            _save(ckpt, step)
            _write_json(tmp_path / str(step) / "data" / "metadata", {"hello": step})
            assert ckpt.restore(None, ABSTRACT, set_aside=True).step == 1
            kept = [(e["kind"], e["step"]) for e in set_aside_dirs(tmp_path)]
            assert kept == {2: [("abandoned", 1), ("corrupt", 2)], 3: [("corrupt", 2), ("corrupt", 3)],
                            4: [("corrupt", 3), ("corrupt", 4)]}[step]
    deleted = _warnings(caplog, "archlab.train.set_aside")
    assert len(deleted) == 2
    assert deleted[0].startswith(f"deleted the set-aside checkpoint directory abandoned-1-100 in {tmp_path} ")
    assert deleted[1].startswith("deleted the set-aside checkpoint directory corrupt-2-")
    assert ckpt.all_steps() == [1]


# -- a real run: evaluation and training resume -------------------------------------------------------


def _rows(run_dir: Path) -> list[dict]:
    timing = ("train/tokens_per_s", "train/mfu")  # wall-clock figures, not results
    return [{k: v for k, v in json.loads(line).items() if k not in timing}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _stored(run_dir: Path, step: int):
    step_dir = run_dir / "checkpoints" / str(step)
    with Checkpointer(run_dir / "checkpoints", async_save=False) as ckpt:
        return ckpt.restore(step, saved_state_shapes(step_dir)), json.loads(
            (step_dir / integrity.ITEM / integrity.FILENAME).read_text())


def test_corrupt_final_steps_fall_back_in_eval_and_are_recomputed_by_a_resume(train_run, tmp_path, caplog):
    """A finished run whose last two checkpoints went bad (a flipped bit in an array file of the final
    step, ``{"hello": 1}`` as the data-iterator state of the one before): archlab-eval scores the
    newest good step and moves nothing; the same training command sets both aside, retrains from the
    good step, saves good final checkpoints in their place, and ends bitwise where the uninterrupted
    run ended; keep_checkpoints rotation passes the set-aside directories by."""
    from archlab.evaluate import evaluate
    from archlab.schema import EvalConfig, LoggerConfig

    common = ("run.steps=8", "run.checkpoint_every=2", "run.eval_every=4")
    whole, split = tmp_path / "whole", tmp_path / "split"
    expected = train_run(whole, *common)
    shutil.copytree(whole, split)
    _flip_bit(_largest_array_file(split / "checkpoints" / "8"))
    _write_json(split / "checkpoints" / "6" / "data" / "metadata", {"hello": 1})
    ckpt_dir = split / "checkpoints"

    caplog.set_level(logging.WARNING, logger=LOGGER)
    before = _snapshot(ckpt_dir)
    quiet = LoggerConfig(backend="none", mode="disabled")
    (scored,) = evaluate(EvalConfig(checkpoint=str(split), batches=1, samples=0, logger=quiet))
    assert scored["step"] == 4
    val_at_4 = [r["val/loss"] for r in _rows(whole) if r["step"] == 4 and "val/loss" in r]
    assert [scored["eval/loss"]] == pytest.approx(val_at_4, rel=1e-6)
    (warning,) = _warnings(caplog)
    assert warning.startswith(f"checkpoint steps 8, 6 in {ckpt_dir} are unusable (8: ")
    assert "; 6: data/ does not match its checksum); restored step 4 instead" in warning
    caplog.clear()
    scored_all = evaluate(EvalConfig(checkpoint=str(split), all_steps=True, batches=1, samples=0, logger=quiet))
    assert [r["step"] for r in scored_all] == [4]  # every step asked for: the corrupt ones skipped, one line each
    assert [m.split(" is unusable: ")[0] for m in _warnings(caplog, "archlab.evaluate")] == [
        f"checkpoint step {s} in {ckpt_dir}" for s in (6, 8)]
    assert _snapshot(ckpt_dir) == before  # evaluation only reads

    caplog.clear()
    resumed = train_run(split, *common, "run.keep_checkpoints=1")
    (warning,) = _warnings(caplog)
    assert "set aside as corrupt-8-" in warning and warning.endswith("restored step 4 instead")
    set_aside = resumed.pop("set_aside")
    assert [(e["step"], e["kind"]) for e in set_aside] == [(8, "corrupt"), (6, "corrupt")]
    assert set_aside[1]["reason"] == "data/ does not match its checksum"
    assert json.loads((split / "summary.json").read_text())["set_aside"] == set_aside
    assert sorted(p.name for p in ckpt_dir.iterdir()) == sorted(["8", *(e["name"] for e in set_aside)])
    assert resumed == {k: v for k, v in expected.items() if k != "set_aside"}
    assert _rows(split) == _rows(whole)  # every train and val row, bitwise on the CPU
    (got, got_record), (want, want_record) = _stored(split, 8), _stored(whole, 8)
    _assert_bitwise_equal(got.state, want.state)
    assert (got.data, got.meta, got_record) == (want.data, want.meta, want_record)

    caplog.clear()
    from archlab.trainer import Trainer

    assert Trainer.restore(split).restored_step == 8 and _warnings(caplog) == []  # what archlab-eval reads
