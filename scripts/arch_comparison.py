"""The three families side by side at one size: parameters, FLOPs, KV-cache bytes, objectives, masks.

    python scripts/arch_comparison.py --size tiny
    python scripts/arch_comparison.py --size gpt2_small --vocab 50257 --seq 1024 --contexts 1024,8192,131072
    python scripts/arch_comparison.py --d-model 768 --layers 12 --heads 12 --d-ff 3072 --kv-heads 4

Each family's config is composed exactly as ``archlab-train model=<family> size=<size>`` would
build it (archlab/conf/model/<family>.yaml on equal footing), so encoder_decoder has ``layers`` encoder
AND ``layers`` decoder layers (T5's L+L against L). Every number comes from archlab/accounting.py
(tested against real parameter trees, XLA cost analysis and allocated caches); nothing is built
except the tiny mask pictures. Runs on the CPU in seconds.

Decoding at context c, as ``archlab.generate`` decodes: decoder_only holds all c tokens in its KV
cache; encoder_decoder reads them as a c-token encoder input, projects every decoder layer's
cross-attention keys and values of it once, and caches its ``--output`` decoder tokens. Its KV
cache is both (the cross-attention keys and values in the compute dtype, the self-attention cache
in ``--kv-cache-dtype``); the row below the decode FLOPs shows what a decoder that recomputes the
cross keys and values at every step would cost instead.
"""

from __future__ import annotations

import argparse
import sys

import jax.numpy as jnp
import numpy as np

from archlab.accounting import (
    count_params, cross_kv_bytes, decode_flops_per_token, forward_flops, kv_cache_bytes, prefill_flops,
)
from archlab.config import KV_CACHE_DTYPES, ModelConfig
from archlab.nn import masks
from archlab.objectives.registry import FAMILIES, OBJECTIVE_FAMILY

SHORT = {"encoder_only": "encoder-only", "decoder_only": "decoder-only", "encoder_decoder": "encoder-decoder"}


def objectives_of(family: str) -> list[str]:
    return [name for name, fam in OBJECTIVE_FAMILY.items() if fam == family]


def family_configs(size: str, vocab: int, seq: int, model_overrides: dict[str, object]) -> dict[str, tuple]:
    """``{family: (ModelConfig, TrainConfig)}`` composed exactly as ``archlab-train`` composes them."""
    from archlab.trainer import compose

    extra = [f"model.{key}={value}" for key, value in model_overrides.items() if value is not None]
    configs = {}
    for family in FAMILIES:
        train_cfg = compose([f"model={family}", f"size={size}", f"objective={objectives_of(family)[0]}",
                             f"data.vocab_size={vocab}", f"data.seq_len={seq}", "logger=none", *extra])
        configs[family] = (train_cfg.model, train_cfg)
    return configs


def compare(configs: dict[str, tuple], *, seq: int, contexts: list[int], output: int) -> dict[str, dict]:
    """Every number of the table: ``{family: {row: value or None}}``."""
    from archlab.train.setup import decoder_length_for

    table: dict[str, dict] = {}
    for family, (cfg, train_cfg) in configs.items():
        params = count_params(cfg)
        row: dict[str, object] = {
            "layers": (f"{cfg.n_layers} enc + {cfg.decoder_layers} dec" if family == "encoder_decoder"
                       else str(cfg.n_layers)),
            "params_total": params.total,
            "params_non_embedding": params.non_embedding,
            "train_flops_per_token": forward_flops(cfg, seq, decoder_length_for(train_cfg)).per_token(),
            "objectives": ", ".join(objectives_of(family)),
            "prefill_flops": prefill_flops(cfg, seq),
        }
        for c in contexts:
            if family == "encoder_only":
                row.update({f"decode_flops@{c}": None, f"decode_flops_recomputing_cross@{c}": None,
                            f"kv_cache@{c}": None, f"cross_kv@{c}": None})
            elif family == "decoder_only":
                row.update({f"decode_flops@{c}": decode_flops_per_token(cfg, c),
                            f"decode_flops_recomputing_cross@{c}": None,
                            f"kv_cache@{c}": kv_cache_bytes(cfg, c), f"cross_kv@{c}": None})
            else:
                row.update({
                    f"decode_flops@{c}": decode_flops_per_token(cfg, output, c, cross_kv_cached=True),
                    f"decode_flops_recomputing_cross@{c}": decode_flops_per_token(cfg, output, c),
                    f"kv_cache@{c}": kv_cache_bytes(cfg, output) + cross_kv_bytes(cfg, c),
                    f"cross_kv@{c}": cross_kv_bytes(cfg, c),
                })
        table[family] = row
    return table


def _number(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _bytes(value) -> str:
    if value is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value} B"


