"""The scaling study's machinery: sweep presets, compute budgets, records, the continuation
metric, and the analysis command end to end (on a synthetic results table)."""

import importlib.util
import itertools
import math

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from archlab.errors import ConfigError
from conftest import CONF_DIR, REPO, compose_train

PRESETS = sorted(p.stem for p in (CONF_DIR / "sweep").glob("*.yaml"))
MAX_EPOCHS = 4.0


def sweep_combinations(preset: str) -> list[list[str]]:
    """Every override list the preset's ``hydra.sweeper.params`` expands to (a cartesian product)."""
    from archlab.cli import prepare_hydra

    prepare_hydra()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"sweep={preset}"], return_hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.sweeper.params) or {}
    keys = sorted(params)
    values = [str(params[k]).split(",") for k in keys]
    return [[f"{k}={v}" for k, v in zip(keys, combo)] for combo in itertools.product(*values)]


@pytest.fixture(scope="module")
def corpus_tokens(cache_dir):
    """Training tokens of each data config a preset uses (the real corpus, tokenized once)."""
    from archlab.train.setup import load_corpus, row_length_for

    cache = {}

    def tokens(cfg):
        key = (cfg.data.source, str(dict(cfg.data.options)), cfg.data.vocab_size, row_length_for(cfg))
        if key not in cache:
            corpus = load_corpus(cfg.data, row_length_for(cfg))
            cache[key] = (corpus.train.n_tokens, corpus.tokenizer.vocab_size)
        return cache[key]

    return tokens


@pytest.mark.parametrize("preset", PRESETS)
def test_every_sweep_combination_composes_and_fits_the_corpus(preset, cache_dir, corpus_tokens):
    from archlab.train.setup import make_plan

    combos = sweep_combinations(preset)
    assert combos, f"{preset} sweeps nothing"
    # Composing costs ~0.5 s: the first and last combinations, plus every combination at the
    # largest value of each swept number (the most tokens: what the epoch limit is about).
    largest = {}
    for combo in combos:
        for item in combo:
            key, value = item.split("=", 1)
            try:
                largest[key] = max(largest.get(key, float("-inf")), float(value))
            except ValueError:
                pass
    at_max = [c for c in combos if all(float(i.split("=", 1)[1]) == largest[i.split("=", 1)[0]]
                                       for i in c if i.split("=", 1)[0] in largest)]
    checked = [combos[0], *[c for c in at_max if c not in (combos[0], combos[-1])], combos[-1]]
    names = set()
    for combo in checked:
        cfg = compose_train([f"sweep={preset}", *combo], cache_dir, shrink=False)
        train_tokens, vocab = corpus_tokens(cfg)
        plan = make_plan(cfg, vocab)
        epochs = plan.total_steps * plan.tokens_per_step / train_tokens
        assert epochs <= MAX_EPOCHS, f"{preset} {combo}: {epochs:.2f} epochs of the corpus"
        assert plan.total_steps >= 2, f"{preset} {combo}: {plan.total_steps} steps"
        names.add(cfg.run.name)
    assert len(names) == len(checked), f"{preset}: runs of one sweep share a run directory"


def test_scaling_ladder_spans_thirty_times_in_parameters(cache_dir, corpus_tokens):
    from archlab.train.setup import make_plan

    combos = sweep_combinations("scaling_decoder")
    sizes = {c[1] for c in combos}
    budgets = {c[0] for c in combos}
    assert len(sizes) >= 6 and len(budgets) >= 3
    params = []
    for size in sizes:
        cfg = compose_train(["sweep=scaling_decoder", size], cache_dir, shrink=False)
        assert cfg.model.n_layers >= 2
        params.append(make_plan(cfg, corpus_tokens(cfg)[1]).params.total)
    assert max(params) / min(params) >= 30


@pytest.mark.parametrize("family,objective", [("decoder_only", "clm"), ("encoder_decoder", "span_corruption"),
                                              ("encoder_only", "mlm")])
