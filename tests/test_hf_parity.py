"""Hugging Face parity: GPT-2, BERT and T5 logits agree both ways (HF -> archlab, archlab -> HF).

Tiny random models with odd shapes (3 or 5 heads, vocabularies 333 and 517, T5 head_dim
unequal to d_model / n_heads, unequal encoder/decoder depths) and a padded batch; every
parameter is perturbed away from its init so a bias or norm mapped to the wrong place shows.
"""

import json

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from archlab.config import ModelConfig, preset  # noqa: E402
from archlab.convert import load_hf, model_from_params, model_params, save_hf  # noqa: E402
from archlab.errors import ConversionError  # noqa: E402
from archlab.nn.models import build_model  # noqa: E402

TOL = 1e-4
EAGER = dict(attn_implementation="eager")


def batch(vocab: int, length: int, pad_row: int, n_pad: int, seed: int):
    """Token ids ``[2, length]`` and an attention mask with ``n_pad`` zeros at the end of ``pad_row``."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(2, length))
    mask = np.ones((2, length), np.int64)
    mask[pad_row, length - n_pad:] = 0
    return ids, mask


def max_diff(ref: np.ndarray, out, valid_BT: np.ndarray) -> float:
    """Largest |difference| over non-padded positions, in float32."""
    diff = float(np.abs(np.asarray(ref, np.float32) - np.asarray(out, np.float32))[valid_BT.astype(bool)].max())
    print(f"max |diff| = {diff:.2e} (max |logit| {np.abs(ref).max():.2f})")
    return diff


def scramble_hf(model):
    """Redraw every parameter (norm scales near 1): zero biases and unit norms would hide mapping errors."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm = any(key in name for key in ("LayerNorm.weight", "ln_", "layer_norm.weight"))
            p.copy_(1 + 0.1 * torch.randn_like(p) if is_norm and name.endswith("weight") else 0.1 * torch.randn_like(p))
    return model.eval()


def scrambled_archlab(cfg: ModelConfig, seed: int):
    params = model_params(build_model(cfg, seed=seed))
    rng = np.random.default_rng(seed)
    noisy = {name: value + 0.1 * rng.standard_normal(value.shape).astype(np.float32) for name, value in params.items()}
    return model_from_params(cfg, noisy)


def run(fn, **inputs):
    with torch.no_grad():
        return fn(**{k: torch.as_tensor(v) for k, v in inputs.items()})


def j(x):
    return jnp.asarray(x, jnp.int32)


def assert_roundtrip(cfg: ModelConfig, model, out_dir) -> None:
    """save_hf then load_hf gives back the same parameters."""
    cfg2, model2 = load_hf(out_dir)
    before, after = model_params(model), model_params(model2)
    assert cfg2.dim_per_head == cfg.dim_per_head and cfg2.decoder_layers == cfg.decoder_layers
    assert before.keys() == after.keys()
    for name in before:
        np.testing.assert_array_equal(before[name], after[name], err_msg=name)


# ---- GPT-2 ------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_inner, act", [(None, "gelu_new"), (100, "gelu")])
def test_gpt2_hf_to_archlab(tmp_path, n_inner, act):
    hf_cfg = transformers.GPT2Config(
        vocab_size=333, n_embd=60, n_head=5, n_layer=3, n_positions=16, n_inner=n_inner, activation_function=act,
        **EAGER,
    )
    hf = scramble_hf(transformers.GPT2LMHeadModel(hf_cfg))
    hf.save_pretrained(tmp_path, safe_serialization=True)
    cfg, model = load_hf(tmp_path)
    assert cfg.d_ff == (n_inner or 240) and cfg.activation == ("gelu_tanh" if act == "gelu_new" else "gelu")
    ids, mask = batch(333, 11, pad_row=1, n_pad=4, seed=1)
    ref = run(hf, input_ids=ids, attention_mask=mask).logits.numpy()
    assert max_diff(ref, model(j(ids), segment_ids_BT=j(mask)), mask) <= TOL


