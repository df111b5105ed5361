"""The training pieces that need no processes: batch arithmetic, the lr schedule, parameter groups,
the DeepSpeed config, and the console script."""

from __future__ import annotations

import math
import tomllib

import pytest
import torch

from gd_train.config import ConfigError, load_config
from gd_train.train.plan import BatchPlan
from train_utils import REPO_ROOT, TINY_STAGE1


def test_batch_plan_derives_accumulation_and_refuses_what_does_not_divide():
    paper = load_config("configs/stage1.yaml", ["pretrained_path=null"])
    plan = BatchPlan.from_config(paper.train, world_size=64)
    assert (plan.global_batch_size, plan.micro_batch_size, plan.accumulation_steps) == (1024, 1, 16)
    assert BatchPlan.from_config(load_config("configs/stage2.yaml", ["pretrained_path=null"]).train, 64).accumulation_steps == 4
    with pytest.raises(ConfigError, match=r"1024 is not divisible by train.micro_batch_size 1 x world size 48 = 48"):
        BatchPlan.from_config(paper.train, world_size=48)
    # Steps are whole inside an epoch (the reader plans them); max_steps caps the run.
    assert plan.total_steps(steps_per_epoch=10, epochs=3, max_steps=None) == 30
    assert BatchPlan(4, 1, 2, 2).total_steps(12, 2, max_steps=5) == 5


@pytest.mark.parametrize("kind", ["constant", "cosine"])
def test_warmup_then_constant_or_cosine(kind):
    from gd_train.train.optim import WarmupSchedule

    schedule = WarmupSchedule(kind, warmup=4, total=20, min_ratio=0.1)
    assert [schedule(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    if kind == "constant":
        assert all(schedule(s) == 1.0 for s in range(4, 20))
    else:
        assert schedule(4) == 1.0 and math.isclose(schedule(20), 0.1) and math.isclose(schedule(12), 0.55)
        assert all(schedule(s) >= schedule(s + 1) for s in range(4, 20))


def test_one_parameter_group_per_trained_adapter_and_nothing_else():
    from gd_train.model.student import GreedyDistillStudent
    from gd_train.train.optim import build_optimizer

    cfg = load_config(TINY_STAGE1)
    student = GreedyDistillStudent.from_config(cfg)
    optimizer = build_optimizer(student, cfg.train)
    groups = {g["name"]: {id(p) for p in g["params"]} for g in optimizer.param_groups}
    assert groups == {"etm": {id(p) for p in student.trainable_parameters("etm")},
                      "sdd": {id(p) for p in student.trainable_parameters("sdd")}}
    assert {id(p) for p in student.cf_proj.parameters()} <= groups["sdd"]
    assert not any(id(p) in groups["etm"] | groups["sdd"] for p in student.base_parameters().values())

    sdd_only = load_config(TINY_STAGE1, ["train.adapters=[sdd]"])
    optimizer = build_optimizer(student, sdd_only.train)
    assert [g["name"] for g in optimizer.param_groups] == ["sdd"]
    assert not any(p.requires_grad for p in student.trainable_parameters("etm"))  # frozen, not just unstepped


def test_deepspeed_config_is_fp32_with_derived_accumulation():
    from gd_train.train.trainer import deepspeed_config

    cfg = load_config("configs/stage1.yaml", ["pretrained_path=null", "train.zero_stage=3"])
    ds = deepspeed_config(cfg, BatchPlan.from_config(cfg.train, 64))
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (1024, 1, 16)
    assert ds["zero_optimization"]["stage"] == 3 and ds["gradient_clipping"] == 1.0
    assert not ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert cfg.model.dtype == "bfloat16"  # the frozen base runs in bf16 on the GPU configs
    # The gradient bucket holds what trains, no more (DeepSpeed allocates it whole; its default is 5e8).
    assert "reduce_bucket_size" not in ds["zero_optimization"]
    for trainable, bucket in ((175_000_000, 175_000_000), (900_000_000, 500_000_000)):
        assert deepspeed_config(cfg, BatchPlan.from_config(cfg.train, 64), trainable)["zero_optimization"][
            "reduce_bucket_size"] == bucket


def test_rl_draw_is_a_function_of_the_step_and_respects_the_score_level():
    from gd_train.model.student import GreedyDistillStudent
    from gd_train.train.objectives import RLFineTuneLoss

    cfg = load_config("configs/tiny/stage2.yaml")
    objective = RLFineTuneLoss(cfg, GreedyDistillStudent.from_config(cfg), negative_embeds=None)
    draws = [objective.draw(step, 6) for step in range(1, 200)]
    assert draws == [objective.draw(step, 6) for step in range(1, 200)]
    assert {d.frame for d in draws} == {1, 2, 3, 4, 5} and {d.timestep for d in draws} == {1000, 750, 500}
    # f stays inside the step's clips: x_0 .. x_{F-1} of its bucket.
    assert {objective.draw(step, 3).frame for step in range(1, 200)} == {1, 2}
    with pytest.raises(ValueError, match="at least 2 latent frames"):
        objective.draw(1, 1)
    uniform = RLFineTuneLoss(load_config("configs/tiny/stage2.yaml", ["train.rl_score_level=uniform"]),
                             objective.student, negative_embeds=None)
    assert {uniform.draw(step, 6).timestep for step in range(1, 200)} == {1000, 750, 500, 250}
    gen = torch.Generator().manual_seed(0)
    assert objective.score_sigma(0, gen) == objective.sigmas[1]  # 'next': the schedule's next level
    assert 0 < uniform.score_sigma(3, gen) < 1


def test_console_script_points_at_the_cli():
    scripts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, function = scripts["gd-train"].partition(":")
    import importlib

    assert callable(getattr(importlib.import_module(module), function))