def test_flops_budget_sets_the_token_budget(family, objective, cache_dir):
    from archlab.train.setup import make_plan

    cfg = compose_train([f"model={family}", f"objective={objective}", "run.flops=3e9"], cache_dir)
    plan = make_plan(cfg, 512)
    per_token = plan.flops.train / plan.row_length
    assert plan.token_budget == int(3e9 / per_token)
    realised = plan.derived()["train_flops_total"]
    assert 3e9 <= realised < 3e9 + plan.train_flops_per_step
    # run.flops wins over the other budget fields
    cfg2 = compose_train([f"model={family}", f"objective={objective}", "run.flops=3e9", "run.tokens=999999"],
                            cache_dir)
    assert make_plan(cfg2, 512).token_budget == plan.token_budget


def test_flops_budget_below_one_batch_is_refused(cache_dir):
    from archlab.train.setup import make_plan

    cfg = compose_train(["run.flops=1000"], cache_dir)
    with pytest.raises(ConfigError, match="run.flops=1e\\+03 buys 0 tokens, less than one batch"):
        make_plan(cfg, 512)
    with pytest.raises(ConfigError, match="run.flops must be positive"):
        compose_train(["run.flops=-1"], cache_dir)


def test_continuation_windows_are_fixed_and_inside_documents(prepared_run):
    from archlab.data.tokenizer import Tokenizer
    from archlab.scaling.continuation import continuation_windows

    tokenizer = Tokenizer.from_file(prepared_run / "tokenizer.json")
    docs = ["the quick brown fox jumps over the lazy dog " * 20, "to be or not to be " * 30]
    w1 = continuation_windows(docs, tokenizer, n_windows=8, prefix_tokens=6, continuation_tokens=4)
    w2 = continuation_windows(docs, tokenizer, n_windows=8, prefix_tokens=6, continuation_tokens=4)
    assert w1.tokens_WT.shape == (8, 10) and np.array_equal(w1.tokens_WT, w2.tokens_WT)
    encoded = [tokenizer.encode(d) for d in docs]
    for row in w1.tokens_WT:  # every window is a contiguous slice of one document
        assert any(any(list(row) == ids[s:s + 10] for s in range(len(ids) - 9)) for ids in encoded)
    assert w1.n_bytes == sum(len(tokenizer.decode(r[6:]).encode()) for r in w1.tokens_WT)
    with pytest.raises(ConfigError, match="fewer than"):
        continuation_windows(docs[:1], tokenizer, n_windows=10_000, prefix_tokens=6, continuation_tokens=4)


def test_decoder_continuation_counts_only_the_continuation(prepared_run):
    import jax
    import jax.numpy as jnp

    from archlab.scaling.continuation import ContinuationWindows, continuation_nll, load_final_model

    model, tokenizer, cfg, _ = load_final_model(prepared_run)
    rng = np.random.default_rng(0)
    tokens = rng.integers(10, tokenizer.vocab_size - 200, size=(3, 12)).astype(np.int32)
    windows = ContinuationWindows(tokens, prefix_tokens=8, continuation_tokens=4, n_bytes=1)
    logp = jax.nn.log_softmax(model(jnp.asarray(tokens[:, :-1])), axis=-1)
    expected = -sum(float(logp[b, t - 1, tokens[b, t]]) for b in range(3) for t in range(8, 12))
    assert continuation_nll(model, windows, batch_size=2) == pytest.approx(expected, rel=1e-5)
    # changing a continuation token changes the score; changing nothing else outside the window can
    changed = tokens.copy()
    changed[:, -1] += 1
    other = ContinuationWindows(changed, prefix_tokens=8, continuation_tokens=4, n_bytes=1)
    assert continuation_nll(model, other) != pytest.approx(expected, rel=1e-7)


def test_continuation_bpb_of_a_trained_run(prepared_run):
    from archlab.scaling.continuation import run_continuation_bpb

    docs = ["Now is the winter of our discontent made glorious summer by this sun of York. " * 40]
    score = run_continuation_bpb(prepared_run, n_windows=8, prefix_tokens=16, continuation_tokens=8, documents=docs)
    assert score is not None and 0 < score.bits_per_byte < 20 and score.n_tokens == 64
    with pytest.raises(ConfigError, match="does not fit"):
        run_continuation_bpb(prepared_run, prefix_tokens=30, continuation_tokens=8, documents=docs)


