"""Each CPU optimisation of issue 6 on and off, interleaved in one process (JSON lines).

    python experiments/throughput/ablation.py [--rounds 4 --steps 3]

The CPU target shape of ``scripts/benchmark.py --peer``. "before" restores, for this process
only, the two hot-path pieces as they were before the change: the attention kernel with the 5-D
einsums and softmax-then-value-product, and the loss as ``weighted_cross_entropy`` plus
``weighted_accuracy`` (jnp.argmax). Every variant is compiled with its patch active, then all
variants are timed round by round, alternating, like the peers.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from contextlib import contextmanager
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import benchmark  # noqa: E402

from archlab.nn import attention  # noqa: E402
from archlab.objectives import model_io  # noqa: E402
from archlab.objectives.losses import weighted_accuracy, weighted_cross_entropy  # noqa: E402


def attention_before(q_BTNH, k_BSKH, v_BSKH, mask_BQK, bias_BNQK, scale: float):
    """The XLA kernel before issue 6: 5-D einsums in the [B,T,K,G,H] layout, softmax, then values."""
    batch, q_len, n_heads, head_dim = q_BTNH.shape
    kv_heads = k_BSKH.shape[2]
    group = n_heads // kv_heads
    q_BTKGH = q_BTNH.reshape(batch, q_len, kv_heads, group, head_dim)
    scores_BKGTS = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH, preferred_element_type=jnp.float32) * scale
    if bias_BNQK is not None:
        scores_BKGTS = scores_BKGTS + bias_BNQK.reshape(
            bias_BNQK.shape[0], kv_heads, group, *bias_BNQK.shape[2:]).astype(jnp.float32)
    scores_BKGTS = jnp.where(mask_BQK[:, None, None], scores_BKGTS, jnp.finfo(jnp.float32).min)
    weights_BKGTS = jax.nn.softmax(scores_BKGTS, axis=-1).astype(v_BSKH.dtype)
    return jnp.einsum("bkgts,bskh->btkgh", weights_BKGTS, v_BSKH).reshape(batch, q_len, n_heads, head_dim)


def loss_before(logits_BTV, targets_BT, weights_BT):
    """The loss before issue 6: the two reference functions, autodiff gradient, jnp.argmax accuracy."""
    loss_sum, weight_sum = weighted_cross_entropy(logits_BTV, targets_BT, weights_BT)
    correct_sum, _ = weighted_accuracy(logits_BTV, targets_BT, weights_BT)
    return loss_sum, correct_sum, weight_sum


@contextmanager
def patched(old_attention: bool, old_loss: bool):
    saved = attention._xla_attention, model_io.cross_entropy_and_accuracy
    if old_attention:
        attention._xla_attention = attention_before
    if old_loss:
        model_io.cross_entropy_and_accuracy = loss_before
    try:
        yield
    finally:
        attention._xla_attention, model_io.cross_entropy_and_accuracy = saved


VARIANTS = [  # (name, extra overrides, old attention, old loss)
    ("before (scan)", [], True, True),
    ("+ attention kernel", [], False, True),
    ("+ fused loss = now (scan)", [], False, False),
    ("before, unrolled", ["model.scan_layers=false"], True, True),
    ("now, unrolled", ["model.scan_layers=false"], False, False),
    ("before, remat=dots", ["model.remat=dots"], True, True),
    ("now, remat=dots", ["model.remat=dots"], False, False),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    sink: list = []
    benchmark.emit(benchmark.machine(), sink)
    runners, setups = {}, {}
    for name, extra, old_attention, old_loss in VARIANTS:
        setups[name] = setup = benchmark.Setup([*benchmark.PEER_SHAPE, *extra])
        with patched(old_attention, old_loss):
            _, runners[name] = setup.compile()
    times = benchmark.time_interleaved(runners, warmup=args.warmup, rounds=args.rounds, steps=args.steps)
    base = statistics.median(times[VARIANTS[0][0]]["wall"])
    for name, _, _, _ in VARIANTS:
        wall = statistics.median(times[name]["wall"])
        benchmark.emit({"measure": "ablation", "impl": name, **setups[name].describe(), "step_ms": 1e3 * wall,
                        "cpu_ms": 1e3 * statistics.median(times[name]["cpu"]),
                        "tokens_per_s": setups[name].plan.tokens_per_step / wall,
                        "step_time_vs_before": wall / base}, sink)


if __name__ == "__main__":
    main()
