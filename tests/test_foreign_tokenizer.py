"""Tokenizers made elsewhere, renumbered into archlab's special-token layout (archlab/data/foreign.py).

Small stand-ins are trained here with ``tokenizers`` in the three styles that matter: GPT-2's
byte-level BPE with one special (<|endoftext|>, last), BERT's WordPiece ([PAD] [UNK] [CLS] [SEP]
[MASK]), and T5's Unigram (<pad> </s> <unk>, the sentinels added on top).
"""

import json

import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from conftest import compose_train

from archlab.data import Tokenizer
from archlab.data.foreign import adapted_tokenizer_file
from archlab.errors import ConfigError
from archlab.tokens import SPECIAL

TEXT = "the cat sat on the hello mat world, and the dog"
CORPUS = ["hello world the cat sat on the mat", "a dog and a cat, the world"] * 40


def gpt2_like(path):
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    backend.add_special_tokens(["<|endoftext|>"])
    backend.save(str(path))
    return backend


def bert_like(path):
    backend = tokenizers.Tokenizer(models.WordPiece(unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    backend.train_from_iterator(CORPUS, trainers.WordPieceTrainer(
        vocab_size=120, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], show_progress=False))
    backend.save(str(path))
    return backend


def t5_like(path):
    backend = tokenizers.Tokenizer(models.Unigram())
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    backend.train_from_iterator(CORPUS, trainers.UnigramTrainer(
        vocab_size=60, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False))
    backend.add_special_tokens([f"<extra_id_{i}>" for i in reversed(range(100))])
    backend.save(str(path))
    return backend


STYLES = {"gpt2": (gpt2_like, "clm", "<|endoftext|>"), "bert": (bert_like, "mlm", None),
          "t5": (t5_like, "span_corruption", "</s>")}


@pytest.mark.parametrize("style", STYLES)
def test_a_foreign_tokenizer_is_renumbered_and_encodes_text_as_before(style, tmp_path):
    make, objective, eos = STYLES[style]
    original = make(tmp_path / "tokenizer.json")
    path, new_to_old = adapted_tokenizer_file(tmp_path / "tokenizer.json", objective=objective, special_tokens={},
                                              cache_dir=tmp_path / "cache")
    adapted = Tokenizer.from_file(path)  # follows the layout, or this raises
    old_ids, new_ids = original.encode(TEXT).ids, adapted.encode(TEXT)
    assert [int(new_to_old[i]) for i in new_ids] == old_ids
    assert adapted.decode(new_ids) == original.decode(old_ids)
    if eos is not None:
        assert new_to_old[SPECIAL.eos] == original.token_to_id(eos)
    if style == "bert":
        assert new_to_old[SPECIAL.mask] == original.token_to_id("[MASK]")
        assert new_to_old[SPECIAL.eos] == -1  # added: nothing in mlm trains on it
    if style == "t5":
        assert new_to_old[adapted.vocab_size - 1] == original.token_to_id("<extra_id_0>")
    # Every old token is still there, once.
    kept = new_to_old[new_to_old >= 0]
    assert sorted(kept.tolist()) == list(range(original.get_vocab_size()))


def test_a_role_the_objective_needs_is_refused_when_missing_and_can_be_named(tmp_path):
    gpt2_like(tmp_path / "gpt2.json")
    bert_like(tmp_path / "bert.json")
    with pytest.raises(ConfigError, match="has no mask token, which objective mlm needs"):
        adapted_tokenizer_file(tmp_path / "gpt2.json", objective="mlm", special_tokens={}, cache_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"has no <extra_id_0> \(100 of the 100 sentinels missing\)"):
        adapted_tokenizer_file(tmp_path / "bert.json", objective="span_corruption", special_tokens={"eos": "[SEP]"},
                               cache_dir=tmp_path)
    with pytest.raises(ConfigError, match="ordinary token of the tokenizer"):
        adapted_tokenizer_file(tmp_path / "gpt2.json", objective="clm", special_tokens={"eos": "the"},
                               cache_dir=tmp_path)
    with pytest.raises(ConfigError, match="is not a role"):
        adapted_tokenizer_file(tmp_path / "gpt2.json", objective="clm", special_tokens={"end": "<|endoftext|>"},
                               cache_dir=tmp_path)
    # BERT's [SEP] can end documents for a causal model when asked.
    path, new_to_old = adapted_tokenizer_file(tmp_path / "bert.json", objective="clm",
                                              special_tokens={"eos": "[SEP]"}, cache_dir=tmp_path)
    assert Tokenizer.from_file(path).token(SPECIAL.eos) == "[EOS]"


def test_a_run_trains_on_a_foreign_tokenizer_and_starts_from_foreign_weights(tmp_path, train_run, cache_dir):
    """GPT-2-style: training from scratch with its tokenizer, and a Hugging Face GPT-2 (random weights, the
    foreign ids) as model.init_from, whose logits archlab reproduces through the renumbering."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    original = gpt2_like(tmp_path / "tokenizer.json")
    summary = train_run(tmp_path / "scratch", f"data.tokenizer_file={tmp_path / 'tokenizer.json'}")
    saved = Tokenizer.from_file(tmp_path / "scratch" / "tokenizer.json")
    assert saved.vocab_size == original.get_vocab_size() + 105 and summary["step"] == 2

    hf_dir = tmp_path / "hf"
    config = transformers.GPT2Config(vocab_size=original.get_vocab_size(), n_positions=32, n_embd=16, n_layer=2,
                                     n_head=2, n_inner=64, activation_function="gelu_new")
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(hf_dir)
    (hf_dir / "tokenizer.json").write_text((tmp_path / "tokenizer.json").read_text())
    (hf_dir / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    from archlab.trainer import Trainer

    started = Trainer(compose_train([f"model.init_from={hf_dir}"], cache_dir))
    ids = started.tokenizer.encode(TEXT)
    new_to_old = started.init_source.new_to_old
    with torch.no_grad():
        hf_logits = transformers.GPT2LMHeadModel.from_pretrained(hf_dir)(torch.tensor(new_to_old[ids][None])).logits
    ours = np.asarray(started.model(np.array([ids], np.int32)))
    kept = np.flatnonzero(new_to_old >= 0)
    np.testing.assert_allclose(ours[0][:, kept], hf_logits[0].numpy()[:, new_to_old[kept]], atol=1e-4)
    assert started.evaluate()["val/loss"] > 0
