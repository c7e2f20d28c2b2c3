"""Shared fixtures: configs composed through Hydra's Compose API, then shrunk to test size."""

import os

# scipy's L-BFGS on tiny vectors runs 5-10x slower with 2 OpenBLAS threads on a busy 2-core box.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("WANDB_SILENT", "true")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CONF_DIR = REPO / "archlab" / "conf"

# Small enough to compile and run a few steps in seconds on 2 CPU cores.
SHRINK = [
    "size=nano",
    "data.seq_len=32",
    "data.vocab_size=512",
    "run.batch_size=4",
    "run.steps=2",
    "run.eval_batches=1",
    "run.log_every=1",
    "run.progress=false",
    "run.samples=0",
    "logger=none",
]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One tokenizer/corpus cache for the whole session: the BPE is trained once."""
    return tmp_path_factory.mktemp("archlab-cache")


def compose_train(overrides: list[str], cache_dir: Path, shrink: bool = True):
    """The ``TrainConfig`` ``archlab-train`` would build, shrunk to test size unless ``shrink=False``."""
    from archlab.trainer import compose

    overridden = {o.split("=")[0] for o in overrides}
    shrunk = [s for s in SHRINK if s.split("=")[0] not in overridden] if shrink else []
    return compose([*shrunk, f"data.cache_dir={cache_dir}", *overrides])


@pytest.fixture
def train_run(cache_dir):
    """Train in-process: ``train_run(tmp_dir, *overrides) -> summary``."""
    from archlab.train.loop import train

    def run(run_dir: Path, *overrides: str) -> dict:
        return train(compose_train(list(overrides), cache_dir), Path(run_dir))

    return run


@pytest.fixture(scope="session")
def prepared_run(tmp_path_factory, cache_dir) -> Path:
    """A small decoder-only run trained for 2 steps (copied by tests that must not change it)."""
    from archlab.train.loop import train

    run_dir = tmp_path_factory.mktemp("prepared") / "run"
    train(compose_train([], cache_dir), run_dir)
    return run_dir