def test_encoder_decoder_continuation_and_encoder_only_refusal(tmp_path, train_run):
    from flax import nnx

    from archlab.config import ModelConfig
    from archlab.nn.models import build_model
    from archlab.scaling.continuation import ContinuationWindows, continuation_nll, run_continuation_bpb

    run = tmp_path / "t5"
    train_run(run, "model=encoder_decoder", "objective=span_corruption")
    docs = ["All the world's a stage, and all the men and women merely players. " * 40]
    score = run_continuation_bpb(run, n_windows=4, prefix_tokens=16, continuation_tokens=4, documents=docs)
    assert score is not None and math.isfinite(score.bits_per_byte) and score.bits_per_byte > 0
    with pytest.raises(ConfigError, match="does not fit"):
        run_continuation_bpb(run, n_windows=4, prefix_tokens=16, continuation_tokens=20, documents=docs)
    bert = build_model(ModelConfig(family="encoder_only", vocab_size=512, d_model=16, n_layers=2, n_heads=2,
                                   d_ff=32, max_seq_len=32))
    windows = ContinuationWindows(np.ones((1, 8), np.int32), 4, 4, 1)
    with pytest.raises(ConfigError, match="no left-to-right distribution"):
        continuation_nll(bert, windows)
    del nnx


def test_read_run_record(prepared_run):
    from archlab.scaling.records import find_run_dirs, read_run

    assert find_run_dirs([prepared_run.parent]) == [prepared_run]
    rec = read_run(prepared_run, continuation=False)
    assert rec["family"] == "decoder_only" and rec["seed"] == 0
    assert rec["C_total"] == pytest.approx(rec["flops_per_token"] * rec["tokens"], rel=1e-9)
    assert rec["C_non_embedding"] < rec["C_total"] and 0 < rec["epochs"] < 1
    assert math.isnan(rec["continuation_bpb"])


