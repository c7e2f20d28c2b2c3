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


def generation(name, what, args, pattern, **kw) -> Case:
    return Case(name, what, tuple(args), pattern, app="generate_main", small=False, **kw)


def exporting(name, what, args, pattern, **kw) -> Case:
    return Case(name, what, tuple(args), pattern, app="export_main", small=False, **kw)


def runs(name, what, args, pattern, **kw) -> Case:
    return Case(name, what, tuple(args), pattern, app="runs_main", small=False, **kw)


CASES = [
    train("unknown_size", "a size preset that does not exist", ["size=huge"], r"Could not find 'size/huge'; available size options: 1b, "),
    train("unknown_model", "a model preset that does not exist", ["model=gpt5"], r"Could not find 'model/gpt5'"),
    train("unknown_key", "a top-level key that is not in the schema", ["foo=1"], r"Could not override 'foo'; Key 'foo' not in 'TrainConfig'"),
    train("unknown_model_key", "a misspelt model field", ["model.dmodel=64"], r"Key 'dmodel' not in 'ModelConfig'"),
    train("added_unread_key", "an added key no schema field reads", ["+model.foo=1"], r"model.foo is not a setting: no field of the schema reads it"),
    train("added_unread_group", "an added group that does not exist", ["+cluster.nodes=2", "+cluster.gpus=2"], r"cluster.nodes \(nor cluster.gpus\) is not a setting"),
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
    train("unknown_wandb_console", "a W&B console capture mode that does not exist", ["logger.console=tee"], r"logger.console='tee' is not one of off, wrap, redirect, auto$"),
    train("empty_wandb_dir", "an empty W&B folder", ["logger.dir=''"], r"logger.dir must be a folder, got an empty string \(null: runs/<experiment>/\)$"),
    train("system_metrics_not_bool", "logger.system_metrics given a word that is not a boolean", ["logger.system_metrics=sometimes"], r"Value 'sometimes' is not a valid bool"),
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
    train("mesh_not_matching_devices", "a mesh of 2 devices on a machine with 1", ["mesh.data=2"], r"mesh.data x mesh.fsdp x mesh.tensor = 2 x 1 x 1 = 2 devices, but there are 1; set one of them to -1 to take the rest$"),
    train("mesh_two_rests", "two mesh axes both asking for the rest of the devices", ["mesh.fsdp=-1"], r"only one of mesh.data, mesh.fsdp, mesh.tensor can be -1 \(the rest\), got mesh.data and mesh.fsdp$"),
    train("mesh_zero_axis", "a mesh axis of 0 devices", ["mesh.tensor=0"], r"mesh.tensor must be a positive number of devices or -1 \(the rest\), got 0$"),
    train("mesh_rest_not_dividing", "mesh.fsdp not dividing the devices the rest is taken from", ["mesh.fsdp=3"], r"mesh.fsdp x mesh.tensor = 3 does not divide the 1 devices \(mesh.data=-1 takes the rest\)$"),
    train("mesh_heads_not_divisible", "attention heads that tensor parallelism cannot split (2 heads over mesh.tensor=4)", ["mesh.data=1", "mesh.tensor=4"], r"model.n_heads 2 is not divisible by mesh.tensor = 4 \(mesh.rules.heads\); change the mesh or set mesh.rules.heads=null$"),
    train("mesh_dimension_not_divisible", "an MLP width that tensor parallelism cannot split (d_ff 66 over mesh.tensor=4)", ["model.n_heads=4", "model.d_ff=66", "mesh.data=1", "mesh.tensor=4"], r"layers.blocks.mlp.wi.bias dimension 1 \(mlp, 66\) is not divisible by mesh.tensor = 4 \(mesh.rules.mlp\); change the mesh or set mesh.rules.mlp=null$"),
    train("mesh_batch_not_divisible", "a batch that does not split over mesh.data x mesh.fsdp", ["mesh.data=1", "mesh.fsdp=3"], r"run.batch_size 4 does not split over mesh.data x mesh.fsdp = 3 devices \(mesh.rules.batch\)$"),
    train("mesh_rule_unknown_axis", "a logical axis mapped to a mesh axis that does not exist", ["mesh.rules.vocab=model"], r"mesh.rules.vocab='model' must name distinct mesh axes \(data, fsdp, tensor\), or be null$"),
    train("mesh_rule_unknown_name", "a rule for a logical axis that does not exist", ["+mesh.rules.hidden=tensor"], r"mesh.rules.hidden is not a logical axis; the logical axes are batch, length, "),
    train("distributed_partial_keys", "a coordinator address without the process count and rank", ["distributed.coordinator_address=localhost:12355"], r"distributed.coordinator_address is set without distributed.num_processes: a multi-process run needs coordinator_address, num_processes and process_id together$"),
    train("distributed_bad_address", "a coordinator address without a port", ["distributed.coordinator_address=node001", "distributed.num_processes=2", "distributed.process_id=0"], r"distributed.coordinator_address must be host:port \(e.g. localhost:12355\), got 'node001'$"),
    train("distributed_rank_out_of_range", "a process rank outside 0 .. num_processes - 1", ["distributed.coordinator_address=localhost:12355", "distributed.num_processes=2", "distributed.process_id=2"], r"distributed.process_id must be in 0 .. 1 \(distributed.num_processes=2\), got 2$"),
    train("distributed_unknown_cluster", "a cluster kind archlab does not know", ["distributed.cluster=mpi"], r"distributed.cluster must be one of auto, slurm, none, got 'mpi'$"),
    train("distributed_slurm_outside_slurm", "distributed.cluster=slurm outside a SLURM job step", ["distributed.cluster=slurm"], r"distributed.cluster=slurm but SLURM_[A-Z_]+ is not set: run archlab-train inside a SLURM job step \(srun, or -m hydra/launcher=slurm_multinode\)$"),
    train("distributed_members", "packed members (run.members) in a multi-process run", ["optimizer.schedule=wsd", "run.members=[{{seed:1}},{{seed:2}}]", "distributed.coordinator_address=localhost:12355", "distributed.num_processes=2", "distributed.process_id=0"], r"run.members runs in one process"),
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
    generation("generate_no_checkpoint_arg", "archlab-generate without checkpoint=", [], r"(?i)missing mandatory value: checkpoint"),
    generation("generate_missing_prompts_file", "archlab-generate reading prompts from a file that does not exist", ["checkpoint={run}", "prompts_file={tmp}/absent.txt"], r"prompts_file=<tmp>/absent.txt: no such file$", needs_run=True),
    generation("generate_blank_prompts_file", "archlab-generate reading prompts from a file of blank lines", ["checkpoint={run}", "prompts_file={corpus}/empty/e0.txt"], r"prompts_file=<tmp>/corpus/empty/e0.txt holds no prompt \(every line is blank\)$", needs_run=True),
    generation("generate_prompts_file_not_utf8", "archlab-generate reading prompts from a file that is not UTF-8", ["checkpoint={run}", "prompts_file={corpus}/latin1/b.txt"], r"prompts_file=<tmp>/corpus/latin1/b.txt is not UTF-8: byte 0xe9 at byte offset 30$", needs_run=True),
    generation("generate_prompts_and_file", "archlab-generate given prompts and a prompts file", ["checkpoint={run}", "prompts=[Hello]", "prompts_file={corpus}/good/doc0.txt"], r"give prompts or prompts_file, not both$", needs_run=True),
    generation("generate_greedy_samples", "archlab-generate asked for 3 greedy samples per prompt (all identical)", ["checkpoint={run}", "num_samples=3"], r"num_samples=3 needs temperature > 0: greedy decoding \(temperature=0\) gives the same continuation every time$", needs_run=True),
    generation("generate_zero_top_p", "archlab-generate with a nucleus of probability 0", ["checkpoint={run}", "temperature=1", "top_p=0"], r"top_p must be in \(0, 1\], got 0.0$", needs_run=True),
    generation("generate_unknown_cache_dtype", "archlab-generate with a KV-cache dtype that does not exist", ["checkpoint={run}", "kv_cache_dtype=int4"], r"kv_cache_dtype='int4' is not one of null, auto, bfloat16, float32, int8$", needs_run=True),
    generation("generate_output_exists", "archlab-generate writing its results over an existing file", ["checkpoint={run}", "output={run}/config.yaml"], r"output=<tmp>/run/config.yaml already exists; archlab-generate never overwrites a file$", needs_run=True),
    generation("generate_sweep_dir", "archlab-generate given a directory holding two runs", ["checkpoint={tmp}"], r"checkpoint=<tmp> holds 2 runs \(a sweep directory\); archlab-generate reads one run: name its directory, e\.g\. checkpoint=<tmp>/run$", needs_run=True, extra={"second_run": True}),
    generation("generate_past_position_table", "archlab-generate writing past a learned position table", ["checkpoint={run}", "prompts=[Hello]", "max_new_tokens=100"], r"longest prompt \(\d+\) \+ max_new_tokens \(100\) = \d+ exceeds the learned position table \(model.max_seq_len=32\)$", needs_run=True),
    exporting("export_no_out", "archlab-export without out=", ["checkpoint={run}"], r"(?i)missing mandatory value: out", needs_run=True),
    exporting("export_out_not_empty", "archlab-export into a directory that holds files", ["checkpoint={run}", "out={run}"], r"out=<tmp>/run already exists and is not an empty directory; nothing is overwritten$", needs_run=True),
    exporting("export_missing_checkpoint", "archlab-export of a directory that does not exist", ["checkpoint={tmp}/absent", "out={tmp}/hf"], r"no such directory: <tmp>/absent$"),
    exporting("export_sweep_dir", "archlab-export of a directory holding two runs", ["checkpoint={tmp}", "out={tmp}/hf"], r"checkpoint=<tmp> holds 2 runs \(a sweep directory\); archlab-export reads one run: name its directory, e\.g\. checkpoint=<tmp>/run$", needs_run=True, extra={"second_run": True}),
    exporting("export_negative_step", "archlab-export of step -1", ["checkpoint={run}", "out={tmp}/hf", "step=-1"], r"step must be at least 0, got -1$", needs_run=True),
    train("dropout_rate_one", "a dropout rate of 1 (every activation dropped)", ["model.residual_dropout=1.0"], r"model.residual_dropout must be in \[0, 1\), got 1.0$"),
    train("attention_dropout_library_kernel", "attention dropout with a kernel that has none", ["model.attention_dropout=0.1", "model.attention_kernel=dot_product_attention"], r"model.attention_dropout needs the xla attention kernel; dot_product_attention has no dropout of its weights$"),
    train("dropout_with_members", "dropout in packed members", ["model.residual_dropout=0.1", "optimizer.schedule=wsd", "run.members=[{{seed:1}},{{seed:2}}]"], r"run.members trains without dropout"),
    train("init_from_missing", "model.init_from a path that does not exist", ["model.init_from={tmp}/absent"], r"model.init_from=<tmp>/absent: no such file or directory$"),
    train("init_from_not_a_model", "model.init_from a folder that is neither a Hugging Face directory nor a run", ["model.init_from={corpus}"], r"model.init_from=<tmp>/corpus is neither a Hugging Face directory \(config.json\) nor an archlab run \(no checkpoints in <tmp>/corpus\)$"),
    train("init_from_other_architecture", "model.init_from a run of another size", ["size=micro", "model.init_from={run}"], r"model.init_from=<tmp>/run holds a different architecture \(this run has d_model=32, head_dim=16, d_ff=128\); to build the source's network add: model.d_model=16 model.head_dim=8 model.d_ff=64$", needs_run=True),
    train("init_from_other_tokenizer", "model.init_from a run, with another tokenizer named", ["model.init_from={run}", "data.tokenizer_file={tmp}/gpt2/tokenizer.json"], r"data.tokenizer_file=<tmp>/gpt2/tokenizer.json is not the tokenizer of model.init_from=<tmp>/run \(<tmp>/run/tokenizer.json\); token ids would not mean what the weights learnt$", needs_run=True, extra={"foreign_tokenizer": True}),
    train("foreign_tokenizer_without_mask", "MLM on a GPT-2-style tokenizer, which has no mask token", ["model=encoder_only", "objective=mlm", "data.tokenizer_file={tmp}/gpt2/tokenizer.json"], r"the tokenizer <tmp>/gpt2/tokenizer.json has no mask token, which objective mlm needs; name one of its special tokens with data.special_tokens.mask=<token>$", extra={"foreign_tokenizer": True}),
    train("foreign_tokenizer_ordinary_role", "a foreign tokenizer's ordinary word named as its eos token", ["data.tokenizer_file={tmp}/gpt2/tokenizer.json", "data.special_tokens.eos=the"], r"'the' is an ordinary token of the tokenizer \(text encodes to it\), so it cannot be the eos token; give a special token$", extra={"foreign_tokenizer": True}),
    train("foreign_tokenizer_unknown_role", "a special-token role that does not exist", ["data.tokenizer_file={tmp}/gpt2/tokenizer.json", "data.special_tokens.end=x"], r"Key 'end' not in 'SpecialTokensConfig'", extra={"foreign_tokenizer": True}),
    runs("runs_missing_dir", "archlab-runs of a directory that does not exist", ["{tmp}/absent"], r"no such directory: <tmp>/absent$"),
    runs("runs_several_without_csv", "archlab-runs of two directories without --csv", ["{tmp}", "{tmp}/corpus"], r"several directories need --csv PATH"),
    runs("runs_no_runs", "archlab-runs of a directory holding no run", ["{tmp}"], r"no runs \(no config.yaml\) under <tmp>$"),
    train("task_without_train_file", "a task run with no training file", ["task=classification"], r"task=classification needs task.train=<file>$"),
    train("task_keys_without_task", "a task file given to a pre-training run", ["task.train={tmp}/task/good.jsonl"], r"task.train and task.validation are read by a task run only"),
    train("task_unknown_label", "a validation row whose label the training file does not have", ["model=encoder_only", "objective=mlm", "task=classification", "task.train={tmp}/task/good.jsonl", "task.validation={tmp}/task/unknown_label.jsonl"], r"unknown_label.jsonl row 2: label 'meh' is not one of neg, pos$", extra={"task_files": True}),
    train("task_missing_field", "a classification file without the text field", ["model=encoder_only", "objective=mlm", "task=classification", "task.train={tmp}/task/good.jsonl", "task.text_field=sentence"], r"good.jsonl has no 'sentence' field \(it has text, label\)$", extra={"task_files": True}),
    train("task_misaligned_tag_line", "a CoNLL line with another number of columns", ["task=tagging", "task.train={tmp}/task/misaligned.txt"], r"misaligned.txt line 3: 2 columns where the file's first token line has 3 \(word ... tag\)$", extra={"task_files": True}),
    train("task_tag_not_iob", "a CoNLL tag outside the IOB scheme", ["task=tagging", "task.train={tmp}/task/not_iob.txt"], r"not_iob.txt line 2: tag 'NP' is not IOB \(O, B-<type>, I-<type>\)$", extra={"task_files": True}),
    train("task_answer_outside_context", "a SQuAD answer whose offset does not hold its text", ["task=qa", "task.train={tmp}/task/outside.json"], r"outside.json question q1: answer 'seven' at offset 40 is not in its context$", extra={"task_files": True}),
    train("task_with_members", "packed members in a task run", ["task=classification", "task.train={tmp}/task/good.jsonl", "optimizer.schedule=wsd", "run.members=[{{seed:1}},{{seed:2}}]"], r"run.members is for pre-training ladders; a task=... run trains one model", extra={"task_files": True}),

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


def write_gpt2_style_tokenizer(path: Path) -> None:
    """A small byte-level BPE whose only special token is GPT-2's <|endoftext|>, on its last id."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(["the cat sat on the mat", "All the world's a stage"] * 20, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    backend.add_special_tokens(["<|endoftext|>"])
    path.parent.mkdir(parents=True)
    backend.save(str(path))


def write_bad_task_files(root: Path) -> None:
    """A good classification file, and one file per refusal of archlab/tasks/data.py."""
    import json

    root.mkdir(parents=True, exist_ok=True)
    rows = [{"text": f"a {word} film", "label": label} for word, label in [("good", "pos"), ("bad", "neg")] * 10]
    (root / "good.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "unknown_label.jsonl").write_text(json.dumps(rows[0]) + "\n" + json.dumps({"text": "so so", "label": "meh"}) + "\n")
    (root / "misaligned.txt").write_text("the DT B-NP\ndog NN I-NP\nbarks B-VP\n")
    (root / "not_iob.txt").write_text("the DT B-NP\ndog NN NP\n")
    context = "the dog barks at seven in the morning"
    squad = {"data": [{"paragraphs": [{"context": context, "qas": [
        {"id": "q1", "question": "when?", "answers": [{"text": "seven", "answer_start": 40}]}]}]}]}
    (root / "outside.json").write_text(json.dumps(squad))


def materialise(case: Case, tmp: Path, cache_dir: Path, prepared_run: Path | None) -> list[str]:
    """Create the case's files under ``tmp`` and return its command-line arguments."""
    make_corpus(tmp / "corpus")
    run = tmp / "run"
    if case.needs_run:
        shutil.copytree(prepared_run, run)
    if case.extra.get("second_run"):
        shutil.copytree(prepared_run, tmp / "run2")
    if case.extra.get("task_files"):
        write_bad_task_files(tmp / "task")
    if case.extra.get("foreign_tokenizer"):
        write_gpt2_style_tokenizer(tmp / "gpt2" / "tokenizer.json")
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
