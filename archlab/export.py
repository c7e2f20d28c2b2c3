"""``archlab-export``: a trained run as a Hugging Face directory (model, tokenizer, special tokens).

The directory holds what ``transformers`` needs and nothing it would guess wrong:

- ``config.json`` + ``model.safetensors`` (``archlab.convert.save_hf``: GPT2LMHeadModel,
  BertForMaskedLM or T5ForConditionalGeneration), with archlab's pad/bos/eos ids;
- ``tokenizer.json`` (the run's byte-level BPE), ``tokenizer_config.json`` and
  ``special_tokens_map.json`` naming [PAD], [EOS], [BOS], [MASK], [CLS], [SEP] and the 100
  ``<extra_id_i>`` sentinels, so ``AutoTokenizer`` gives the ids the model was trained with;
- ``archlab_export.json``: the run and step it came from.

A run whose architecture the Hugging Face class cannot express (a pre-LN BERT, a T5 with learned
positions) is refused in one line, before anything is restored or written; so is an ``out`` that
exists and is not empty. ``model.init_from=<out>`` starts a new archlab run from the directory.
"""

from __future__ import annotations

import json
from pathlib import Path

from archlab.errors import ConfigError
from archlab.schema import ExportConfig
from archlab.tokens import N_SENTINELS, SPECIAL_TOKEN_NAMES, sentinel_name

EXPORT_RECORD = "archlab_export.json"
# transformers' names for archlab's special tokens (archlab/tokens.py's fixed layout).
SPECIAL_TOKEN_ROLES = dict(zip(("pad_token", "cls_token", "sep_token", "mask_token", "bos_token", "eos_token"),
                               SPECIAL_TOKEN_NAMES))


def export(cfg: ExportConfig) -> Path:
    """Write ``cfg.checkpoint``'s run at ``cfg.step`` (default: newest good step) to ``cfg.out``."""
    from archlab.convert import hf_config_for, save_hf
    from archlab.evaluate import find_one_run
    from archlab.train.checkpoint import Checkpointer
    from archlab.trainer import Trainer

    out = Path(cfg.out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"out={cfg.out} already exists and is not an empty directory; nothing is overwritten")
    run_dir, step_from_path = find_one_run(cfg.checkpoint, key="checkpoint", reader="archlab-export")
    trainer = Trainer.for_run(run_dir)
    model_cfg = trainer.plan.model
    hf_config_for(model_cfg)  # refuses what the Hugging Face class cannot express, before the restore
    step = trainer.load(Checkpointer(run_dir / "checkpoints", async_save=False),
                        step_from_path if cfg.step is None else cfg.step).step
    save_hf(trainer.model, model_cfg, out)
    write_hf_tokenizer(trainer.tokenizer, out, model_max_length=model_cfg.max_seq_len)
    record = {"run": str(run_dir.resolve()), "step": int(step), "family": model_cfg.family,
              "objective": trainer.cfg.objective.name, "size": trainer.cfg.size_name}
    (out / EXPORT_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    print(f"archlab-export: {run_dir} step {step} ({model_cfg.family}) -> {out}")
    return out


def write_hf_tokenizer(tokenizer, out: Path, *, model_max_length: int) -> None:
    """``tokenizer.json`` plus the two small files ``AutoTokenizer`` reads the special tokens from."""
    tokenizer.save(out / "tokenizer.json")
    sentinels = [sentinel_name(i) for i in range(N_SENTINELS)]
    special = {**SPECIAL_TOKEN_ROLES, "additional_special_tokens": sentinels}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "model_max_length": model_max_length,
        # the byte-level decoder already gives back the text exactly; no space clean-up on top
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
