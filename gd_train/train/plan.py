"""What a training run will do, decided before any process starts: the batch arithmetic and the
`train.*` settings that must hold. Every refusal is one line naming the key and the numbers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from gd_train.config import ConfigError, load_config
from gd_train.train.host_memory import MAX_THRESHOLD

STAGES = ("stage1", "stage2")
SCHEDULES = ("constant", "cosine")
ADAPTERS = ("etm", "sdd")
SCORE_LEVELS = ("next", "uniform")

CONFIG_FILE = "config.yaml"  # the run folder's resolved config; `resume` reads it
PREEMPTED_FILE = "preempted.json"  # written after a pre-emption checkpoint; the SLURM scripts requeue on it


@dataclass(frozen=True)
class BatchPlan:
    """global batch = micro-batch x gradient-accumulation steps x world size, at the shortest length;
    the reader derives each length's micro-batch and accumulation from it (gd_train.data.buckets)."""

    global_batch_size: int
    micro_batch_size: int
    world_size: int
    accumulation_steps: int

    @classmethod
    def from_config(cls, train: DictConfig, world_size: int, resuming: bool = False) -> "BatchPlan":
        """`resuming`: the global batch is the run's and stays; the remedy is another number of ranks."""
        g, m = int(train.global_batch_size), int(train.micro_batch_size)
        if m < 1 or g < 1 or world_size < 1:
            raise ConfigError(f"key 'train.global_batch_size'/'train.micro_batch_size': expected positive values, "
                              f"got global {g}, micro {m} (world size {world_size})")
        per_step = m * world_size
        if g % per_step and resuming:
            fits = [n for n in range(1, g // m + 1) if (g // m) % n == 0 and g % m == 0]
            raise ConfigError(
                f"key 'train.global_batch_size': the run's global batch of {g} samples cannot be kept on {world_size} "
                f"rank(s) (micro-batch {m}); resume on a number of ranks that divides {g // m if g % m == 0 else g}"
                + (f" ({', '.join(map(str, fits[:8]))}{', ...' if len(fits) > 8 else ''})" if fits else ""))
        if g % per_step:
            raise ConfigError(
                f"key 'train.global_batch_size': {g} is not divisible by train.micro_batch_size {m} x world size "
                f"{world_size} = {per_step} (global = micro x accumulation x world; e.g. "
                f"train.global_batch_size={max(per_step, g // per_step * per_step)})")
        return cls(g, m, world_size, g // per_step)

    def total_steps(self, steps_per_epoch: int, epochs: int, max_steps: Optional[int]) -> int:
        """Optimizer steps of the run: the reader plans whole steps in every epoch (one length each, the
        accumulation of that length; gd_train.data.buckets), capped by `max_steps`."""
        steps = steps_per_epoch * epochs
        return min(steps, max_steps) if max_steps is not None else steps


def validate_train_config(cfg: DictConfig, command: Optional[str] = None) -> None:
    """Checks that need no world size; `command` is the CLI's stage when there is one."""
    t = cfg.train
    if command is not None and t.stage is not None and t.stage != command:
        raise ConfigError(f"key 'train.stage': the config says '{t.stage}' but the command is '{command}' "
                          f"(run `gd-train {t.stage}`, or drop train.stage from the config)")
    stage = command or t.stage
    if stage not in STAGES:
        raise ConfigError(f"key 'train.stage': expected one of {'|'.join(STAGES)}, got {stage!r}")
    if t.schedule not in SCHEDULES:
        raise ConfigError(f"key 'train.schedule': expected one of {'|'.join(SCHEDULES)}, got '{t.schedule}'")
    if t.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"key 'train.zero_stage': expected 0, 1, 2 or 3 (DeepSpeed ZeRO stage), got {t.zero_stage}")
    unknown = [a for a in t.adapters if a not in ADAPTERS]
    if unknown or not t.adapters or len(set(t.adapters)) != len(t.adapters):
        raise ConfigError(f"key 'train.adapters': expected a non-empty subset of {list(ADAPTERS)}, got {list(t.adapters)}")
    if t.rl_score_level not in SCORE_LEVELS:
        raise ConfigError(f"key 'train.rl_score_level': expected one of {'|'.join(SCORE_LEVELS)}, got '{t.rl_score_level}'")
    for key in ("epochs", "checkpoint_every", "keep_last", "log_every", "max_bad_steps"):
        if int(t[key]) < 1:
            raise ConfigError(f"key 'train.{key}': expected >= 1, got {t[key]}")
    for key in ("warmup_steps", "video_every"):
        if int(t[key]) < 0:
            raise ConfigError(f"key 'train.{key}': expected >= 0, got {t[key]}")
    if t.cpu_mmap_threshold is not None and not 0 < t.cpu_mmap_threshold <= MAX_THRESHOLD:
        raise ConfigError(f"key 'train.cpu_mmap_threshold': expected bytes in (0, {MAX_THRESHOLD}] (glibc's limit) "
                          f"or null, got {t.cpu_mmap_threshold}")
    if t.max_steps is not None and t.max_steps < 1:
        raise ConfigError(f"key 'train.max_steps': expected >= 1 or null, got {t.max_steps}")
    if t.lr <= 0 or t.grad_clip < 0 or t.weight_decay < 0 or not 0 <= t.min_lr_ratio <= 1:
        raise ConfigError(f"key 'train.lr'/'grad_clip'/'weight_decay'/'min_lr_ratio': expected lr > 0, grad_clip >= 0, "
                          f"weight_decay >= 0, 0 <= min_lr_ratio <= 1; got {t.lr}, {t.grad_clip}, {t.weight_decay}, "
                          f"{t.min_lr_ratio}")
    if len(t.betas) != 2 or not all(0 <= b < 1 for b in t.betas):
        raise ConfigError(f"key 'train.betas': expected two values in [0, 1), got {list(t.betas)}")
    if stage == "stage2":
        if t.init_from is None:
            raise ConfigError("key 'train.init_from': stage 2 starts from a stage-1 checkpoint; set "
                              "train.init_from=RUN_DIR (its latest checkpoint) or a checkpoint folder")
        if len(cfg.student.denoising_steps) < 2 and t.rl_score_level == "next":
            raise ConfigError("key 'train.rl_score_level': 'next' needs at least two student.denoising_steps "
                              "(the last step's next level is clean data); use rl_score_level=uniform")


def load_run_config(run_dir: Path, stage: Optional[str], config: Optional[str], resume: bool,
                    overrides: Sequence[str]) -> DictConfig:
    """Fresh start: the config file + the command's stage + overrides, with output_dir = run_dir.
    Resume: the run's saved config.yaml + overrides."""
    if resume:
        saved = run_dir / CONFIG_FILE
        if not saved.is_file():
            raise ConfigError(f"run folder {run_dir}: no {CONFIG_FILE} (not a gd-train run folder)")
        cfg = load_config(saved, list(overrides))
        _check_fixed_on_resume(load_config(saved), cfg, run_dir)
        return cfg
    cfg = load_config(config, [f"train.stage={stage}", *overrides, f"output_dir={run_dir}"])
    validate_train_config(cfg, command=stage)
    return cfg


# What the checkpoint's weights and optimizer state are made of: a resume continues that run, so an
# override of these would meet a state it does not fit (train.init_from starts a new run from it instead).
FIXED_ON_RESUME = ("train.stage", "train.adapters", "train.rl_fake_score", "student.etm_lora", "student.sdd_lora")


def _check_fixed_on_resume(saved: DictConfig, cfg: DictConfig, run_dir: Path) -> None:
    for key in FIXED_ON_RESUME:
        before, now = _plain(OmegaConf.select(saved, key)), _plain(OmegaConf.select(cfg, key))
        if before != now:
            raise ConfigError(f"key '{key}': run {run_dir} trained with {before!r}, this resume sets {now!r}; its "
                              f"checkpoint holds that run's weights and optimizer state (to change it, start a new "
                              f"run with train.init_from={run_dir})")


def _plain(value):
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
