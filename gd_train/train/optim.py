"""AdamW over the adapters that train, one parameter group per adapter, and the learning-rate schedule.

Why the care: with two LoRA adapters in one optimizer, an adapter that gets no gradient still moves —
Adam's momentum keeps stepping and weight decay keeps shrinking (verified in ../shared/STACK_NOTES.md).
So an adapter that is not meant to train is *frozen* (requires_grad off) and left out of the optimizer
entirely, and each trained adapter has its own group (its lr and decay can be read and logged apart).
The c_f projection belongs to the SDD's group: it only feeds the SDD.

A plain `torch.optim.AdamW` is handed to DeepSpeed (which shards its state under ZeRO): a DeepSpeed-
config optimizer would compile FusedAdam first (~85 s on CPU) for no gain at LoRA sizes.
"""

from __future__ import annotations

import math

import torch
from omegaconf import DictConfig

from gd_train.model.student import ADAPTERS, CRITIC, GreedyDistillStudent


def freeze_untrained_adapters(student: GreedyDistillStudent, trained: list[str]) -> None:
    for adapter in ADAPTERS:
        for p in student.trainable_parameters(adapter):
            p.requires_grad_(adapter in trained)
    if "sdd" not in trained:  # trainable_parameters("sdd") holds cf_proj; nothing else trains it
        for p in student.cf_proj.parameters():
            p.requires_grad_(False)


def parameter_groups(student: GreedyDistillStudent, train: DictConfig) -> list[dict]:
    groups = []
    for adapter in ADAPTERS:
        if adapter not in train.adapters:
            continue
        params = [p for p in student.trainable_parameters(adapter) if p.requires_grad]
        groups.append({"name": adapter, "params": params, "lr": float(train.lr),
                       "weight_decay": float(train.weight_decay)})
    if student.has_critic:  # train.rl_fake_score=critic: stage 2's fake score trains too, always
        groups.append({"name": CRITIC, "params": student.trainable_parameters(CRITIC), "lr": float(train.lr),
                       "weight_decay": float(train.weight_decay)})
    return groups


def build_optimizer(student: GreedyDistillStudent, train: DictConfig) -> torch.optim.AdamW:
    freeze_untrained_adapters(student, list(train.adapters))
    return torch.optim.AdamW(parameter_groups(student, train), lr=float(train.lr),
                             betas=(float(train.betas[0]), float(train.betas[1])), eps=float(train.eps),
                             weight_decay=float(train.weight_decay))


class WarmupSchedule:
    """Multiplier of the base lr at optimizer step `step` (0-based): linear warm-up over `warmup` steps,
    then constant, or cosine down to `min_ratio` at `total` steps. A class, not a lambda, so that
    `LambdaLR.state_dict()` (and hence DeepSpeed's checkpoint) holds it."""

    def __init__(self, kind: str, warmup: int, total: int, min_ratio: float = 0.0):
        self.kind, self.warmup, self.total, self.min_ratio = kind, warmup, total, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.kind == "constant":
            return 1.0
        span = max(1, self.total - self.warmup)
        progress = min(1.0, (step - self.warmup) / span)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, train: DictConfig, total_steps: int):
    schedule = WarmupSchedule(train.schedule, int(train.warmup_steps), total_steps, float(train.min_lr_ratio))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=[schedule] * len(optimizer.param_groups))