def _load_analyze():
    spec = importlib.util.spec_from_file_location("scaling_analyze", REPO / "experiments/scaling_laws/v1/analyze.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def synthetic_records() -> list[dict]:
    """A Chinchilla law (alpha 0.34, beta 0.28: a = 0.45) sampled on a 7-size x 4-budget grid, 3 families."""
    E, A, B, alpha, beta = 1.69, 406.4, 410.7, 0.34, 0.28
    rng = np.random.default_rng(0)
    recs = []
    for family, exp, objective, shift in (("decoder_only", "scaling_decoder", "clm", 0.0),
                                          ("encoder_decoder", "scaling_encoder_decoder", "span_corruption", 0.1),
                                          ("encoder_only", "scaling_encoder", "mlm", 0.3)):
        for budget in (1e18, 1e19, 1e20, 1e21):
            n_opt = 0.1 * budget ** 0.45
            for i, n in enumerate(n_opt * np.logspace(-0.9, 0.9, 7)):
                d = budget / (6 * n)
                loss = (E + A / n**alpha + B / d**beta + shift) * (1 + 1e-4 * rng.standard_normal())
                recs.append({
                    "experiment": exp, "run": f"{family}-s{i}-C{budget}", "family": family, "objective": objective,
                    "size": f"s{i}", "seed": 0, "budget_flops": budget, "params_total": int(n),
                    "params_non_embedding": int(0.8 * n), "flops_per_token": 6 * n,
                    "flops_per_token_non_embedding": 4.8 * n, "C_total": budget, "C_non_embedding": 0.8 * budget,
                    "tokens": int(d), "total_steps": 100, "corpus_train_tokens": int(1e12), "epochs": d / 1e12,
                    "val_loss": loss, "val_bits_per_byte": loss / 2,
                    "continuation_bpb": math.nan if family == "encoder_only" else loss / 2 + shift,
                    "data_source": "synthetic", "lr": 1e-2,
                })
                if family == "decoder_only":  # the same ladder at a worse learning rate: never a main run
                    recs.append({**recs[-1], "run": f"{family}-s{i}-C{budget}-lr3e-3", "lr": 3e-3,
                                 "val_loss": recs[-1]["val_loss"] + 0.5})
    for seed in (1, 2):
        base = next(r for r in recs if r["family"] == "decoder_only" and r["size"] == "s3" and r["budget_flops"] == 1e21
                    and r["lr"] == 1e-2)
        recs.append({**base, "experiment": "scaling_seeds", "run": f"seed{seed}", "seed": seed,
                     "val_loss": base["val_loss"] * (1 + 0.002 * seed)})
    return recs


def test_analysis_command_end_to_end_on_a_known_law(tmp_path, capsys):
    from archlab.scaling.records import read_records, write_records

    analyze = _load_analyze()
    analyze.SMALL_GRID = {"alpha": (0.3, 0.6), "beta": (0.3, 0.6), "e": (0.5,), "a": (5.0, 10.0), "b": (5.0, 10.0)}
    write_records(tmp_path / "results.csv", synthetic_records())
    assert len(read_records(tmp_path / "results.csv")) == 4 * 28 + 2
    results = analyze.main(["--out", str(tmp_path), "--no-wandb", "--resamples", "10"])
    printed = capsys.readouterr().out
    dec = results["decoder_only"]
    a = dec["total"]["isoflop"]["a"]
    assert a["value"] == pytest.approx(0.45, abs=0.03) and a["ci95"][0] <= a["value"] <= a["ci95"][1]
    chinchilla, frontier_law = dec["predictability"]
    assert abs(chinchilla["relative_error"]) < 0.03 and "frontier" in frontier_law["method"]
    assert dec["seed_spread"][0]["seeds"] == [0, 1, 2]
    # Each size's rate is the better one at the smallest budget; the worse ladder is reported apart.
    assert {e["chosen"] for e in results["lr_sweep"]["decoder_only"].values()} == {1e-2}
    assert dec["n_runs"] == 28 and results["untuned_lr"]["decoder_only"]["lr"] == 3e-3
    assert "learning rate per size, decoder_only" in printed and "(untuned)" in printed
    assert set(results["families"]) == {"decoder_only", "encoder_decoder", "encoder_only"}
    assert "continuation_bpb_of_C" not in results["families"]["encoder_only"]
    for name in ("loss_vs_flops_decoder", "isoflop_decoder_total", "isoflop_decoder_non_embedding",
                 "n_opt_vs_compute_total", "family_comparison"):
        assert (tmp_path / "plots" / f"{name}.png").stat().st_size > 1000
    assert (tmp_path / "fits.json").is_file()
    assert "IsoFLOP N_opt ~ C^a: a = " in printed and "relative error" in printed


def test_sweep_runner_grid_and_learning_rate_choice(tmp_path):
    """run_sweep.py: sizes x budgets x rates as override lists; --lr-from gives each size its rate;
    --pick-lr keeps, per size, the rate with the lowest final loss."""
    import argparse
    import json

    spec = importlib.util.spec_from_file_location("run_sweep", REPO / "experiments/scaling_laws/v1/run_sweep.py")
    run_sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_sweep)

    args = argparse.Namespace(overrides=["sweep=scaling_decoder"], sizes="nano,micro", budgets="1e11,3e11",
                              lrs="3e-3,1e-2", lr_from=None)
    runs = run_sweep.grid(args)
    assert len(runs) == 8 and len({tuple(r) for r in runs}) == 8
    assert ["sweep=scaling_decoder", "size=micro", "run.flops=3e11", "optimizer.lr=1e-2"] in runs

    (tmp_path / "lr.json").write_text(json.dumps({"nano": "3e-2", "micro": "1e-2"}))
    args = argparse.Namespace(overrides=[], sizes="nano,micro", budgets="1e12", lrs=None, lr_from=str(tmp_path / "lr.json"))
    assert run_sweep.grid(args) == [["size=nano", "run.flops=1e12", "optimizer.lr=3e-2"],
                                    ["size=micro", "run.flops=1e12", "optimizer.lr=1e-2"]]

    dirs = {}
    for size, lr, loss in (("nano", "3e-3", 5.6), ("nano", "1e-2", 5.1), ("micro", "3e-3", 5.4), ("micro", "1e-2", 5.7)):
        run_dir = tmp_path / f"{size}-{lr}"
        run_dir.mkdir()
        (run_dir / "summary.json").write_text(json.dumps({"val/loss": loss}))
        (run_dir / "config.yaml").write_text(f"size_name: {size}\n")
        dirs[f"size={size}|optimizer.lr={lr}"] = run_dir
    assert run_sweep.pick_lr(dirs, tmp_path / "choice.json") == {"nano": "1e-2", "micro": "3e-3"}
    assert json.loads((tmp_path / "choice.json").read_text()) == {"nano": "1e-2", "micro": "3e-3"}