def render_table(table: dict[str, dict], *, seq: int, contexts: list[int], output: int, cache_dtype: str) -> str:
    labels = [
        ("layers", "layers", str),
        ("params_total", "parameters, total", lambda v: f"{v:,}"),
        ("params_non_embedding", "parameters, non-embedding", lambda v: f"{v:,}"),
        ("train_flops_per_token", f"train FLOPs / token (seq {seq})", _number),
        ("objectives", "trains with", str),
        ("prefill_flops", f"prefill FLOPs ({seq}-token input)", _number),
    ]
    for c in contexts:
        labels += [
            (f"decode_flops@{c}", f"decode FLOPs / token @ {c:,}", _number),
            (f"decode_flops_recomputing_cross@{c}", "  ... recomputing cross K/V per step", _number),
            (f"kv_cache@{c}", f"KV cache ({cache_dtype}) @ {c:,}", _bytes),
            (f"cross_kv@{c}", "  of which cross-attention K/V", _bytes),
        ]
    families = list(table)
    header = ["", *(SHORT[f] for f in families)]
    rows = [header] + [
        [label, *("-" if table[f][key] is None else fmt(table[f][key]) for f in families)] for key, label, fmt in labels
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(widths[0]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(r))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(
        f"@ c: c tokens of context; encoder-decoder reads them as encoder input, caches their cross-attention K/V "
        f"and its {output} output tokens."
    )
    return "\n".join(lines)


def _picture(mask_QK: np.ndarray, rows: list[str], cols: list[str]) -> list[str]:
    lines = ["     " + " ".join(c.rjust(2) for c in cols)]
    for label, row in zip(rows, mask_QK):
        lines.append(label.rjust(4) + " " + " ".join(" x" if v else " ." for v in row))
    return lines


def mask_pictures() -> str:
    """Each family's masks on 6 tokens packed as two documents (a1 a2 a3 | b1 b2 b3), from masks.py."""
    segments_BT = jnp.asarray([[1, 1, 1, 2, 2, 2]], jnp.int32)
    names = ["a1", "a2", "a3", "b1", "b2", "b3"]
    prefix_BT = jnp.asarray([[1, 1, 0, 1, 0, 0]], jnp.int32)
    decoder_segments_BT = jnp.asarray([[1, 1, 2, 2]], jnp.int32)
    decoder_names = ["y1", "y2", "z1", "z2"]
    panels = [
        ("encoder-only: bidirectional", masks.bidirectional_mask(segments_BT), names, names),
        ("decoder-only: causal", masks.decoder_mask(segments_BT), names, names),
        ("decoder-only prefix-LM (prefix a1 a2 | b1)", masks.prefix_lm_mask(segments_BT, prefix_BT), names, names),
        ("encoder-decoder: encoder self", masks.bidirectional_mask(segments_BT), names, names),
        ("encoder-decoder: decoder self (causal)", masks.decoder_mask(decoder_segments_BT), decoder_names,
         decoder_names),
        ("encoder-decoder: cross (y->a, z->b)", masks.cross_mask(decoder_segments_BT, segments_BT), decoder_names,
         names),
    ]
    out = ["masks (rows: queries, columns: keys; x = may attend), two packed documents:"]
    for title, mask_BQK, rows, cols in panels:
        out += ["", title, *_picture(np.asarray(mask_BQK[0]), rows, cols)]
    return "\n".join(out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="tiny", help="a archlab/conf/size/*.yaml name (explicit shape flags override it)")
    parser.add_argument("--d-model", type=int)
    parser.add_argument("--layers", type=int, help="layers of each stack (encoder_decoder: encoder and decoder)")
    parser.add_argument("--heads", type=int)
    parser.add_argument("--kv-heads", type=int, help="key/value heads (GQA/MQA); default: --heads")
    parser.add_argument("--d-ff", type=int)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq", type=int, default=512, help="training / prefill length")
    parser.add_argument("--contexts", default="1024,8192,131072", help="comma-separated decoding contexts")
    parser.add_argument("--output", type=int, default=64, help="generated tokens (encoder_decoder's decoder cache)")
    parser.add_argument("--kv-cache-dtype", default="bfloat16", choices=KV_CACHE_DTYPES)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, dict]:
    args = parse_args(argv)
    contexts = [int(c) for c in args.contexts.split(",") if c.strip()]
    shape = {"d_model": args.d_model, "n_layers": args.layers, "n_heads": args.heads, "n_kv_heads": args.kv_heads,
             "d_ff": args.d_ff, "kv_cache_dtype": args.kv_cache_dtype}
    configs = family_configs(args.size, args.vocab, args.seq, shape)
    table = compare(configs, seq=args.seq, contexts=contexts, output=args.output)
    cfg: ModelConfig = configs["decoder_only"][0]
    print(f"size={args.size}: d_model {cfg.d_model}, {cfg.n_layers} layers, {cfg.n_heads} heads "
          f"({cfg.kv_heads} kv), head_dim {cfg.dim_per_head}, d_ff {cfg.d_ff}, vocab {cfg.vocab_size}, "
          f"seq {args.seq}, {cfg.position} positions, {cfg.dtype} compute")
    print(render_table(table, seq=args.seq, contexts=contexts, output=args.output, cache_dtype=cfg.cache_dtype))
    if cfg.position == "learned" and max(contexts) > cfg.max_seq_len:
        print(f"note: learned positions stop at max_seq_len={cfg.max_seq_len}; longer contexts need rope/relative.")
    print()
    print(mask_pictures())
    return table


if __name__ == "__main__":
    main(sys.argv[1:])
