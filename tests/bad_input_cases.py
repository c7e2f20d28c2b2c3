"""The catalogue of bad inputs: each case is a command line, the message it must print, its exit code.

``{tmp}`` is a fresh directory, ``{corpus}`` holds good, empty and non-UTF-8 text files, and
``{run}`` is a copy of a small trained run (for resume and evaluation cases).
"""

from __future__ import annotations

import hashlib
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SMALL = ["size=nano", "data.seq_len=32", "data.vocab_size=512", "run.batch_size=4", "run.steps=2",
         "run.eval_batches=1", "run.progress=false", "logger=none"]


@dataclass(frozen=True)
class Case:
    name: str
    what: str  # the input, in words, for docs/errors.md
    args: tuple[str, ...]
    pattern: str  # regex the one stderr line must contain (tmp paths shown as <tmp>)
    app: str = "train_main"
    exit_code: int = 2
    small: bool = True
    needs_run: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def message(self) -> re.Pattern:
        return re.compile(self.pattern)


def train(name, what, args, pattern, **kw) -> Case:
    run_dir = () if any(a.startswith("run.dir=") for a in args) else ("run.dir={tmp}/new_run",)
    return Case(name, what, tuple(args) + run_dir, pattern, **kw)


def evaluation(name, what, args, pattern, **kw) -> Case:
    return Case(name, what, tuple(args) + ("logger=none",), pattern, app="eval_main", small=False, **kw)


def runs(name, what, args, pattern, **kw) -> Case:
    return Case(name, what, tuple(args), pattern, app="runs_main", small=False, **kw)