@pytest.mark.parametrize("tied", [True, False])
def test_gpt2_archlab_to_hf(tmp_path, tied):
    cfg = preset("gpt2", vocab_size=333, d_model=60, n_heads=3, n_layers=2, d_ff=90, max_seq_len=16,
                 tie_embeddings=tied)
    model = scrambled_archlab(cfg, seed=2)
    save_hf(model, cfg, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["GPT2LMHeadModel"]
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path, **EAGER).eval()
    ids, mask = batch(333, 13, pad_row=0, n_pad=5, seed=3)
    ref = run(hf, input_ids=ids, attention_mask=mask).logits.numpy()
    assert max_diff(ref, model(j(ids), segment_ids_BT=j(mask)), mask) <= TOL
    assert_roundtrip(cfg, model, tmp_path)


# ---- BERT -------------------------------------------------------------------------------------

BERT_HF = dict(vocab_size=333, hidden_size=60, num_attention_heads=5, num_hidden_layers=3, intermediate_size=100,
               max_position_embeddings=16, type_vocab_size=3)


@pytest.mark.parametrize("architecture", ["BertForMaskedLM", "BertForPreTraining"])
def test_bert_hf_to_archlab(tmp_path, architecture):
    hf_class = getattr(transformers, architecture)
    hf = scramble_hf(hf_class(transformers.BertConfig(**BERT_HF, **EAGER)))
    hf.save_pretrained(tmp_path, safe_serialization=True)
    cfg, model = load_hf(tmp_path)
    ids, mask = batch(333, 12, pad_row=1, n_pad=3, seed=4)
    types = np.random.default_rng(5).integers(0, 3, size=ids.shape)
    out = run(hf, input_ids=ids, attention_mask=mask, token_type_ids=types)
    ref = out.logits if architecture == "BertForMaskedLM" else out.prediction_logits
    hidden, _ = model.hidden(j(ids), segment_ids_BT=j(mask), token_types_BT=j(types))
    assert max_diff(ref.numpy(), model.logits(hidden), mask) <= TOL
    assert cfg.pooler == (architecture == "BertForPreTraining")  # BertForMaskedLM has no pooler
    if cfg.pooler:
        pooled = run(hf.bert, input_ids=ids, attention_mask=mask, token_type_ids=types).pooler_output.numpy()
        assert max_diff(pooled, model.pool(hidden, j(mask)), np.ones(pooled.shape)) <= TOL


@pytest.mark.parametrize("overrides", [dict(), dict(type_vocab_size=0, pooler=False, tie_embeddings=False)])
def test_bert_archlab_to_hf(tmp_path, overrides):
    cfg = preset("bert", vocab_size=517, d_model=60, n_heads=3, n_layers=2, d_ff=84, max_seq_len=16, **overrides)
    model = scrambled_archlab(cfg, seed=6)
    save_hf(model, cfg, tmp_path)
    hf = transformers.BertForMaskedLM.from_pretrained(tmp_path, **EAGER).eval()
    ids, mask = batch(517, 14, pad_row=0, n_pad=6, seed=7)
    types = np.random.default_rng(8).integers(0, max(cfg.type_vocab_size, 1), size=ids.shape)
    ref = run(hf, input_ids=ids, attention_mask=mask, token_type_ids=types).logits.numpy()
    out = model(j(ids), segment_ids_BT=j(mask), token_types_BT=j(types) if cfg.type_vocab_size else None)
    assert max_diff(ref, out, mask) <= TOL
    if cfg.pooler:
        base = transformers.BertModel.from_pretrained(tmp_path, **EAGER).eval()
        pooled = run(base, input_ids=ids, attention_mask=mask, token_type_ids=types).pooler_output.numpy()
        hidden, _ = model.hidden(j(ids), segment_ids_BT=j(mask), token_types_BT=j(types))
        assert max_diff(pooled, model.pool(hidden, j(mask)), np.ones(pooled.shape)) <= TOL
    if not overrides:  # a zero token-type row and zero head bias come back as real parameters
        assert_roundtrip(cfg, model, tmp_path)


# ---- T5 ---------------------------------------------------------------------------------------

T5_STYLES = {
    "v1_0": dict(d_model=60, num_heads=5, d_kv=12, feed_forward_proj="relu", tie_word_embeddings=True),
    "v1_1": dict(d_model=60, num_heads=3, d_kv=7, feed_forward_proj="gated-gelu", tie_word_embeddings=False),
}


