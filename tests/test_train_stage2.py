"""Stage 2 (RL fine-tuning, Eq. 10): started from a real stage-1 checkpoint with 2 ranks over gloo.
Every rank and every accumulation micro-step uses the same (f, t); only the adapters and the c_f
projection change; an adapter left out of train.adapters does not move even under weight decay; and
the loss's gradient moves the student's output toward the teacher's x̂0. With a separate critic
(train.rl_fake_score=critic) the same run trains it, resumes exactly and exports without it
(its in-process unit tests: tests/test_critic.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from train_utils import TINY_STAGE1, TINY_STAGE2, metrics, run_cli, trace, write_tiny_shards


def _adapters(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for name in ("etm", "sdd"):
        out.update({f"{name}:{k}": v for k, v in load_file(str(folder / name / "adapter_model.safetensors")).items()})
    out.update({f"cf_proj:{k}": v for k, v in load_file(str(folder / "cf_proj.safetensors")).items()})
    return out


def _final_checkpoint(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("shards")
    write_tiny_shards(folder, 16, samples_per_shard=4, seed=1, lengths=(3, 6))  # mixed lengths
    return folder


@pytest.fixture(scope="module")
def stage1_run(shards, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("s1") / "run"
    run_cli("stage1", "--config", TINY_STAGE1, "--nproc", "2", f"output_dir={run_dir}", f"data.shards={shards}",
            "train.max_steps=3")
    return run_dir


@pytest.fixture(scope="module")
def stage2_run(shards, stage1_run, tmp_path_factory) -> Path:
    """6 steps of 4 samples = micro 1 x 2 accumulation x 2 ranks, from the stage-1 run's latest checkpoint."""
    run_dir = tmp_path_factory.mktemp("s2") / "run"
    run_cli("stage2", "--config", TINY_STAGE2, "--nproc", "2", f"output_dir={run_dir}", f"data.shards={shards}",
            f"train.init_from={stage1_run}", "train.global_batch_size=4", "train.epochs=2", "train.max_steps=6", "train.trace=true",
            "train.checkpoint_every=3", "train.lr=1e-3")
    return run_dir


def _critic_args(run_dir: Path, shards: Path, stage1_run: Path, *extra: str) -> list[str]:
    return ["--config", TINY_STAGE2, "--nproc", "2", f"output_dir={run_dir}", f"data.shards={shards}",
            f"train.init_from={stage1_run}", "train.rl_fake_score=critic", "train.checkpoint_every=2", "train.lr=1e-3",
            "train.teacher_guidance_scale=1.0", *extra]  # no CFG: no text encoder to start (the run above has CFG)


@pytest.fixture(scope="module")
def critic_run(shards, stage1_run, tmp_path_factory) -> Path:
    """With a separate critic: 4 steps of 2 samples (micro 1 x 1 x 2 ranks), checkpoints at 2 and 4."""
    run_dir = tmp_path_factory.mktemp("s2-critic") / "run"
    run_cli("stage2", *_critic_args(run_dir, shards, stage1_run, "train.max_steps=4"))
    return run_dir


def test_every_rank_and_micro_step_uses_the_same_f_and_t(stage2_run):
    from gd_train.metrics import read_scalars

    per_rank = trace(stage2_run)
    assert sorted(per_rank) == [0, 1]
    sequences = {rank: [(r["step"], r["micro"], r["frames"], r["f"], r["t"]) for r in records]
                 for rank, records in per_rank.items()}
    assert sequences[0] == sequences[1]
    assert [(s, m) for s, m, _, _, _ in sequences[0]] == [(s, m) for s in range(1, 7) for m in range(2)]
    by_step = {}
    for step, _, frames, f, t in sequences[0]:
        by_step.setdefault(step, set()).add((frames, f, t))
    assert all(len(v) == 1 for v in by_step.values()), "micro-steps of one minibatch disagree on (F, f, t)"
    steps = [next(iter(by_step[s])) for s in range(1, 7)]
    assert {frames for frames, _, _ in steps} == {3, 6}  # mixed lengths, one per step
    # f never reaches past the step's clips (x_0 .. x_{F-1}); t from the 'next' levels.
    assert all(1 <= f <= frames - 1 and t in (1000, 750, 500) for frames, f, t in steps)
    draws = [(f, t) for _, f, t in steps]
    assert len(set(draws)) > 1, "(f, t) never changes"
    # What TensorBoard shows is the agreed draw.
    scalars = read_scalars(stage2_run / "tb")
    assert [(int(f), int(t)) for (_, f), (_, t) in zip(scalars["rl/f"], scalars["rl/t"])] == draws
    assert all(r["loss"] > 0 for r in metrics(stage2_run))
    # Stage 2's objective has its own chart, and every tag it logs (rl/ included) is in the layout.
    from gd_train.metrics import tags_outside_layout

    assert [v for _, v in scalars["loss/stage2_rl"]] == pytest.approx([r["loss"] for r in metrics(stage2_run)], rel=1e-6)
    assert not any(tag.startswith("loss/") and tag != "loss/stage2_rl" for tag in scalars)
    assert tags_outside_layout(stage2_run / "tb") == []