CASES = [
    train("unknown_size", "a size preset that does not exist", ["size=huge"], r"Could not find 'size/huge'; available size options: 1b, "),
    train("unknown_model", "a model preset that does not exist", ["model=gpt5"], r"Could not find 'model/gpt5'"),
    train("unknown_key", "a top-level key that is not in the schema", ["foo=1"], r"Could not override 'foo'; Key 'foo' not in 'TrainConfig'"),
    train("unknown_model_key", "a misspelt model field", ["model.dmodel=64"], r"Key 'dmodel' not in 'ModelConfig'"),
    train("added_unread_key", "an added key no schema field reads", ["+model.foo=1"], r"model.foo is not a setting: no field of the schema reads it"),
    train("added_unread_group", "an added group that does not exist", ["+mesh.fsdp=2", "+mesh.tensor=2"], r"mesh.fsdp \(nor mesh.tensor\) is not a setting"),
    train("wrong_type", "a string where an integer belongs", ["run.batch_size=abc"], r"Value 'abc' of type 'str' could not be converted to Integer"),
    train("mlm_on_decoder", "MLM paired with decoder-only", ["objective=mlm"], r"objective 'mlm' trains encoder_only models, not decoder_only"),
    train("clm_on_encoder", "causal LM paired with encoder-only", ["model=encoder_only"], r"objective 'clm' trains decoder_only models, not encoder_only"),
    train("span_on_decoder", "span corruption paired with decoder-only", ["objective=span_corruption"], r"objective 'span_corruption' trains encoder_decoder models, not decoder_only"),
    train("seq_over_table", "sequence longer than the position table", ["data.seq_len=64", "model.max_seq_len=32"], r"data.seq_len 64 is longer than the position table \(model.max_seq_len=32\)"),
    train("heads_not_divisible", "d_model not divisible by n_heads", ["model.d_model=30", "model.n_heads=4"], r"d_model 30 is not divisible by n_heads 4"),
    train("kv_heads_not_divisible", "n_heads not divisible by n_kv_heads", ["model.n_kv_heads=3"], r"n_heads 2 is not divisible by n_kv_heads 3"),
    train("vocab_too_small_for_sentinels", "T5 span corruption with too small a vocabulary", ["experiment=t5_span_corruption", "data.vocab_size=100"], r"vocab_size 100 is too small for 6 special tokens, 100 sentinels"),
    train("vocab_too_small_for_bpe", "a BPE vocabulary below bytes + specials + sentinels", ["data.vocab_size=300"], r"vocab_size 300"),
    train("budget_below_one_batch", "a token budget smaller than one batch", ["run.tokens=10"], r"token budget 10 is smaller than one batch \(4 rows x 32 tokens = 128\)"),
    train("accum_not_dividing_batch", "batch not divisible into micro-batches", ["optimizer.grad_accum_steps=3"], r"run.batch_size 4 is not divisible by optimizer.grad_accum_steps 3"),
    train("unknown_schedule", "an unknown learning-rate schedule", ["optimizer.schedule=exp"], r"optimizer.schedule='exp' is not one of cosine, linear, constant, wsd"),
    train("cooldown_fraction_over_one", "a WSD cooldown longer than the run", ["optimizer.schedule=wsd", "optimizer.cooldown_fraction=1.5"], r"optimizer.cooldown_fraction must be in \(0, 1\], got 1.5"),
    train("unknown_cooldown_shape", "an unknown WSD cooldown shape", ["optimizer.schedule=wsd", "optimizer.cooldown_shape=exp"], r"optimizer.cooldown_shape='exp' is not one of linear, cosine, 1-sqrt"),
    train("branches_unsorted", "cooldown branches out of order", ["optimizer.schedule=wsd", "optimizer.warmup_tokens=256", "run.tokens=6400", "run.branches=[3200,1600]"], r"run.branches must be strictly increasing, got \[3200.0, 1600.0\]"),
    train("branch_beyond_budget", "a branch beyond the trunk's budget", ["optimizer.schedule=wsd", "optimizer.warmup_tokens=256", "run.tokens=6400", "run.branches=[1600,12800]"], r"run.branches: 12800 is beyond the trunk's budget run.tokens=6400"),
    train("branch_inside_warmup", "a branch shorter than the warmup", ["optimizer.schedule=wsd", "optimizer.warmup_tokens=512", "run.tokens=6400", "run.branches=[256,1600]"], r"the branch at 256 \(2 updates\) is shorter than the warmup \(4 updates\)"),
    train("branch_cooldowns_overlap", "two branches whose cooldowns overlap", ["optimizer.schedule=wsd", "optimizer.warmup_tokens=256", "run.tokens=6400", "run.branches=[1600,1700]"], r"the cooldowns of 1600 \(updates 10-13\) and 1700 \(from update 11\) overlap"),
    train("branches_without_wsd", "cooldown branches on a cosine schedule", ["optimizer.warmup_tokens=256", "run.tokens=6400", "run.branches=[1600]"], r"run.branches needs optimizer.schedule=wsd \(a constant-rate trunk\), not cosine"),
    train("branches_without_budget", "cooldown branches with the budget given in steps", ["optimizer.schedule=wsd", "optimizer.warmup_tokens=256", "run.branches=[1600]"], r"run.branches are budgets in run.flops's or run.tokens's unit"),
    train("negative_lr", "a negative learning rate", ["optimizer.lr=-1"], r"optimizer.lr must be positive, got -1"),
    train("unknown_nonfinite_policy", "an unknown non-finite policy", ["run.on_nonfinite=ignore"], r"run.on_nonfinite='ignore' is not one of stop, skip"),
    train("zero_max_skips", "stopping after 0 skipped updates in a row", ["run.max_skips_in_a_row=0"], r"run.max_skips_in_a_row must be at least 1, got 0$"),
    train("zero_online_timeout", "a W&B online start allowed 0 seconds", ["logger.online_timeout=0"], r"logger.online_timeout must be positive, got 0.0$"),
    train("nan_online_timeout", "a W&B online timeout of nan", ["logger.online_timeout=nan"], r"logger.online_timeout must be finite, got nan$"),
    train("restart_not_bool", "run.restart given a word that is not a boolean", ["run.restart=maybe"], r"Value 'maybe' is not a valid bool"),
    train("negative_keep_set_aside", "a negative number of set-aside checkpoint directories to keep", ["run.keep_set_aside=-1"], r"run.keep_set_aside must be at least 0, got -1$"),
    train("unknown_logger", "an unknown logger backend", ["logger.backend=tensorboard"], r"logger.backend='tensorboard' is not one of wandb, none"),
    train("unknown_source", "an unknown data source", ["data.source=s3"], r"unknown data source 's3'; choose one of shakespeare, files, hf"),
    train("bad_source_option", "an option the source does not take", ["+data.options.colour=red"], r"bad options for data source 'shakespeare'"),
    train("bad_objective_option", "an objective option out of range", ["experiment=bert_mlm", "objective.options.mask_rate=2"], r"mask_rate"),
    train("files_without_glob", "data=files without a train glob", ["data=files"], r"Missing mandatory value: train; at data.options.train"),
    train("missing_corpus", "a glob that matches no file", ["data=files", "data.options.train={tmp}/nothing/*.txt"], r"<tmp>/nothing/\*\.txt"),
    train("empty_corpus", "files that hold no text", ["data=files", "data.options.train={corpus}/empty/*.txt"], r"(?i)empty|no text|no documents"),
    train("not_utf8", "a file that is not UTF-8", ["data=files", "data.options.train={corpus}/latin1/*.txt"], r"<tmp>/corpus/latin1/b\.txt.*is not UTF-8: byte 0xe9 at byte offset 30"),
    train("resume_other_config", "a run directory that holds a different run", ["run.dir={run}", "model.d_model=32"], r"holds a different run \(model.d_model: saved 16, now 32\)", needs_run=True),
    train("resume_corrupt_checkpoint", "resuming a run whose only checkpoint has truncated array files", ["run.dir={run}"], r"^archlab-train: error: no usable checkpoint in <tmp>/run/checkpoints \(step 2: .*ValueError: ", needs_run=True, extra={"truncate_arrays": True}),
    # Values that used to pass validation but cannot work (issue 18): refused at composition.
    *[train(f"{value}_{key.split('.')[1]}", f"{'NaN' if value == 'nan' else 'infinity'} for {key}", [f"{key}={value}"],
            rf"{re.escape(key)} must be finite, got {value}")
      for key in ("optimizer.lr", "optimizer.b1", "optimizer.weight_decay", "optimizer.eps", "model.init_std")
      for value in ("nan", "inf")],
    train("negative_norm_eps", "a negative norm epsilon", ["model.norm_eps=-1"], r"model.norm_eps must be positive, got -1.0"),
    train("negative_final_lr_fraction", "a final learning rate below zero (gradient ascent)", ["optimizer.final_lr_fraction=-1"], r"optimizer.final_lr_fraction must be in \[0, 1\], got -1.0"),
    train("negative_grad_clip", "a negative gradient clip", ["optimizer.grad_clip=-1"], r"optimizer.grad_clip must be at least 0, got -1.0"),
    train("negative_warmup_tokens", "a negative warmup length", ["optimizer.warmup_tokens=-100"], r"optimizer.warmup_tokens must be at least 0, got -100"),
    train("beta2_above_one", "an Adam beta2 above 1", ["optimizer.b2=2"], r"optimizer.b2 must be in \[0, 1\), got 2.0"),
    train("zero_stop_at_step", "stopping at step 0", ["run.stop_at_step=0"], r"run.stop_at_step must be at least 1, got 0"),
    train("nan_flops", "a NaN compute budget", ["run.flops=nan"], r"run.flops must be finite, got nan"),
    train("inf_flops", "an infinite compute budget", ["run.flops=inf"], r"run.flops must be finite, got inf"),
    train("inf_tokens_per_param", "an infinite tokens-per-parameter budget", ["run.tokens_per_param=inf"], r"run.tokens_per_param must be finite, got inf"),
    train("negative_seed", "a negative seed", ["run.seed=-1"], r"run.seed must be in \[0, 4294967296\), got -1"),
    train("zero_seq_len", "a sequence length of 0 (named as data's, not the model's interpolated copy)", ["data.seq_len=0"], r"data.seq_len must be at least 2, got 0"),
    train("zero_vocab_size", "a vocabulary of 0 (named as data's, not the model's interpolated copy)", ["data.vocab_size=0"], r"data.vocab_size must be positive, got 0"),
    train("run_name_escapes", "a run name that climbs out of runs/ (no run.dir: Hydra's own run directory)", ["run.dir=null", "run.name=../../escaped"], r"run.name must be a plain name \(printable, no path separators, not empty, '.' or '..'\), got '../../escaped'$"),
    train("zero_head_dim", "a head width of 0", ["model.head_dim=0"], r"model.head_dim must be positive, got 0"),
    train("zero_kv_heads", "0 key/value heads", ["model.n_kv_heads=0"], r"model.n_kv_heads must be positive, got 0"),
    train("zero_logits_pad_multiple", "a logits padding multiple of 0", ["model.logits_pad_multiple=0"], r"model.logits_pad_multiple must be positive, got 0"),
    train("zero_rope_theta", "a RoPE base of 0", ["model.position=rope", "model.rope_theta=0"], r"model.rope_theta must be positive, got 0.0"),
    train("negative_type_vocab_size", "a negative token-type vocabulary", ["model.type_vocab_size=-1"], r"model.type_vocab_size must be at least 0, got -1"),
    train("relative_buckets_too_few", "T5 relative positions with 2 buckets (none exact per direction)", ["model=t5", "objective=span_corruption", "model.relative_buckets=2"], r"model.relative_buckets must be at least 4 for bidirectional attention, got 2"),
    train("relative_distance_inside_exact", "a T5 relative max distance inside the exactly bucketed range", ["model=t5", "objective=span_corruption", "model.relative_max_distance=16"], r"model.relative_max_distance must exceed the 16 distances bucketed exactly \(relative_buckets=32\), got 16"),
    train("huge_d_model", "a model that cannot fit in memory (d_model 10,000,000)", ["model.d_model=10000000", "model.n_heads=2"], r"this run needs at least [\d,.]+ GiB \([\d,.]+ GiB of parameters, gradients and Adam moments .* but the .* memory is [\d,.]+ GiB"),
    train("huge_batch", "a batch whose activations cannot fit (10,000,000 rows)", ["run.batch_size=10000000", "run.steps=1"], r"this run needs at least [\d,.]+ GiB .*activations for 10000000 rows of 32\) but the .* memory is"),
    train("huge_seq_len", "a sequence of 1,000,000 tokens (its attention probabilities alone exceed memory)", ["data.seq_len=1000000"], r"this run needs at least [\d,.]+ GiB .* rows of 1000000\) but the .* memory is"),
    train("huge_n_layers", "100,000,000 layers", ["model.n_layers=100000000"], r"this run needs at least [\d,.]+ GiB .* but the .* memory is"),
    evaluation("eval_missing_dir", "archlab-eval on a path that does not exist", ["checkpoint={tmp}/nope"], r"no such directory: <tmp>/nope"),
    evaluation("eval_no_checkpoints", "archlab-eval on a directory without checkpoints", ["checkpoint={corpus}"], r"no checkpoints in <tmp>/corpus"),
    evaluation("eval_family_mismatch", "archlab-eval on a checkpoint of another family than requested", ["checkpoint={run}", "expect_family=encoder_only"], r"holds a decoder_only model, not the requested encoder_only", needs_run=True),
    evaluation("eval_corrupt_checkpoint", "archlab-eval on a run whose only checkpoint has truncated array files", ["checkpoint={run}"], r"^archlab-eval: error: .*checkpoint.* <tmp>/run/checkpoints", needs_run=True, extra={"truncate_arrays": True}),
    evaluation("eval_no_checkpoint_arg", "archlab-eval without checkpoint=", [], r"(?i)missing mandatory value: checkpoint"),
    evaluation("eval_unknown_key", "archlab-eval with a key it does not know", ["foo=1"], r"Could not override 'foo'; Key 'foo' not in 'EvalConfig'"),
    evaluation("eval_zero_batches", "archlab-eval with 0 batches", ["checkpoint={run}", "batches=0"], r"batches must be at least 1, got 0$", needs_run=True),
    evaluation("eval_zero_batch_size", "archlab-eval with a batch size of 0", ["checkpoint={run}", "batch_size=0"], r"batch_size must be at least 1, got 0$", needs_run=True),
    evaluation("eval_negative_max_new_tokens", "archlab-eval generating -5 tokens", ["checkpoint={run}", "max_new_tokens=-5"], r"max_new_tokens must be at least 1, got -5$", needs_run=True),
    evaluation("eval_negative_samples", "archlab-eval printing -1 samples", ["checkpoint={run}", "samples=-1"], r"samples must be at least 0, got -1$", needs_run=True),
    evaluation("eval_negative_step", "archlab-eval of step -1", ["checkpoint={run}", "step=-1"], r"step must be at least 0, got -1$", needs_run=True),
    evaluation("eval_added_unread_key", "archlab-eval given a prompt key it does not have", ["checkpoint={run}", "+prompt=Hello"], r"prompt is not a setting: no field of the schema reads it", needs_run=True),
    evaluation("eval_unknown_family", "archlab-eval expecting a family that does not exist", ["checkpoint={run}", "expect_family=gpt"], r"expect_family='gpt' is not one of encoder_only, decoder_only, encoder_decoder", needs_run=True),
    runs("runs_missing_dir", "archlab-runs of a directory that does not exist", ["{tmp}/absent"], r"no such directory: <tmp>/absent$"),
    runs("runs_several_without_csv", "archlab-runs of two directories without --csv", ["{tmp}", "{tmp}/corpus"], r"several directories need --csv PATH"),
    runs("runs_no_runs", "archlab-runs of a directory holding no run", ["{tmp}"], r"no runs \(no config.yaml\) under <tmp>$"),
]


