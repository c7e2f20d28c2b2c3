"""archlab-train -> archlab-export -> transformers, and model.init_from back into archlab.

For each family whose architecture a Hugging Face class expresses (decoder_only's default is GPT-2's;
encoder_only as model=bert, encoder_decoder as model=t5): the exported directory loads through
AutoModelFor... and AutoTokenizer with archlab's special tokens, its logits equal archlab's, and a
run started from it (or from the run itself) has the trained run's validation loss.
"""

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from conftest import compose_train  # noqa: E402

from archlab.errors import ArchlabError, ConfigError, ConversionError  # noqa: E402
from archlab.export import export  # noqa: E402
from archlab.trainer import Trainer, compose  # noqa: E402

FAMILIES = {
    "decoder_only": ([], transformers.AutoModelForCausalLM),
    "encoder_only": (["model=bert", "objective=mlm"], transformers.AutoModelForMaskedLM),
    "encoder_decoder": (["model=t5", "objective=span_corruption"], transformers.AutoModelForSeq2SeqLM),
}
TEXT = "To be, or not to be, that is the question: Whether 'tis nobler in the mind"


def export_config(run_dir, out, *more):
    return compose([f"checkpoint={run_dir}", f"out={out}", *more], app="export")


def hf_logits(model, family: str, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        tokens = torch.tensor([ids])
        if family == "encoder_decoder":
            return model(input_ids=tokens, decoder_input_ids=tokens[:, :8]).logits.numpy()
        return model(input_ids=tokens).logits.numpy()


def archlab_logits(trained: Trainer, family: str, ids: list[int]) -> np.ndarray:
    tokens = np.array([ids], np.int32)
    model = trained.model
    if family == "encoder_decoder":
        return np.asarray(model(tokens, tokens[:, :8]))
    return np.asarray(model(tokens))


@pytest.mark.parametrize("family", FAMILIES)
def test_export_loads_in_transformers_and_init_from_restores_the_run(family, tmp_path, train_run, cache_dir):
    overrides, auto_class = FAMILIES[family]
    run_dir, out = tmp_path / "run", tmp_path / "hf"
    summary = train_run(run_dir, *overrides)
    export(export_config(run_dir, out))

    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    vocab = len(tokenizer)
    assert (tokenizer.pad_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.mask_token_id,
            tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2, 3, 4, 5)
    assert tokenizer.convert_tokens_to_ids(["<extra_id_0>", "<extra_id_99>"]) == [vocab - 1, vocab - 100]
    trained = Trainer.restore(run_dir)
    ids = tokenizer(TEXT)["input_ids"]
    assert ids == trained.tokenizer.encode(TEXT) and tokenizer.decode(ids) == TEXT
    ids = ids[:24]  # within the position table (data.seq_len=32)

    hf = auto_class.from_pretrained(out).eval()
    assert (hf.config.pad_token_id, hf.config.eos_token_id) == (0, 5)
    difference = np.abs(hf_logits(hf, family, ids) - archlab_logits(trained, family, ids)).max()
    assert difference < 1e-4, difference
    record = json.loads((out / "archlab_export.json").read_text())
    assert record["step"] == 2 and record["family"] == family

    # The exported directory and the run itself both start a run at the trained run's loss.
    for source in (out, run_dir, run_dir / "checkpoints" / "2"):
        started = Trainer(compose_train([*overrides, f"model.init_from={source}"], cache_dir))
        assert started.init_source is not None and int(started.state.step) == 0
        assert started.evaluate()["val/loss"] == pytest.approx(summary["val/loss"], rel=1e-6)


def test_a_run_started_from_a_source_trains_and_resumes_without_it(tmp_path, train_run, prepared_run):
    source, run_dir = tmp_path / "source", tmp_path / "continued"
    shutil.copytree(prepared_run, source)
    first = train_run(run_dir, f"model.init_from={source}", "run.steps=3")
    assert first["step"] == 3
    # A resumed run reads its own checkpoint, not the source (which may be gone by then).
    shutil.rmtree(source)
    again = train_run(run_dir, f"model.init_from={source}", "run.steps=3")
    assert again["step"] == 3


def test_a_source_of_another_architecture_is_refused_with_the_overrides_to_match(tmp_path, prepared_run, cache_dir):
    with pytest.raises(ConfigError, match=r"holds a different architecture .* add: model.d_model=16"):
        Trainer(compose_train(["size=micro", f"model.init_from={prepared_run}"], cache_dir))
    with pytest.raises(ConfigError, match="no such file or directory"):
        Trainer(compose_train([f"model.init_from={tmp_path / 'nowhere'}"], cache_dir))
    with pytest.raises(ConfigError, match="neither a Hugging Face directory"):
        Trainer(compose_train([f"model.init_from={tmp_path}"], cache_dir))


def test_export_refuses_a_used_directory_and_an_inexpressible_architecture(tmp_path, prepared_run, train_run):
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not an empty directory"):
        export(export_config(prepared_run, used))
    assert [p.name for p in used.iterdir()] == ["keep.txt"]
    pre_ln_encoder = tmp_path / "encoder"
    train_run(pre_ln_encoder, "model=encoder_only", "objective=mlm")
    with pytest.raises(ConversionError, match="BertForMaskedLM cannot express this archlab model: BERT uses post-LN"):
        export(export_config(pre_ln_encoder, tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    with pytest.raises(ArchlabError):
        export(export_config(tmp_path / "nowhere", tmp_path / "out"))