@pytest.mark.parametrize("run", ["stage2_run", "critic_run"])
def test_only_adapters_and_the_cf_projection_change(stage1_run, run, request):
    from gd_train.checkpoint import base_fingerprint
    from gd_train.config import load_config
    from gd_train.model.student import GreedyDistillStudent

    init_ckpt, final_ckpt = _final_checkpoint(stage1_run), _final_checkpoint(request.getfixturevalue(run))
    before, after = _adapters(init_ckpt / "adapters"), _adapters(final_ckpt / "adapters")
    assert before.keys() == after.keys()
    for group in ("etm:", "sdd:", "cf_proj:"):
        changed = [k for k in before if k.startswith(group) and not torch.equal(before[k], after[k])]
        assert changed, f"no {group[:-1]} weight changed in stage 2"

    # The frozen base: the fingerprint every checkpoint records (recomputed at each save, which refuses
    # on a change) equals that of a freshly built teacher.
    fresh = base_fingerprint(GreedyDistillStudent.from_config(load_config(TINY_STAGE2)))
    for folder in (init_ckpt, final_ckpt):
        assert json.loads((folder / "checkpoint.json").read_text())["base_fingerprint"] == fresh


def test_a_separate_critic_trains_resumes_exactly_and_is_not_exported(shards, stage1_run, critic_run, tmp_path):
    from gd_train.checkpoint import export, trainable_state
    from gd_train.config import load_config
    from gd_train.metrics import read_scalars, tags_outside_layout
    from gd_train.model.student import GreedyDistillStudent

    # It trains: the critic's loss is logged per step (in the layout), and its weights moved away from its
    # start, the stage-1 SDD it was copied from (init_from: created from the loaded SDD, not loaded).
    records = metrics(critic_run)
    assert [r["step"] for r in records] == [1, 2, 3, 4] and all(r["rl/critic_loss"] > 0 for r in records)
    scalars = read_scalars(critic_run / "tb")
    assert [s for s, _ in scalars["rl/critic_loss"]] == [1, 2, 3, 4]
    assert tags_outside_layout(critic_run / "tb") == []
    final = _final_checkpoint(critic_run)
    tensors, meta = trainable_state(final)
    start, _ = trainable_state(_final_checkpoint(stage1_run))
    critic = {k: v for k, v in tensors.items() if k.startswith("fp32/") and ".critic." in k}
    assert critic and {k.replace(".critic.", ".sdd.") for k in critic} <= set(start)
    assert any(not torch.equal(v, start[k.replace(".critic.", ".sdd.")]) for k, v in critic.items()), "the critic did not train"
    assert all(f"exp_avg/{k[5:]}" in tensors and meta["params"][k[5:]]["step"] == 4 for k in critic)
    assert [g["name"] for g in meta["param_groups"]] == ["etm", "sdd", "critic"]

    # Resume is exact, the critic included: a copy of the run put back to its step-2 checkpoint continues
    # to the uninterrupted run's losses and step-4 state (weights and AdamW moments), bit for bit.
    resumed = tmp_path / "resumed"
    shutil.copytree(critic_run, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-00000004")
    (resumed / "checkpoints" / "latest").write_text("step-00000002\n")
    run_cli("resume", str(resumed), "--nproc", "2", f"output_dir={resumed}")
    keys = ("loss", "rl/critic_loss", "optimisation/grad_norm")
    assert [[r[k] for k in keys] for r in metrics(resumed)] == [[r[k] for k in keys] for r in records]
    again, _ = trainable_state(_final_checkpoint(resumed))
    assert again.keys() == tensors.keys() and all(torch.equal(again[k], tensors[k]) for k in tensors)

    # Resuming it without the critic is refused before any rank starts: its state holds the critic's.
    proc = run_cli("resume", str(resumed), "--nproc", "2", "train.rl_fake_score=sdd", check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(
        f"gd-train: error: key 'train.rl_fake_score': run {resumed} trained with 'critic', this resume sets 'sdd'")

    # The export (what `gd-train ckpt export` runs, here in-process) leaves the critic out: etm/ + sdd/ + the
    # c_f projection, as without it, which a student without the option loads as any export.
    out = export(final, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == ["cf_proj.safetensors", "etm", "sdd"]
    assert _adapters(out).keys() == _adapters(_final_checkpoint(stage1_run) / "adapters").keys()
    GreedyDistillStudent.from_config(load_config(TINY_STAGE2)).load_adapters(out)


def test_an_adapter_left_out_does_not_move_even_with_weight_decay(shards, stage1_run, tmp_path):
    run_dir = tmp_path / "sdd-only"
    run_cli("stage2", "--config", TINY_STAGE2, "--nproc", "2", f"output_dir={run_dir}", f"data.shards={shards}",
            f"train.init_from={stage1_run}", "train.max_steps=3", "train.adapters=[sdd]", "train.weight_decay=0.5",
            "train.lr=1e-3")
    before, after = _adapters(_final_checkpoint(stage1_run) / "adapters"), _adapters(_final_checkpoint(run_dir) / "adapters")
    etm = [k for k in before if k.startswith("etm:")]
    assert etm and all(torch.equal(before[k], after[k]) for k in etm), "the frozen ETM adapter moved"
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("sdd:"))


# --------------------------------------------------------------------------------------------------
# The direction of the RL gradient (in-process, no DeepSpeed)
# --------------------------------------------------------------------------------------------------
def test_dmd_loss_moves_mu_toward_the_teacher_x0():
    from gd_train.train.objectives import dmd_loss

    gen = torch.Generator().manual_seed(0)
    mu = torch.randn(2, 16, 1, 4, 6, generator=gen).requires_grad_(True)
    x0_real = torch.randn(2, 16, 1, 4, 6, generator=gen)
    x0_gen = mu.detach().clone()  # the generator's own score says "you are where you are"
    loss = dmd_loss(mu, x0_real, x0_gen)
    loss.backward()
    normaliser = (mu.detach() - x0_real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    torch.testing.assert_close(mu.grad, 2 * (x0_gen - x0_real) / normaliser / mu.numel())
    with torch.no_grad():
        stepped = mu - 10.0 * mu.grad
    assert (stepped - x0_real).norm() < (mu.detach() - x0_real).norm()
    # With a generator score that already agrees with the teacher, there is nothing to learn.
    assert dmd_loss(mu.detach(), x0_real, x0_real).item() == 0.0


def test_a_stage2_gradient_step_moves_the_students_output_toward_the_teacher():
    """The whole objective on the tiny student: one SGD step on the adapters (gradient through the last
    step only) changes μ, for the same rollout, in the direction x̂0_real − x̂0_gen (first order)."""
    from gd_train.config import load_config
    from gd_train.model.student import GreedyDistillStudent
    from gd_train.train.objectives import RLFineTuneLoss, dmd_loss

    from conftest import randomize_trainable

    cfg = load_config(TINY_STAGE2, ["train.teacher_guidance_scale=1.0"])
    torch.manual_seed(0)
    student = GreedyDistillStudent.from_config(cfg)
    randomize_trainable(student, std=0.05)
    objective = RLFineTuneLoss(cfg, student, negative_embeds=None)
    text = torch.randn(1, 12, 32, generator=torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(7)
    rollout = objective.rollout_to(text, frame=3, step_index=1, seed=11, gen=gen)
    mu = objective.one_step(rollout)
    x0_real, x0_gen, _ = objective.scores(rollout, mu.detach(), gen)
    dmd_loss(mu, x0_real, x0_gen).backward()
    for adapter in ("etm", "sdd"):  # μ depends on both: the SDD step and, through c_f, the ETM
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.trainable_parameters(adapter)), adapter
    params = [p for p in student.trainable_parameters() if p.grad is not None]
    norm = torch.cat([p.grad.flatten() for p in params]).norm()
    with torch.no_grad():
        for p in params:
            p -= 1e-2 * p.grad / norm
        moved = objective.one_step(rollout) - mu.detach()
    toward = (x0_real - x0_gen).flatten()
    cosine = float(moved.flatten() @ toward / (moved.norm() * toward.norm()))
    assert cosine > 0, f"the step moved mu away from the teacher (cosine {cosine:.4f})"