def make_corpus(root: Path) -> None:
    (root / "good").mkdir(parents=True)
    for i in range(4):
        (root / "good" / f"doc{i}.txt").write_text(f"Document {i}. " + "All the world's a stage. " * 40)
    (root / "empty").mkdir()
    for i in range(2):
        (root / "empty" / f"e{i}.txt").write_text("")
    (root / "latin1").mkdir()
    (root / "latin1" / "a.txt").write_text("A perfectly good document. " * 20)
    (root / "latin1" / "b.txt").write_bytes("Twenty-seven bytes precede ".encode() + "caf\xe9".encode("latin-1"))


def materialise(case: Case, tmp: Path, cache_dir: Path, prepared_run: Path | None) -> list[str]:
    """Create the case's files under ``tmp`` and return its command-line arguments."""
    make_corpus(tmp / "corpus")
    run = tmp / "run"
    if case.needs_run:
        shutil.copytree(prepared_run, run)
    if case.extra.get("truncate_arrays"):
        for array_file in sorted(run.glob("checkpoints/*/state/d/*")):
            array_file.write_bytes(array_file.read_bytes()[: array_file.stat().st_size // 2])
    args = [a.format(tmp=tmp, corpus=tmp / "corpus", run=run) for a in case.args]
    small = [s for s in SMALL if s.split("=")[0] not in {a.lstrip("+").split("=")[0] for a in args}]
    cache = [f"data.cache_dir={cache_dir}"] if case.app == "train_main" else []
    return [*(small if case.small else []), *cache, *args]


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` with a hash of its bytes (directories included, as empty entries).

    A run directory's ``.lock`` only holds the pid of the last process that held the lock, so
    only its presence counts.
    """
    state = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.name == ".lock" and path.is_file():
            state[key] = "lock"
        else:
            state[key] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return state


def catalogue_rows() -> list[str]:
    """The start of each case's row in docs/errors.md."""
    return [f"| `{c.name}` | {c.what} |" for c in CASES]
