"""scripts/arch_comparison.py on a tiny size, checked against the real models; the prefill and
decode FLOP helpers it prints, checked against XLA's cost analysis of the real steps."""

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from archlab.accounting import decode_flops_per_token, prefill_flops
from archlab.config import ModelConfig
from archlab.errors import ConfigError
from archlab.nn.models import build_model

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "arch_comparison.py"


def load_script():
    spec = importlib.util.spec_from_file_location("arch_comparison", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tree_counts(model) -> tuple[int, int]:
    """``(total, embedding)`` parameters of a built model: tables and an untied output matrix."""
    total = embedding = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param)):
        keys = [str(getattr(k, "key", k)) for k in path]
        total += leaf.size
        if "embedding" in keys or keys[:2] == ["lm_head", "output"]:
            embedding += leaf.size
    return total, embedding


def test_script_parameter_counts_equal_the_real_trees(capsys):
    script = load_script()
    table = script.main(["--size", "tiny", "--vocab", "300", "--seq", "32", "--contexts", "64,128", "--output", "8"])
    printed = capsys.readouterr().out
    configs = script.family_configs("tiny", 300, 32, {})
    assert set(table) == {"encoder_only", "decoder_only", "encoder_decoder"}
    for family, (cfg, _) in configs.items():
        total, embedding = tree_counts(build_model(cfg))
        assert table[family]["params_total"] == total, family
        assert table[family]["params_non_embedding"] == total - embedding, family
        assert f"{total:,}" in printed
    assert table["encoder_decoder"]["layers"] == "2 enc + 2 dec"
    assert table["encoder_only"]["objectives"] == "mlm"
    assert table["decoder_only"]["objectives"] == "clm, prefix_lm"
    assert table["encoder_only"]["kv_cache@64"] is None
    cfg = configs["decoder_only"][0]
    assert table["decoder_only"]["kv_cache@128"] == 2 * 2 * cfg.kv_heads * cfg.dim_per_head * 128 * 2  # bf16
    for panel in ("bidirectional", "causal", "cross"):
        assert panel in printed
    # What generation holds for an encoder-decoder: its own cache of 8 output tokens plus every
    # decoder layer's cross-attention keys and values of the 128-token input, as allocated.
    enc_dec = configs["encoder_decoder"][0].replace(kv_cache_dtype="bfloat16")  # main()'s --kv-cache-dtype
    model = build_model(enc_dec)
    encoded = jax.ShapeDtypeStruct((1, 128, enc_dec.d_model), jnp.float32)
    cross = jax.eval_shape(model.cross_kv, encoded)
    held = jax.eval_shape(lambda: model.init_caches(1, 8))
    nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves((cross, held)))
    assert table["encoder_decoder"]["kv_cache@128"] == nbytes
    assert table["encoder_decoder"]["decode_flops@128"] == decode_flops_per_token(
        enc_dec, 8, 128, cross_kv_cached=True)


def test_script_takes_an_explicit_shape(capsys):
    table = load_script().main(["--d-model", "48", "--layers", "3", "--heads", "6", "--kv-heads", "2", "--d-ff", "96",
                                "--vocab", "200", "--seq", "16", "--contexts", "32", "--kv-cache-dtype", "int8"])
    assert "3 enc + 3 dec" == table["encoder_decoder"]["layers"]
    # int8: 1 byte per element plus a 4-byte scale per token and head (head_dim 8).
    assert table["decoder_only"]["kv_cache@32"] == 2 * 3 * 2 * 32 * (8 + 4)
    assert "int8" in capsys.readouterr().out


# ---- the FLOP helpers against XLA -------------------------------------------------------

BASE = dict(d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=512, vocab_size=512, max_seq_len=256,
            scan_layers=False)  # unrolled: XLA's cost analysis counts a scan body once
FAMILIES = {
    "decoder_only": dict(position="rope"),
    "encoder_decoder": dict(family="encoder_decoder", position="relative", use_bias=False, norm="rmsnorm"),
}


def xla_flops(fn, *args) -> float:
    return jax.jit(fn).lower(*args).compile().cost_analysis()["flops"]


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("cache_dtype", ["float32", "int8"])
def test_decode_and_prefill_flops_match_xla(family, cache_dtype):
    """XLA also counts norms, activations, softmax and (int8) dequantization: within 15%."""
    cfg = ModelConfig(**BASE, **FAMILIES[family], kv_cache_dtype=cache_dtype)
    graphdef, state = nnx.split(build_model(cfg))
    context, input_len, prompt = 96, 160, 64
    token_B1 = jnp.ones((1, 1), jnp.int32)

    def decode(state, caches, encoded_BSD):
        model = nnx.merge(graphdef, state)
        memory = {} if family == "decoder_only" else {"encoded_BSD": encoded_BSD}
        hidden_B1D, caches = model.hidden(token_B1, **memory, positions_BT=token_B1 * 5, caches=caches, cache_index=5)
        return model.logits(hidden_B1D), caches

    def prefill(state):
        model = nnx.merge(graphdef, state)
        tokens_BP = jnp.ones((1, prompt), jnp.int32)
        if family == "encoder_decoder":
            return model.encode(tokens_BP)
        hidden_BPD, caches = model.hidden(tokens_BP, caches=model.init_caches(1, context), cache_index=0)
        return model.logits(hidden_BPD[:, -1:]), caches

    caches = build_model(cfg).init_caches(1, context)
    encoded_BSD = jnp.ones((1, input_len, cfg.d_model))
    ours = decode_flops_per_token(cfg, context, input_len if family == "encoder_decoder" else None)
    xla = xla_flops(decode, state, caches, encoded_BSD)
    assert 1.0 <= xla / ours < 1.15, (xla, ours)
    ours, xla = prefill_flops(cfg, prompt, context), xla_flops(prefill, state)
    assert 1.0 <= xla / ours < 1.15, (xla, ours)


def test_cross_kv_recomputation_is_counted():
    """The encoder_decoder step recomputes cross-attention K/V of the whole input at each step."""
    cfg = ModelConfig(**BASE, **FAMILIES["encoder_decoder"])
    per_input_token = 2 * 2 * cfg.d_model * cfg.kv_heads * cfg.dim_per_head * cfg.decoder_layers
    extra = decode_flops_per_token(cfg, 16, 1000) - decode_flops_per_token(cfg, 16, 1000, cross_kv_cached=True)
    assert extra == 1000 * per_input_token
    assert prefill_flops(cfg, 1000, cross_kv_cached=True) - prefill_flops(cfg, 1000) == extra


def test_decode_flops_refusals():
    with pytest.raises(ConfigError, match="encoder_only models have no decoder"):
        decode_flops_per_token(ModelConfig(**{**BASE, "family": "encoder_only"}), 16)
    with pytest.raises(ConfigError, match="needs input_len"):
        decode_flops_per_token(ModelConfig(**BASE, **FAMILIES["encoder_decoder"]), 16)
