"""Each CPU optimisation of issue 6 on and off, interleaved in one process (JSON lines).

    python experiments/throughput/ablation.py [--rounds 4 --steps 3]

The CPU target shape of ``scripts/benchmark.py --peer``. Two views, every variant compiled with
its patch active and then all timed round by round, alternating, like the peers:

- cumulative, from "before" (issue 6's starting point) to "now" (archlab's CPU default), adding
  one optimisation per row;
- leave-one-out: "now" with a single optimisation turned off;
- a bound: "now" with the attention core replaced by a cheap stand-in that is not attention, so
  its step time says what the fastest possible attention kernel could gain at most.

"Before" restores, for this process only, the hot-path pieces as they were: the attention kernel
with 5-D einsums and softmax-then-value-product, the loss as ``weighted_cross_entropy`` plus
``weighted_accuracy`` (jnp.argmax) on materialised logits, separate q/k/v projections, dense causal
attention, no remat. The later pieces are configuration
(``model.head_chunk``, ``model.remat``, ``model.fuse_qkv``, ``model.causal_blocks``).
"""

from __future__ import annotations

import argparse
import os
import statistics
from contextlib import contextmanager

import jax
import jax.numpy as jnp

from archlab.bench.harness import PEER_SHAPE, BenchShape, emit, machine, time_interleaved
from archlab.nn import attention
from archlab.objectives import model_io
from archlab.objectives.losses import weighted_accuracy, weighted_cross_entropy


def attention_before(q_BTNH, k_BSKH, v_BSKH, mask_BQK, bias_BNQK, scale: float, causal_blocks: int = 1):
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


def attention_stand_in(q_BTNH, k_BSKH, v_BSKH, mask_BQK, bias_BNQK, scale: float, causal_blocks: int = 1):
    """Not attention: a cheap elementwise function of q, k and v, so that the row with it bounds
    what any attention kernel could save (the rest of the step unchanged, gradients still flowing)."""
    return v_BSKH + 0.5 * q_BTNH + 0.25 * k_BSKH


def loss_before(logits_BTV, targets_BT, weights_BT):
    """The loss before issue 6: the two reference functions, autodiff gradient, jnp.argmax accuracy."""
    loss_sum, weight_sum = weighted_cross_entropy(logits_BTV, targets_BT, weights_BT)
    correct_sum, _ = weighted_accuracy(logits_BTV, targets_BT, weights_BT)
    return loss_sum, correct_sum, weight_sum


@contextmanager
def patched(kernel, old_loss: bool):
    """The pre-issue-6 kernel or loss, swapped in while a variant traces (they are not config)."""
    saved = (attention._xla_attention, model_io.cross_entropy_and_accuracy)
    if kernel is not None:
        attention._xla_attention = kernel
    if old_loss:
        model_io.cross_entropy_and_accuracy = loss_before
    try:
        yield
    finally:
        attention._xla_attention, model_io.cross_entropy_and_accuracy = saved


UNCHUNKED, NO_REMAT = "model.head_chunk=0", "model.remat=none"
VARIANTS = [  # (name, extra overrides, attention kernel patched in (None: archlab's), old loss, fused q/k/v, causal blocks)
    ("before (scan)", [UNCHUNKED, NO_REMAT], attention_before, True, False, 1),
    ("+ attention kernel", [UNCHUNKED, NO_REMAT], None, True, False, 1),
    ("+ fused loss", [UNCHUNKED, NO_REMAT], None, False, False, 1),
    ("+ chunked head+loss (head_chunk=512)", [NO_REMAT], None, False, False, 1),
    ("+ fused q/k/v projection", [NO_REMAT], None, False, True, 1),
    ("+ causal blocks (2)", [NO_REMAT], None, False, True, 2),
    ("+ remat=auto (dots_no_batch) = now", [], None, False, True, 2),
    ("now, head_chunk=0 (logits materialised)", [UNCHUNKED], None, False, True, 2),
    ("now, separate q/k/v projections", [], None, False, False, 2),
    ("now, no causal blocks", [], None, False, True, 1),
    ("now, remat=dots", ["model.remat=dots"], None, False, True, 2),
    ("now, remat=none", [NO_REMAT], None, False, True, 2),
    ("now, unrolled layers", ["model.scan_layers=false"], None, False, True, 2),
    ("now, attention core replaced by a stand-in (a bound, not a model)", [], attention_stand_in, False, True, 2),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    sink: list = []
    emit(machine(), sink)
    runners, setups = {}, {}
    for name, extra, kernel, old_loss, fuse_qkv, causal_blocks in VARIANTS:
        knobs = [f"model.fuse_qkv={fuse_qkv}", f"model.causal_blocks={causal_blocks}"]
        setups[name] = setup = BenchShape([*PEER_SHAPE, *extra, *knobs])
        with patched(kernel, old_loss):
            _, runners[name] = setup.compile()
    times = time_interleaved(runners, warmup=args.warmup, rounds=args.rounds, steps=args.steps)
    base = statistics.median(times[VARIANTS[0][0]]["wall"])
    for name, *_ in VARIANTS:
        wall = statistics.median(times[name]["wall"])
        emit({"measure": "ablation", "impl": name, **setups[name].describe(), "step_ms": 1e3 * wall,
                        "cpu_ms": 1e3 * statistics.median(times[name]["cpu"]),
                        "tokens_per_s": setups[name].plan.tokens_per_step / wall,
                        "step_time_vs_before": wall / base, "loadavg_1m": os.getloadavg()[0]}, sink)


if __name__ == "__main__":
    main()
