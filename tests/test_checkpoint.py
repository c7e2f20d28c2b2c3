"""archlab.train.checkpoint: round trip, retention, lookup, refusal of NaN state, corrupt-step fallback."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from archlab.errors import CheckpointError
from archlab.train.checkpoint import Checkpointer, find_checkpoint_dir
from archlab.train.set_aside import NOTE_FILE

LOGGER = "archlab.train.checkpoint"

# When tensorstore fails on a corrupt file, orbax's remaining read coroutines hit an
# already-closed event loop and Python reports it as unraisable; that is orbax's noise.
pytestmark = pytest.mark.filterwarnings("ignore:(?s).*Event loop is closed:pytest.PytestUnraisableExceptionWarning")


def _state(seed: int) -> dict:
    """A tiny train state: params, an AdamW state after one update, step, RNG key data."""
    params = {
        "w": jnp.arange(12, dtype=jnp.float32).reshape(3, 4) / (seed + 1),
        "b": jnp.full((4,), seed, jnp.float32),
        "emb": (jnp.arange(6, dtype=jnp.float32).reshape(2, 3) * 0.1 + seed).astype(jnp.bfloat16),
    }
    tx = optax.adamw(1e-3)
    grads = jax.tree.map(jnp.ones_like, params)
    _, opt = tx.update(grads, tx.init(params), params)
    return {"params": params, "opt": opt, "step": jnp.asarray(seed, jnp.int32),
            "rng": jax.random.key_data(jax.random.key(seed))}


def _abstract(state: dict) -> dict:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)


ABSTRACT = _abstract(_state(0))


def _data(step: int) -> dict:
    return {"next_index": step, "epoch": 0}


def _meta(step: int) -> dict:
    return {"wandb_run_id": "run-abc", "tokens_seen": 1024 * step, "archlab_version": "0.1.0"}


def _save(ckpt: Checkpointer, *steps: int) -> None:
    for step in steps:
        assert ckpt.save(step, _state(step), data=_data(step), meta=_meta(step))
    ckpt.wait()


def _assert_bitwise_equal(a: dict, b: dict) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]


def _snapshot(d: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(d)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(d.rglob("*")) if p.is_file()}


def test_round_trip_async(tmp_path):
    with Checkpointer(tmp_path / "checkpoints", async_save=True) as ckpt:
        assert ckpt.save(7, _state(7), data=_data(7), meta=_meta(7))
        restored = ckpt.restore(None, ABSTRACT)  # waits for the async save
        assert restored.step == 7
        _assert_bitwise_equal(restored.state, _state(7))
        assert restored.data == _data(7) and restored.meta == _meta(7)
        assert type(restored.state["opt"][0]) is type(_state(7)["opt"][0])  # optax NamedTuple kept
        # concrete arrays work as the target too
        _assert_bitwise_equal(ckpt.restore(7, _state(0)).state, _state(7))


def test_max_to_keep_and_latest_step(tmp_path):
    with Checkpointer(tmp_path, max_to_keep=2) as ckpt:
        assert ckpt.latest_step() is None and ckpt.all_steps() == []
        _save(ckpt, 1, 2, 3, 4)
        assert ckpt.all_steps() == [3, 4]
        assert ckpt.latest_step() == 4
        assert sorted(p.name for p in tmp_path.iterdir()) == ["3", "4"]
        with pytest.raises(CheckpointError, match=r"no checkpoint for step 1 .*available steps: \[3, 4\]"):
            ckpt.restore(1, ABSTRACT)


def test_find_checkpoint_dir(tmp_path):
    run = tmp_path / "run"
    with Checkpointer(run / "checkpoints", async_save=False) as ckpt:
        _save(ckpt, 2, 5)
    root = run / "checkpoints"
    assert find_checkpoint_dir(run) == (root, None)
    assert find_checkpoint_dir(str(root)) == (root, None)
    assert find_checkpoint_dir(root / "2") == (root, 2)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty_run" / "checkpoints").mkdir(parents=True)
    for path in (tmp_path / "empty", tmp_path / "empty_run", tmp_path / "missing"):
        with pytest.raises(CheckpointError, match="no checkpoints in"):
            find_checkpoint_dir(path)


def _nan_in_adam_mu(state: dict) -> dict:
    adam = state["opt"][0]
    mu = {**adam.mu, "w": adam.mu["w"].at[0, 0].set(jnp.nan)}
    return {**state, "opt": (adam._replace(mu=mu), *state["opt"][1:])}


def _inf_in_bias(state: dict) -> dict:
    return {**state, "params": {**state["params"], "b": state["params"]["b"].at[1].set(jnp.inf)}}


@pytest.mark.parametrize(("poison", "path"), [(_nan_in_adam_mu, "opt/0/mu/w"), (_inf_in_bias, "params/b")])
def test_non_finite_state_is_refused(tmp_path, poison, path):
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(CheckpointError, match=f"^refusing to checkpoint step 3: non-finite values in {path}$"):
            ckpt.save(3, poison(_state(3)), data=_data(3), meta=_meta(3))
        assert ckpt.all_steps() == []
    assert list(tmp_path.iterdir()) == []


def _truncate_arrays(step_dir: Path) -> None:
    files = [p for p in (step_dir / "state" / "d").iterdir() if p.is_file()]
    assert files
    for p in files:
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _garbage_meta_json(step_dir: Path) -> None:
    files = [p for p in (step_dir / "meta").iterdir() if p.is_file() and p.name != "commit_success.txt"]
    assert files
    for p in files:
        p.write_text("{this is not json")


def _remove_data_item(step_dir: Path) -> None:
    shutil.rmtree(step_dir / "data")


def _remove_commit_markers(step_dir: Path) -> None:
    (step_dir / "_CHECKPOINT_METADATA").unlink()
    (step_dir / "commit_success.txt").unlink()


def _back_to_temporary_dir(step_dir: Path) -> None:
    step_dir.rename(step_dir.with_name(f"{step_dir.name}.orbax-checkpoint-tmp"))


CORRUPTIONS = {
    "truncated_array_file": (_truncate_arrays, "ValueError"),
    "garbage_meta_json": (_garbage_meta_json, "meta/metadata is not valid JSON"),
    "deleted_item_dir": (_remove_data_item, "item directory 'data' is missing"),
    "no_commit_marker": (_remove_commit_markers, "half-written: no _CHECKPOINT_METADATA"),
    "temporary_dir": (_back_to_temporary_dir, "orbax temporary directory 2.orbax-checkpoint-tmp, never committed"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupt_newest_step_falls_back(tmp_path, caplog, case):
    corrupt, reason = CORRUPTIONS[case]
    with Checkpointer(tmp_path) as ckpt:
        _save(ckpt, 1, 2)
    corrupt(tmp_path / "2")

    caplog.set_level(logging.WARNING, logger=LOGGER)
    with Checkpointer(tmp_path) as ckpt:  # a resumed run
        restored = ckpt.restore(None, ABSTRACT)
        assert restored.step == 1
        _assert_bitwise_equal(restored.state, _state(1))
        assert restored.data == _data(1) and restored.meta == _meta(1)
        (message,) = _warnings(caplog)
        assert message.startswith("checkpoint step 2 in ") and reason in message
        assert message.endswith("restored step 1 instead")
        with pytest.raises(CheckpointError, match=r"^checkpoint step 2 in .* is unusable: "):
            ckpt.restore(2, ABSTRACT)
        if case in ("no_commit_marker", "temporary_dir"):
            assert ckpt.all_steps() == [1]


def test_no_usable_checkpoint(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        _save(ckpt, 1)
    _remove_data_item(tmp_path / "1")
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(CheckpointError, match=r"no usable checkpoint in .* \(step 1: item directory 'data' is missing"):
            ckpt.restore(None, ABSTRACT)


def test_mismatched_target_is_an_error_not_corruption(tmp_path, caplog):
    with Checkpointer(tmp_path) as ckpt:
        _save(ckpt, 1, 2)
        wrong = _abstract(_state(0))
        wrong["params"]["w"] = jax.ShapeDtypeStruct((4, 4), jnp.float32)
        shapes = r"'params/w' has shape \(3, 4\), expected \(4, 4\)"
        with pytest.raises(CheckpointError, match=rf"^checkpoint step 2 .* does not match the expected state: {shapes}"):
            ckpt.restore(None, wrong)
        extra = {**_abstract(_state(0)), "ema": jax.ShapeDtypeStruct((2,), jnp.float32)}
        with pytest.raises(CheckpointError, match="it has no 'ema'"):
            ckpt.restore(None, extra)
    assert _warnings(caplog) == []


def test_save_after_corrupt_step_leaves_others_untouched(tmp_path, caplog):
    with Checkpointer(tmp_path, max_to_keep=3) as ckpt:
        _save(ckpt, 1, 2, 3)
    _truncate_arrays(tmp_path / "3")
    before = {s: _snapshot(tmp_path / s) for s in ("2", "3")}

    caplog.set_level(logging.WARNING, logger=LOGGER)
    with Checkpointer(tmp_path, max_to_keep=3) as ckpt:
        assert ckpt.restore(None, ABSTRACT).step == 2
        assert not ckpt.save(3, _state(3), data=_data(3), meta=_meta(3))  # exists, even if corrupt
        _save(ckpt, 4)  # orbax's max_to_keep collection runs past the corrupt step 3
        assert ckpt.restore(None, ABSTRACT).step == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["2", "3", "4"]  # 1 rotated out by max_to_keep=3
    assert {s: _snapshot(tmp_path / s) for s in ("2", "3")} == before
    assert any("already exists" in m for m in _warnings(caplog))


def test_resave_of_unfinished_step_keeps_the_old_temporary_dir(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        _save(ckpt, 1, 2)
    _back_to_temporary_dir(tmp_path / "2")
    unfinished = _snapshot(tmp_path / "2.orbax-checkpoint-tmp")
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.restore(None, ABSTRACT).step == 1
        _save(ckpt, 2)
        assert ckpt.restore(None, ABSTRACT).step == 2
    (kept,) = tmp_path.glob("abandoned-2-*")
    note = json.loads((kept / NOTE_FILE).read_text())  # the one file added: why it was moved
    assert note["step"] == 2 and note["was"] == "2.orbax-checkpoint-tmp" and "never committed" in note["reason"]
    assert {k: v for k, v in _snapshot(kept).items() if k != NOTE_FILE} == unfinished


def test_same_step_is_not_overwritten(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    with Checkpointer(tmp_path, async_save=True) as ckpt:
        assert ckpt.save(1, _state(1), data=_data(1), meta=_meta(1))
        assert not ckpt.save(1, _state(9), data=_data(9), meta=_meta(9))  # first save may still be in flight
        ckpt.wait()
        before = _snapshot(tmp_path / "1")
    with Checkpointer(tmp_path) as ckpt:
        assert not ckpt.save(1, _state(9), data=_data(9), meta=_meta(9))
        restored = ckpt.restore(1, ABSTRACT)
    _assert_bitwise_equal(restored.state, _state(1))
    assert restored.meta == _meta(1)
    assert _snapshot(tmp_path / "1") == before
    assert sum("step 1 already exists" in m for m in _warnings(caplog)) == 2


def test_older_step_needs_force_unless_newer_ones_are_corrupt(tmp_path):
    with Checkpointer(tmp_path, max_to_keep=5) as ckpt:
        _save(ckpt, 10, 20)
        assert not ckpt.save(15, _state(15), data=_data(15), meta=_meta(15))
        assert ckpt.save(15, _state(15), data=_data(15), meta=_meta(15), force=True)
        ckpt.wait()
        assert ckpt.all_steps() == [10, 15, 20]
    _truncate_arrays(tmp_path / "20")
    with Checkpointer(tmp_path, max_to_keep=5) as ckpt:
        assert ckpt.restore(None, ABSTRACT).step == 15
        # the run resumes from 15: step 20 is known bad, so 18 is not "older than the newest"
        _save(ckpt, 18)
        assert ckpt.all_steps() == [10, 15, 18, 20]


def test_non_json_data_is_refused(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(CheckpointError, match="refusing to checkpoint step 1: meta is not JSON-serialisable"):
            ckpt.save(1, _state(1), data=_data(1), meta={"tokens": np.int64(3)})
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_with_a_retired_counter_still_restores(tmp_path):
    """A checkpoint written when the state still stored ``nonfinite_kind`` restores without it."""
    old_format = {**_state(4), "nonfinite_kind": jnp.asarray(2, jnp.int32)}
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        assert ckpt.save(4, old_format, data=_data(4), meta=_meta(4))
    with Checkpointer(tmp_path) as ckpt:
        restored = ckpt.restore(None, ABSTRACT)
    assert "nonfinite_kind" not in restored.state
    _assert_bitwise_equal(restored.state, _state(4))
