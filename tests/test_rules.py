"""Per-size hyperparameter rules (conf/rules/*.yaml, archlab/train/rules.py)."""

from __future__ import annotations

import dataclasses
import math

import pytest

from archlab.errors import ConfigError
from archlab.train.branches import plan_branches
from archlab.train.members import member_configs
from archlab.train.setup import make_plan
from archlab.trainer import compose, config_dict, resolved

LADDER = ["logger=none", "data.vocab_size=512", "model.d_model=24", "model.n_layers=2", "model.n_heads=2",
          "model.d_ff=96", "optimizer.schedule=wsd", "rules=ladder_v2_prior"]


def test_no_rule_leaves_the_config_as_given():
    cfg = compose(["logger=none"])
    assert cfg.rules.name is None
    ran = resolved(cfg)
    # Only the auto values and the mesh's -1 (the rest of the devices) are filled in.
    assert ran == dataclasses.replace(cfg, model=ran.model, mesh=ran.mesh)
    assert ran.mesh.data * ran.mesh.fsdp * ran.mesh.tensor >= 1 and -1 not in (ran.mesh.data, ran.mesh.fsdp)


def test_the_rule_gives_its_closed_form_and_records_it():
    cfg = resolved(compose([*LADDER, "run.flops=8e11", "run.branches=[2e11,4e11,8e11]"]))
    r, plan = cfg.rules, make_plan(cfg, 512)
    n = plan.params.total
    smallest = int(2e11 * plan.row_length / plan.flops.train)
    assert cfg.optimizer.lr == pytest.approx(4e-3 * (n / 1e5) ** -0.3, rel=1e-12)
    assert cfg.optimizer.b2 == 0.95
    assert cfg.optimizer.warmup_tokens == int(min(n, 0.1 * smallest))
    batch = cfg.run.batch_size
    assert batch & (batch - 1) == 0 and r.min_batch <= batch <= r.max_batch
    updates = smallest / (batch * plan.row_length)
    assert updates >= r.min_updates and (batch == r.max_batch or smallest / (2 * batch * 128) < r.min_updates)
    assert r.applied == {"params": n, "smallest_budget_tokens": smallest, "lr": cfg.optimizer.lr, "b2": 0.95,
                         "warmup_tokens": cfg.optimizer.warmup_tokens, "batch_size": batch}
    recorded = config_dict(cfg)["rules"]
    assert recorded["name"] == "ladder_v2_prior" and recorded["applied"] == r.applied


def test_the_batch_term_scales_the_rate_with_the_batch_the_rule_picks():
    base = resolved(compose([*LADDER, "run.flops=8e11", "run.branches=[2e11,4e11,8e11]"]))
    scaled = resolved(compose([*LADDER, "run.flops=8e11", "run.branches=[2e11,4e11,8e11]", "rules.lr_batch=4",
                               "rules.lr_batch_exponent=0.5"]))
    assert scaled.run.batch_size == base.run.batch_size
    assert scaled.optimizer.lr == pytest.approx(base.optimizer.lr * (base.run.batch_size / 4) ** 0.5, rel=1e-12)


def test_branches_and_members_keep_the_trunks_values():
    cfg = resolved(compose([*LADDER, "run.flops=8e11", "run.branches=[2e11,4e11,8e11]",
                            "run.members=[{lr:1e-2},{seed:1}]"]))
    for branch in plan_branches(cfg, 512):
        assert resolved(branch.cfg) == branch.cfg  # not re-derived from the branch's own budget
        assert branch.cfg.run.batch_size == cfg.run.batch_size
    first, second = member_configs(cfg)
    assert first.optimizer.lr == 1e-2 and second.optimizer.lr == cfg.optimizer.lr  # a member's lr wins
    assert resolved(second) == second


def test_a_budget_too_small_for_the_rule_is_refused():
    with pytest.raises(ConfigError, match="fewer than rules.min_updates=300 updates"):
        resolved(compose([*LADDER, "run.flops=1e10"]))


def test_bad_rule_values_are_refused():
    for override, message in [("rules.b2=1.5", "rules.b2 must be in"), ("rules.lr=nan", "rules.lr must be finite"),
                              ("rules.min_batch=64", "rules.min_batch 64 is above")]:
        with pytest.raises(ConfigError, match=message):
            compose([*LADDER, override])


def test_the_calibrated_rule_file_names_its_calibration():
    cfg = compose([*LADDER, "rules=ladder_v2"])
    calibration = cfg.rules.calibration
    assert cfg.rules.name == "ladder_v2" and "calibration.py" in calibration["command"]
    assert math.isfinite(cfg.rules.lr_exponent) and calibration["results"].endswith("calibration.csv")