def t5_batch(vocab: int, seed: int):
    enc_ids, enc_mask = batch(vocab, 11, pad_row=0, n_pad=4, seed=seed)
    dec_ids, dec_mask = batch(vocab, 7, pad_row=1, n_pad=2, seed=seed + 1)
    return enc_ids, enc_mask, dec_ids, dec_mask


def t5_compare(hf, model, vocab: int, seed: int) -> float:
    enc_ids, enc_mask, dec_ids, dec_mask = t5_batch(vocab, seed)
    ref = run(hf, input_ids=enc_ids, attention_mask=enc_mask, decoder_input_ids=dec_ids,
              decoder_attention_mask=dec_mask).logits.numpy()
    out = model(j(enc_ids), j(dec_ids), encoder_segment_ids_BS=j(enc_mask), decoder_segment_ids_BT=j(dec_mask))
    return max_diff(ref, out, dec_mask)


@pytest.mark.parametrize("style", list(T5_STYLES))
def test_t5_hf_to_archlab(tmp_path, style):
    hf_cfg = transformers.T5Config(
        vocab_size=517, d_ff=88, num_layers=2, num_decoder_layers=3, relative_attention_num_buckets=16,
        relative_attention_max_distance=20, decoder_start_token_id=0, **T5_STYLES[style], **EAGER,
    )
    hf = scramble_hf(transformers.T5ForConditionalGeneration(hf_cfg))
    hf.save_pretrained(tmp_path, safe_serialization=True)
    cfg, model = load_hf(tmp_path)
    assert cfg.activation == ("relu" if style == "v1_0" else "geglu")
    assert cfg.scale_tied_logits == cfg.tie_embeddings == (style == "v1_0")
    assert t5_compare(hf, model, 517, seed=9) <= TOL


@pytest.mark.parametrize("name, shape", [
    ("t5", dict(d_model=60, n_heads=5, n_layers=3, n_decoder_layers=2)),
    ("t5_v1_1", dict(d_model=48, n_heads=3, head_dim=10, n_layers=2, n_decoder_layers=3)),
])
def test_t5_archlab_to_hf(tmp_path, name, shape):
    cfg = preset(name, vocab_size=333, d_ff=72, relative_buckets=16, relative_max_distance=20, max_seq_len=32, **shape)
    model = scrambled_archlab(cfg, seed=10)
    save_hf(model, cfg, tmp_path)
    hf = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path, **EAGER).eval()
    assert t5_compare(hf, model, 333, seed=11) <= TOL
    assert_roundtrip(cfg, model, tmp_path)


# ---- refusals ---------------------------------------------------------------------------------

def test_other_model_type_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(ConversionError, match="of type 'llama'"):
        load_hf(tmp_path)


def test_missing_directory_config_or_weights_is_refused(tmp_path):
    with pytest.raises(ConversionError, match="not a directory"):
        load_hf(tmp_path / "nowhere")
    with pytest.raises(ConversionError, match="no config.json"):
        load_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ConversionError, match="no model.safetensors"):
        load_hf(tmp_path)


@pytest.mark.parametrize("overrides, reason", [
    (dict(position="rope"), "learned positions"),
    (dict(n_kv_heads=1), "grouped-query"),
    (dict(activation="swiglu"), "no swiglu MLP"),
])
def test_save_refuses_what_gpt2_cannot_express(tmp_path, overrides, reason):
    cfg = preset("gpt2", vocab_size=64, d_model=16, n_heads=2, n_layers=1, d_ff=32, max_seq_len=8, **overrides)
    with pytest.raises(ConversionError, match=f"GPT2LMHeadModel cannot express.*{reason}"):
        save_hf(build_model(cfg), cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_save_never_overwrites_silently(tmp_path):
    cfg = preset("t5", vocab_size=64, d_model=16, n_heads=2, n_layers=1, d_ff=32, max_seq_len=8)
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(ConversionError, match="not empty"):
        save_hf(build_model(cfg), cfg, tmp_path)
    save_hf(build_model(cfg), cfg, tmp_path, overwrite=True)
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "notes.txt").is_file()
