"""Stage 2's optional separate critic (`train.rl_fake_score=critic`, docs/training.md), in-process on the
tiny student: at the start of stage 2 it is a copy of the SDD and scores exactly as the self-critic
does; its flow-matching loss and the generator's DMD loss reach disjoint parameters; the merged
no-grad path handles it; `save_adapters` leaves it out; and a bad value is refused in one line.
The 2-rank training run, resume and export with it are in tests/test_train_stage2.py."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from gd_train.config import ConfigError, load_config
from gd_train.model.student import CRITIC, GreedyDistillStudent
from gd_train.train.objectives import RLFineTuneLoss, dmd_loss

from conftest import randomize_trainable
from train_utils import TINY_STAGE1, TINY_STAGE2

FRAME, STEP_INDEX, SEED = 2, 1, 11


def _cfg(fake: str):
    return load_config(TINY_STAGE2, ["train.teacher_guidance_scale=1.0", f"train.rl_fake_score={fake}"])


@pytest.fixture
def student() -> GreedyDistillStudent:
    torch.manual_seed(0)
    s = GreedyDistillStudent.from_config(_cfg("critic"))
    randomize_trainable(s, std=0.05)  # the critic too: it differs from the SDD until stage 2 starts
    return s


def _text() -> torch.Tensor:
    return torch.randn(1, 12, 32, generator=torch.Generator().manual_seed(3))


def _scores(objective: RLFineTuneLoss):
    """(μ, x̂0_real, x̂0_gen) for one fixed rollout; every draw from a generator seeded the same way."""
    gen = torch.Generator().manual_seed(7)
    rollout = objective.rollout_to(_text(), FRAME, STEP_INDEX, SEED, gen)
    mu = objective.one_step(rollout)
    return (mu, *objective.scores(rollout, mu.detach(), gen)[:2]), rollout, gen


def test_the_critic_starts_as_the_sdd_and_scores_exactly_as_the_self_critic(student):
    sdd = {n.replace(".sdd.", "."): p for n, p in student.transformer.named_parameters() if ".lora_" in n and ".sdd." in n}
    critic = {n.replace(f".{CRITIC}.", "."): p for n, p in student.transformer.named_parameters() if f".{CRITIC}." in n}
    assert critic.keys() == sdd.keys() and critic  # same target modules, same rank
    assert all(critic[k].shape == sdd[k].shape for k in sdd)
    assert not all(torch.equal(critic[k], sdd[k]) for k in sdd)  # not a copy yet: the check below is not vacuous

    self_critic = RLFineTuneLoss(_cfg("sdd"), student, negative_embeds=None)
    (_, real_before, gen_before), _, _ = _scores(self_critic)
    self_critic.fake_adapter = CRITIC  # the random critic's own score, before stage 2 starts
    (_, _, random_critic), _, _ = _scores(self_critic)
    self_critic.fake_adapter = "sdd"
    assert not torch.equal(random_critic, gen_before)

    separate = RLFineTuneLoss(_cfg("critic"), student, negative_embeds=None)  # the start of stage 2: copies the SDD
    assert all(torch.equal(critic[k], sdd[k]) for k in sdd)
    assert all(p.requires_grad for p in student.trainable_parameters(CRITIC))
    (mu, real, gen), _, _ = _scores(separate)
    assert torch.equal(real, real_before)
    assert torch.equal(gen, gen_before), "at step 0 the separate critic must score exactly as the SDD does"
    # The whole objective: the DMD part (and every score statistic) is the self-critic's, bit for bit.
    inputs = {"prompt_embeds": _text(), "frame": FRAME, "step_index": STEP_INDEX, "seed": SEED}
    loss_self = self_critic(**inputs)
    stats_self = dict(self_critic.last_stats)
    loss_sep = separate(**inputs)
    assert {k: v for k, v in separate.last_stats.items() if k != "critic_loss"} == stats_self
    assert separate.last_stats["critic_loss"] > 0
    assert float(loss_sep.detach()) == pytest.approx(float(loss_self.detach()) + separate.last_stats["critic_loss"], rel=1e-6)


def test_the_critic_and_the_generator_losses_reach_disjoint_parameters(student):
    objective = RLFineTuneLoss(_cfg("critic"), student, negative_embeds=None)
    (mu, real, gen), rollout, g = _scores(objective)
    generator_loss = dmd_loss(mu, real, gen)
    critic_loss = objective.critic_loss(rollout, mu.detach(), g)
    critic_params = set(map(id, student.trainable_parameters(CRITIC)))
    generator_params = [p for p in student.trainable_parameters() if id(p) not in critic_params]

    generator_loss.backward(retain_graph=True)
    assert all(p.grad is None for p in student.trainable_parameters(CRITIC))
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in generator_params)
    generator_grads = [None if p.grad is None else p.grad.clone() for p in generator_params]
    student.zero_grad(set_to_none=True)

    critic_loss.backward()
    assert all(p.grad is None for p in generator_params), "the critic's loss reached the generator"
    assert all(p.grad is not None for p in student.trainable_parameters(CRITIC))
    assert any(p.grad.abs().sum() > 0 for p in student.trainable_parameters(CRITIC))
    assert not any(p.grad is not None for p in student.base_parameters().values())
    # The sum the objective returns gives each side exactly its own gradient.
    student.zero_grad(set_to_none=True)
    (mu, real, gen), rollout, g = _scores(objective)
    (dmd_loss(mu, real, gen) + objective.critic_loss(rollout, mu.detach(), g)).backward()
    for p, ref in zip(generator_params, generator_grads):
        assert (p.grad is None) == (ref is None) and (ref is None or torch.equal(p.grad, ref))


def test_the_optimizer_holds_the_critic_in_its_own_group_and_the_default_has_none(student):
    from gd_train.train.optim import build_optimizer

    cfg = _cfg("critic")
    groups = build_optimizer(student, cfg.train).param_groups
    assert [g["name"] for g in groups] == ["etm", "sdd", CRITIC]
    assert {id(p) for p in groups[2]["params"]} == {id(p) for p in student.trainable_parameters(CRITIC)}
    default = GreedyDistillStudent.from_config(_cfg("sdd"))
    assert default.adapter_names == ("etm", "sdd") and not default.has_critic
    assert not any(f".{CRITIC}." in n for n, _ in default.named_parameters())
    assert [g["name"] for g in build_optimizer(default, cfg.train).param_groups] == ["etm", "sdd"]


def test_merged_no_grad_passes_run_the_critic_too(student):
    RLFineTuneLoss(_cfg("critic"), student, negative_embeds=None)
    with torch.no_grad():
        student.transformer.get_submodule("blocks.0.attn1.to_q").lora_B[CRITIC].weight.add_(0.1)  # critic != SDD
    g = torch.Generator().manual_seed(5)
    first, prev, noisy = (torch.randn(1, 16, 1, 8, 12, generator=g) for _ in range(3))
    cond = torch.randn(1, 24, student.dim, generator=g)
    with torch.no_grad():
        peft = {a: student.sdd_recompute(first, prev, noisy, 0.6, 2, cond, _text(), adapter=a) for a in ("sdd", CRITIC)}
        student.merged_inference(True)
        try:
            merged = {a: student.sdd_recompute(first, prev, noisy, 0.6, 2, cond, _text(), adapter=a) for a in ("sdd", CRITIC)}
        finally:
            student.merged_inference(False)
    assert not torch.allclose(peft["sdd"], peft[CRITIC])
    for a in ("sdd", CRITIC):
        torch.testing.assert_close(merged[a], peft[a], rtol=1e-5, atol=1e-5)


def test_save_adapters_leaves_the_critic_out(student, tmp_path):
    RLFineTuneLoss(_cfg("critic"), student, negative_embeds=None)
    out = student.save_adapters(tmp_path / "adapters")
    assert sorted(p.name for p in out.iterdir()) == ["cf_proj.safetensors", "etm", "sdd"]
    plain = GreedyDistillStudent.from_config(_cfg("sdd"))
    plain.save_adapters(tmp_path / "plain")
    for name in ("etm", "sdd"):
        ours, theirs = (load_file(str(f / name / "adapter_model.safetensors")) for f in (out, tmp_path / "plain"))
        assert ours.keys() == theirs.keys() and not any(CRITIC in k for k in ours)
    plain.load_adapters(out)  # what init_from does: a student without the option reads it as any export


@pytest.mark.parametrize("overrides, expected", [
    (["train.rl_fake_score=critc"], "key 'train.rl_fake_score': expected one of sdd|critic, got 'critc'"),
    (["train.rl_fake_score=critic", "train.stage=stage1"], "key 'train.rl_fake_score': 'critic' is a stage-2 option"),
])
def test_a_bad_fake_score_is_refused_in_one_line(overrides, expected):
    with pytest.raises(ConfigError) as err:
        load_config(TINY_STAGE1 if "train.stage=stage1" in overrides else TINY_STAGE2, overrides)
    assert str(err.value).startswith(expected) and "\n" not in str(err.value)
