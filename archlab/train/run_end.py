"""What a run leaves at its end besides the summary: the loss curve, and its files as W&B artifacts.

``loss_curve.png`` (train and validation loss against tokens seen) is drawn from ``metrics.jsonl``, the
record of truth, so it is redrawn whole each time (a resumed run's curve replaces the last one's) and
never depends on W&B. W&B gets it as an image, the run's ``config.yaml`` and ``summary.json`` as a
small artifact (``config-<run id>``, type ``config``) and, with ``logger.log_checkpoints=true``, the
final checkpoint directory (``model-<run id>``, type ``model``, aliases ``latest`` and ``step-<N>``).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from archlab.train.metrics_file import metric_rows
from archlab.train.tracking import METRICS_FILE, SUMMARY_FILE, Tracker

log = logging.getLogger(__name__)

LOSS_CURVE_FILE = "loss_curve.png"
# The run files logged as the config artifact (archlab.train.run_dir.CONFIG_FILE and the summary).
RUN_FILES = ("config.yaml", SUMMARY_FILE)
SAMPLE_COLUMNS = ["step", "prompt", "continuation"]


def loss_series(metrics_path: Path) -> dict[str, list[tuple[float, float]]]:
    """``(tokens, loss)`` points of ``train/loss`` and ``val/loss`` in a ``metrics.jsonl``, in file order
    (rows without ``tokens``, non-finite values and unreadable lines skipped)."""
    series: dict[str, list[tuple[float, float]]] = {"train/loss": [], "val/loss": []}
    for row in metric_rows(metrics_path):
        if not isinstance(row.get("tokens"), (int, float)):
            continue
        for key, points in series.items():
            value = row.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                points.append((float(row["tokens"]), float(value)))
    return series


def plot_loss_curve(run_dir: Path, title: str = "") -> Path | None:
    """Draw ``run_dir/loss_curve.png`` from ``run_dir/metrics.jsonl``; None (nothing written) without losses."""
    series = loss_series(Path(run_dir) / METRICS_FILE)
    if not any(series.values()):
        return None
    # Built on Figure with the Agg canvas, as archlab/scaling/plots.py: no pyplot, no global backend.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for key, style in (("train/loss", "-"), ("val/loss", "o-")):
        if series[key]:
            tokens, losses = zip(*series[key])
            ax.plot(tokens, losses, style, label=key, markersize=3)
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title(title or Path(run_dir).name, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(run_dir) / LOSS_CURVE_FILE
    tmp = out.with_name(f".{out.name}.tmp")
    fig.savefig(tmp, dpi=100, format="png")
    tmp.replace(out)  # a crash leaves the previous curve, never half a file
    return out


def log_run_end(tracker: Tracker, run_dir: Path, step: int, *, val_loss: float | None,
                log_checkpoint: bool, checkpoint_dir: Path | None = None) -> None:
    """The loss curve (file and W&B image), the run-files artifact and, when asked, the checkpoint artifact.

    Never raises: a failed plot is a warning (the metrics are in ``metrics.jsonl``); W&B failures are the
    tracker's (one warning, W&B off)."""
    run_dir = Path(run_dir)
    try:
        curve = plot_loss_curve(run_dir)
    except Exception as error:
        log.warning("loss curve not drawn (%s: %s); the losses are in %s", type(error).__name__, error,
                    run_dir / METRICS_FILE)
        curve = None
    if curve is not None:
        tracker.log_image("loss_curve", curve, step=step)
    if tracker.wandb_mode is None:  # no W&B (or it was switched off by a failure)
        return
    run_id = tracker.run_id
    tracker.log_artifact(f"config-{run_id}", "config", [run_dir / name for name in RUN_FILES],
                         metadata={"step": step, "run_dir": str(run_dir)})
    if log_checkpoint and checkpoint_dir is not None:
        metadata = {"step": step, "val/loss": val_loss, "run_dir": str(run_dir)}
        tracker.log_artifact(f"model-{run_id}", "model", [checkpoint_dir], metadata=metadata,
                             aliases=["latest", f"step-{step}"])
