"""The training loop shared by stage 1 and stage 2: one DeepSpeed engine, one process per rank.

Each rank is started by torchrun (through `launch/`, as `gd-train` and the SLURM scripts do):

    python -m gd_train.train.trainer --run-dir RUN --stage stage1 --config FILE [KEY=VALUE ...]
    python -m gd_train.train.trainer --run-dir RUN --resume [KEY=VALUE ...]

`Trainer` reads top to bottom: `__init__` sets up (config checks, process group, data, student,
objective, DeepSpeed engine, optional resume); `run()` is the loop — per optimizer step: the
step's data (one clip length on every rank, `gd_train.data.reader`), the shared draw, that length's
accumulation micro-steps (forward, one all-reduce for the global loss and the finiteness check,
backward), logs, sample videos, the pre-emption agreement and the checkpoint.
See docs/training.md for the objectives, the run folder and the pre-emption protocol.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from omegaconf import DictConfig

from gd_train import checkpoint, distributed
from gd_train.config import ConfigError, to_yaml
from gd_train.data.reader import Batch, ShardReader, StepBatches
from gd_train.metrics import Metrics, memory_gib, truncate_jsonl
from gd_train.model.student import GreedyDistillStudent
from gd_train.train.host_memory import fix_mmap_threshold
from gd_train.train.objectives import build_objective, derive_seed
from gd_train.train.optim import build_optimizer, build_scheduler
from gd_train.train.plan import CONFIG_FILE, PREEMPTED_FILE, BatchPlan, load_run_config, validate_train_config

NEGATIVE_EMBEDS_FILE = "negative_prompt_embeds.safetensors"
TRACE_DIR = "trace"

EXIT_ABORTED = 3  # too many consecutive non-finite losses
SIGTERM_GRACE_S = float(os.environ.get("GD_TRAIN_SIGTERM_GRACE_S", "60"))  # to checkpoint after SIGTERM

log = logging.getLogger("gd_train.train")


class TrainingAborted(RuntimeError):
    pass


@dataclass
class RunState:
    step: int = 0  # optimizer steps completed
    epoch: int = 0  # epoch of the last micro-batch read
    samples_seen: int = 0
    skipped_micro_steps: int = 0  # non-finite losses, in total
    consecutive_bad: int = 0


class StopRequest:
    """SIGUSR1 (SLURM's warning before the time limit) or SIGTERM (pre-emption, scancel) → checkpoint at
    the next step boundary and exit cleanly. Ranks receive signals at different moments, so the
    decision is an all-reduce: every rank stops after the same step.

    Installed before the data loader forks its workers: they inherit this handler (which only sets a
    flag) instead of dying on a signal sent to the whole process group."""

    def __init__(self) -> None:
        self.signal_name: Optional[str] = None
        self._deadline: Optional[threading.Timer] = None
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name
        if signum == signal.SIGTERM and self._deadline is None:
            # torchrun also sends SIGTERM to the surviving ranks when one rank fails; a rank blocked in a
            # collective with a dead peer never reaches a step boundary, so SIGTERM carries a deadline.
            self._deadline = threading.Timer(SIGTERM_GRACE_S, os._exit, args=(128 + signal.SIGTERM,))
            self._deadline.daemon = True
            self._deadline.start()

    def agreed(self) -> bool:
        return distributed.all_reduce([1.0 if self.signal_name else 0.0], op="max")[0] > 0


# --------------------------------------------------------------------------------------------------
class Trainer:
    """One rank of a run: everything is set up in `__init__`, `run()` is the loop."""

    def __init__(self, cfg: DictConfig, run_dir: Path, resume: bool):
        self.cfg, self.run_dir = cfg, run_dir
        self.stop = StopRequest()
        self.dist = dist = distributed.init()
        validate_train_config(cfg)
        fix_mmap_threshold(cfg.train.cpu_mmap_threshold, dist.device)  # before the base is loaded
        self.plan = BatchPlan.from_config(cfg.train, dist.world_size)
        _seed_everything(cfg.seed)  # identical LoRA initialisation on every rank
        _prepare_run_dir(cfg, run_dir, resume, write=dist.is_main)
        distributed.barrier()

        self.reader = ShardReader.from_config(cfg, rank=dist.rank, world_size=dist.world_size,
                                              gather=distributed.all_gather_object,
                                              global_batch_size=self.plan.global_batch_size)
        self.total_steps = self.plan.total_steps(self.reader.steps_per_epoch(), cfg.train.epochs, cfg.train.max_steps)
        if self.total_steps < 1:
            raise ConfigError(f"key 'data.shards': {self.reader.steps_per_epoch()} steps per epoch x "
                              f"{cfg.train.epochs} epochs is not one optimizer step")

        self.student = GreedyDistillStudent.from_config(cfg, device=dist.device)
        if cfg.train.init_from is not None:
            self.student.load_adapters(checkpoint.adapters_folder(cfg.train.init_from))
        self.fingerprint = checkpoint.base_fingerprint(self.student)
        self.objective = build_objective(cfg, self.student, _negative_embeds(cfg, run_dir, dist))
        optimizer = build_optimizer(self.student, cfg.train)
        self.engine = _deepspeed_engine(cfg, self.plan, self.objective, optimizer,
                                        build_scheduler(optimizer, cfg.train, self.total_steps))

        self.state = _restore(self.engine, self.reader, run_dir, self.fingerprint, dist.world_size) if resume else RunState()
        self.metrics = Metrics(run_dir, enabled=dist.is_main, resumed_step=self.state.step)
        self.trace = _Trace(run_dir, dist.rank, enabled=bool(cfg.train.trace), resumed_step=self.state.step)
        self.interval = _Interval()
        self.last_batch: Optional[Batch] = None
        self.checkpointing: Optional[bool] = None  # activation checkpointing, set per step by its length
        self.saved_step = self.state.step
        self.evaluation = None
        if cfg.train.eval_every:  # held-out samples, read once (gd_train/eval/evaluators.py)
            from gd_train.eval.evaluators import Evaluation

            self.evaluation = Evaluation(cfg)
        self._say(f"{cfg.train.stage} on {dist.world_size} rank(s), {self.total_steps} steps, "
                  f"{self.reader.steps_per_epoch()} per epoch; {_describe_buckets(self.reader)}; "
                  f"{'resuming after step ' + str(self.state.step) if resume else 'fresh start'}")

    # ----------------------------------------------------------------------------------------------
    def run(self) -> None:
        state = self.state
        steps = _steps(self.reader, self.cfg.train.epochs)
        if self.evaluation is not None and state.step == 0:
            self._evaluate(0)  # the untrained student, the reference every later evaluation is read against
        while state.step < self.total_steps:
            step = state.step + 1
            step_start = time.perf_counter()
            work = next(steps, None)  # this rank's share of the step: one clip length on every rank
            self.interval.data_wait_s += time.perf_counter() - step_start
            if work is None:  # cannot happen with total_steps from the plan; kept for a clear message
                self._say(f"data of {self.cfg.train.epochs} epoch(s) exhausted after step {state.step}")
                if state.step > self.saved_step:
                    self._checkpoint("final")
                break
            draw = self.objective.draw(step, work.latent_frames)  # stage 2: (f, t) from rank 0, for the whole step
            self._set_checkpointing(work.latent_frames)
            losses, tokens = self._accumulate(work, step, draw)
            samples = self.reader.batches[work.latent_frames].samples_per_step
            state.step, state.samples_seen = step, state.samples_seen + samples
            self.interval.add_step(losses, time.perf_counter() - step_start, samples, work.latent_frames, tokens)

            if step % self.cfg.train.log_every == 0 or step == self.total_steps:
                self._log(draw)
            if self.cfg.train.video_every and step % self.cfg.train.video_every == 0:
                _log_sample_video(self.metrics, self.cfg, self.student, self.last_batch, step)
            if self.evaluation is not None and (step % self.cfg.train.eval_every == 0 or step == self.total_steps):
                self._evaluate(step)
            stop_now = self.stop.agreed()  # SIGUSR1/SIGTERM on any rank: checkpoint this step, exit
            if step % self.cfg.train.checkpoint_every == 0 or stop_now or step == self.total_steps:
                self._checkpoint("preempted" if stop_now else "final" if step == self.total_steps else "periodic")
            if stop_now and step < self.total_steps:
                self._record_preemption(step)
                break
        else:
            self._say(f"finished {state.step} steps; latest checkpoint {checkpoint.latest_tag(self.run_dir)}")
        self.metrics.close()
        self.trace.close()
        distributed.barrier()

    def _accumulate(self, work: StepBatches, step: int, draw) -> tuple[list[float], int]:
        """Forward and backward over the step's micro-batches; the optimizer steps after the last one.
        The accumulation is the step's length's (gd_train.data.buckets), so the boundary and the loss
        scale are set here rather than from DeepSpeed's fixed gradient_accumulation_steps. Returns the
        micro-batches' global mean losses (none for a skipped one) and the step's tokens (all ranks)."""
        losses, tokens, count = [], 0, len(work.micro_batches)
        self.state.epoch = work.epoch
        for micro, batch in enumerate(work.micro_batches):
            self.last_batch = batch
            self.engine.set_gradient_accumulation_boundary(micro == count - 1)
            # The micro-batch's noise is a function of its samples, not of where it runs: a run resumed on
            # another world size (micro-batch 1) draws the same noise for the same sample at the same step.
            seed = derive_seed("micro-step", self.cfg.seed, step, *batch.keys)
            loss = self.engine(**self.objective.inputs(batch, draw, seed))
            # One all-reduce gives the global loss and whether any rank's is NaN/inf: the ranks skip together.
            finite = bool(torch.isfinite(loss.detach()).item())
            loss_sum, bad_ranks = distributed.all_reduce([float(loss.detach()) if finite else 0.0, float(not finite)])
            self.trace.write(step=step, micro=micro, epoch=work.epoch, frames=work.latent_frames, keys=batch.keys,
                             loss=float(loss.detach()), skipped=bad_ranks > 0, draw=draw)
            if bad_ranks > 0:
                _skip_non_finite(self.state, self.cfg, step, bad_ranks)
                loss = self._zero_gradient_loss(batch, draw, seed, step)
            else:
                self.state.consecutive_bad = 0
                losses.append(loss_sum / self.dist.world_size)
            self.engine.backward(loss / count, scale_wrt_gas=False)
            self.engine.step()
            tokens += self.objective.tokens_per_sample(batch, draw) * len(batch.keys) * self.dist.world_size
        return losses, tokens

    def _zero_gradient_loss(self, batch: Batch, draw, seed: int, step: int):
        """A skipped micro-batch still takes its place in the step — every rank's backward must run for
        ZeRO's gradient reduction at the boundary — with a gradient of exactly zero: the same pass on
        inputs made finite, times 0. If even that is not finite the weights themselves are broken."""
        clean = Batch(torch.nan_to_num(batch.latents, nan=0.0, posinf=0.0, neginf=0.0),
                      torch.nan_to_num(batch.prompt_embeds, nan=0.0, posinf=0.0, neginf=0.0), batch.keys, batch.captions)
        loss = self.engine(**self.objective.inputs(clean, draw, seed)) * 0.0
        if distributed.all_reduce([float(not torch.isfinite(loss.detach()).item())])[0] > 0:
            raise TrainingAborted(f"step {step}: the loss is not finite even on finite inputs (diverged weights?); "
                                  f"the last complete checkpoint is {checkpoint.latest_tag(self.cfg.output_dir) or 'none'}")
        return loss

    def _set_checkpointing(self, latent_frames: int) -> None:
        """Activation checkpointing for this step: on at every length (`gradient_checkpointing`), or
        from a length on (`gradient_checkpointing_min_frames`)."""
        threshold = self.cfg.student.gradient_checkpointing_min_frames
        wanted = bool(self.cfg.student.gradient_checkpointing) or (threshold is not None and latent_frames >= threshold)
        if wanted != self.checkpointing:
            self.student.set_gradient_checkpointing(wanted)
            self.checkpointing = wanted

    def _log(self, draw) -> None:
        _log_step(self.metrics, self.engine, self.objective, self.interval, self.state, draw, self.total_steps,
                  _data_scalars(self.reader))
        self.interval = _Interval()

    def _evaluate(self, step: int) -> None:
        """Score the held-out samples (every rank takes part; see gd_train/eval/evaluators.py) and log
        eval/ scalars and the first sample's stream as a video."""
        start = time.perf_counter()
        loss_fn = None
        if self.cfg.train.stage == "stage1":
            def loss_fn(sample, text, seed):  # Eq. (6) on a held-out clip, with its own fixed noise
                return float(self.objective(latents=sample.latents.float()[None], prompt_embeds=text, seed=seed))
        negative = None
        if self.cfg.student.guidance_scale != 1.0:
            from safetensors.torch import load_file

            negative = load_file(str(self.run_dir / NEGATIVE_EMBEDS_FILE))["negative_prompt_embeds"].to(self.dist.device)
        was_training = self.student.training
        self.student.eval()
        with checkpoint.gathered(list(self.student.parameters())):
            result = self.evaluation.run(self.student, loss_fn=loss_fn, negative_embeds=negative)
        self.student.train(was_training)
        self.metrics.log(step, {**result.scalars, "throughput/eval_seconds": time.perf_counter() - start})
        if self.metrics.enabled and result.first_stream is not None:
            frames = self.evaluation.evaluator.video(result.first_stream, self.cfg)
            self.metrics.log_video("eval/sample", frames, step, fps=int(self.cfg.video.fps))
            self.metrics.log_text("eval/sample_caption", result.first_caption, step)
        self._say(f"eval at step {step}: " + ", ".join(f"{k[5:]} {v:.4f}" for k, v in result.scalars.items())
                  + f" ({time.perf_counter() - start:.1f} s)")

    def _checkpoint(self, reason: str) -> None:
        _save(self.engine, self.student, self.run_dir, self.cfg, self.state, self.reader, self.fingerprint,
              self.dist.world_size, reason)
        self.saved_step = self.state.step

    def _record_preemption(self, step: int) -> None:
        if self.dist.is_main:
            _write_json(self.run_dir / PREEMPTED_FILE, {"step": step, "signal": self.stop.signal_name,
                                                        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        self._say(f"{self.stop.signal_name} received; checkpoint {checkpoint.tag_for(step)} saved, exiting "
                  f"(continue with `gd-train resume {self.run_dir}`)")

    def _say(self, text: str) -> None:
        if self.dist.is_main:
            print(f"gd-train: {text}", flush=True)


def train(cfg: DictConfig, run_dir: Path, resume: bool) -> int:
    Trainer(cfg, run_dir, resume).run()
    return 0


# --------------------------------------------------------------------------------------------------
# Set-up
# --------------------------------------------------------------------------------------------------
def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _prepare_run_dir(cfg: DictConfig, run_dir: Path, resume: bool, write: bool) -> None:
    """Checked on every rank (a refusal on rank 0 alone would leave the others waiting); written by one."""
    if not resume and checkpoint.latest_tag(run_dir) is not None:
        raise ConfigError(f"key 'output_dir': {run_dir} already holds a run (checkpoint "
                          f"{checkpoint.latest_tag(run_dir)}); continue it with `gd-train resume {run_dir}` or "
                          f"choose another output_dir")
    if write:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / CONFIG_FILE).write_text(to_yaml(cfg))
        (run_dir / PREEMPTED_FILE).unlink(missing_ok=True)


def _negative_embeds(cfg: DictConfig, run_dir: Path, dist) -> Optional[torch.Tensor]:
    """Wan's negative prompt encoded once per run (rank 0, with the configured text encoder) and read by
    every rank; needed only where classifier-free guidance runs."""
    needed = cfg.student.guidance_scale != 1.0 or (cfg.train.stage == "stage2" and cfg.train.teacher_guidance_scale != 1.0)
    if not needed:
        return None
    from safetensors.torch import load_file, save_file

    path = run_dir / NEGATIVE_EMBEDS_FILE
    if dist.is_main and not path.is_file():
        from gd_train.model.backbone import PromptEncoder

        encoder = PromptEncoder(cfg, device=dist.device)
        embeds = encoder.encode_padded([cfg.student.negative_prompt]).float().cpu()
        del encoder
        tmp = path.with_name(path.name + ".tmp")
        save_file({"negative_prompt_embeds": embeds.contiguous()}, str(tmp))
        os.replace(tmp, path)
    distributed.barrier()
    return load_file(str(path))["negative_prompt_embeds"].to(dist.device)


DEEPSPEED_REDUCE_BUCKET = 500_000_000  # DeepSpeed's default reduce_bucket_size (elements)


def deepspeed_config(cfg: DictConfig, plan: BatchPlan, trainable_numel: Optional[int] = None) -> dict:
    """DeepSpeed runs in fp32: the frozen base runs in `model.dtype` (bf16 on the GPU configs), while the
    weights that train — LoRA (PEFT keeps adapters in fp32 on a bf16 base) and c_f — and their AdamW
    states are fp32 already, so no bf16/fp16 mode is configured and Wan's fp32-only modules stay fp32.
    (DeepSpeed still keeps its own fp32 copy of each rank's partition of them: the census in BENCHMARKS.md.)"""
    train = cfg.train
    zero: dict = {"stage": int(train.zero_stage), "contiguous_gradients": True}
    # The gradient bucket is allocated whole (ZeRO-3: once, for the run; ZeRO-2: each micro-step): at
    # DeepSpeed's 5e8 fp32 elements that is 1.9 GiB per rank, while only the trainable weights' gradients
    # ever go in (1.75e8 at 1.3B with rank-64 adapters). A bucket of exactly those never fills before the
    # end of backward either, so the reductions are the same ones, without the unused 1.2 GiB.
    if trainable_numel is not None:
        zero["reduce_bucket_size"] = max(1, min(DEEPSPEED_REDUCE_BUCKET, int(trainable_numel)))
    if train.zero_stage == 3:
        zero["stage3_param_persistence_threshold"] = int(train.zero3_param_persistence_threshold)
        # DeepSpeed's defaults (1e9 elements each) suit a model that trains whole. Here the frozen base
        # runs 2 passes forward + their recompute and backward per step; with a reuse distance of 1e9 a
        # block used again within 1e9 elements stays gathered, so most of a 1.4B base lived gathered next
        # to its partition, more than ZeRO-2 holds. One block gathered (+ one prefetched) at a time.
        block = zero3_block_numel(cfg)
        live, reuse = train.zero3_max_live_parameters, train.zero3_max_reuse_distance
        zero["stage3_max_live_parameters"] = int(live) if live is not None else 2 * block
        zero["stage3_max_reuse_distance"] = int(reuse) if reuse is not None else block
        zero["stage3_prefetch_bucket_size"] = min(block, zero["stage3_max_live_parameters"])
    return {
        "train_batch_size": plan.global_batch_size,
        "train_micro_batch_size_per_gpu": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.accumulation_steps,
        "gradient_clipping": float(train.grad_clip),
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # a plain torch AdamW (see gd_train.train.optim)
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "checkpoint": {"tag_validation": "FAIL"},
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }


def zero3_block_numel(cfg: DictConfig) -> int:
    """Elements of one transformer block's adapted linears (q/k/v/out of both attentions, the FFN)."""
    from gd_train.config import transformer_arch

    arch = transformer_arch(cfg)
    dim = int(arch["num_attention_heads"]) * int(arch["attention_head_dim"])
    return 8 * dim * dim + 2 * dim * int(arch["ffn_dim"])


def _deepspeed_engine(cfg, plan, objective, optimizer, scheduler):
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    warning = zero3_warning(cfg, objective.student, plan.world_size) if int(cfg.train.zero_stage) == 3 else None
    trainable = sum(p.numel() for group in optimizer.param_groups for p in group["params"])
    engine, _, _, _ = deepspeed.initialize(model=objective, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(cfg, plan, trainable))
    if warning and distributed.rank() == 0:
        print(f"gd-train: warning: {warning}", flush=True)
    return engine


def zero3_warning(cfg: DictConfig, student, world_size: int) -> str:
    """Why ZeRO-3 rarely pays here: what trains (LoRA + c_f) is small and ZeRO-2 shards its optimizer
    state already; ZeRO-3 only adds sharding of the frozen base, at an all-gather per block per pass."""
    base = sum(p.numel() * p.element_size() for p in student.base_parameters().values())
    saved = base * (1 - 1 / max(world_size, 1))
    return (f"train.zero_stage=3 with a frozen base: only LoRA and c_f train (ZeRO-2 shards their optimizer "
            f"state already), so ZeRO-3 can save at most {saved / 2**30:.2f} GiB of base weights per rank on "
            f"{world_size} rank(s), and gathers every block again in each forward, recompute and backward; at "
            f"1.3B on 2 CPU ranks it held 0.6 GiB fewer tensors than ZeRO-2 but no lower peak, at 2.6x the step "
            f"time (BENCHMARKS.md, 'ZeRO-2 vs ZeRO-3'). Prefer train.zero_stage=2 unless the base itself does "
            f"not fit one device")


def _restore(engine, reader: ShardReader, run_dir: Path, fingerprint: str, world_size: int) -> RunState:
    folder = checkpoint.resolve(run_dir)
    manifest, rank_state = checkpoint.load(engine, folder, world_size)
    if manifest.base_fingerprint != fingerprint:
        raise checkpoint.CheckpointError(
            f"checkpoint {folder}: trained on other base weights (fingerprint {manifest.base_fingerprint[:12]}, "
            f"now {fingerprint[:12]}); check pretrained_path / model.init_seed in {run_dir / CONFIG_FILE}")
    reader.load_state_dict(rank_state["reader"])
    return RunState(step=manifest.step, epoch=manifest.epoch, samples_seen=manifest.samples_seen,
                    skipped_micro_steps=manifest.skipped_micro_steps)


# --------------------------------------------------------------------------------------------------
# The loop's pieces
# --------------------------------------------------------------------------------------------------
def _steps(reader: ShardReader, epochs: int) -> Iterator[StepBatches]:
    """One stream of steps over the epochs, continuing from the reader's position."""
    for epoch in range(reader.state_dict()["epoch"], epochs):
        yield from reader.steps(epoch)


def _describe_buckets(reader: ShardReader) -> str:
    """Per length: steps per epoch and the step's shape (micro-batch x accumulation x ranks)."""
    steps = reader.stats["bucket_steps"]
    return ", ".join(f"F={f}: {steps.get(f, 0)} steps of {b.samples_per_step} ({b.micro_batch_size} x "
                     f"{b.accumulation_steps} x {b.world_size})" for f, b in sorted(reader.batches.items()))


def _skip_non_finite(state: RunState, cfg: DictConfig, step: int, bad_ranks: float) -> None:
    state.skipped_micro_steps += 1
    state.consecutive_bad += 1
    if distributed.rank() == 0:
        print(f"gd-train: step {step}: non-finite loss on {int(bad_ranks)} rank(s); micro-batch skipped on every rank "
              f"({state.consecutive_bad} in a row, {state.skipped_micro_steps} in total)", flush=True)
    if state.consecutive_bad >= cfg.train.max_bad_steps:
        raise TrainingAborted(
            f"step {step}: {state.consecutive_bad} consecutive non-finite losses (train.max_bad_steps="
            f"{cfg.train.max_bad_steps}); aborting — check the data (NaN/inf latents?) and train.lr; the last "
            f"complete checkpoint is {checkpoint.latest_tag(cfg.output_dir) or 'none'}")


@dataclass
class _Interval:
    """Sums over the steps since the last log line."""

    steps: int = 0
    loss_sum: float = 0.0
    loss_count: int = 0  # micro-batches with a finite loss
    time_s: float = 0.0
    data_wait_s: float = 0.0
    samples: int = 0
    tokens: int = 0
    by_length: dict = field(default_factory=dict)  # latent frames -> [steps, seconds, samples, tokens]

    def add_step(self, losses: list[float], step_time_s: float, samples: int, latent_frames: int, tokens: int) -> None:
        self.steps += 1
        self.loss_sum += sum(losses)
        self.loss_count += len(losses)
        self.time_s += step_time_s
        self.samples += samples
        self.tokens += tokens
        sums = self.by_length.setdefault(latent_frames, [0, 0.0, 0, 0])
        for i, value in enumerate((1, step_time_s, samples, tokens)):
            sums[i] += value

    def length_scalars(self) -> dict[str, float]:
        """Throughput per clip length (this rank's clock: every rank runs the same steps in lockstep)."""
        out = {}
        for frames, (steps, seconds, samples, tokens) in sorted(self.by_length.items()):
            out[f"throughput_by_length/F{frames}/samples_per_s"] = samples / seconds
            out[f"throughput_by_length/F{frames}/tokens_per_s"] = tokens / seconds
            out[f"throughput_by_length/F{frames}/steps"] = float(steps)
        return out


def _data_scalars(reader: ShardReader) -> dict[str, float]:
    """The reader's damage counters as `data/...` scalars, summed over ranks (a collective). Shards left
    out at start and the dropped tail are the same on every rank: rank 0's value."""
    stats = reader.stats
    summed = distributed.all_reduce([float(stats[k]) for k in ("corrupt_samples", "repeated_samples", "broken_shards")])
    return {"data/corrupt_samples": summed[0], "data/repeated_samples": summed[1], "data/broken_shards": summed[2],
            "data/skipped_shards": float(stats["skipped_shards"]),
            "data/excluded_samples": float(stats["excluded_samples"]),  # strict mode's scan, whole data set
            "data/dropped_tail_samples": float(stats["dropped_tail_samples"]),
            **{f"data/bucket_steps_per_epoch/F{f}": float(n) for f, n in stats["bucket_steps"].items()}}


def _log_step(metrics: Metrics, engine, objective, interval: _Interval, state: RunState, draw, total_steps: int,
              data: dict[str, float]) -> None:
    # Throughput and memory: the slowest / largest rank is what limits the run.
    time_s, wait_s, *memory = distributed.all_reduce(
        [interval.time_s, interval.data_wait_s, *memory_gib().values()], op="max")
    grad_norm = engine.get_global_grad_norm()
    scalars = {
        "optimisation/lr": float(engine.get_lr()[0]),
        "optimisation/grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
        "optimisation/skipped_micro_steps": float(state.skipped_micro_steps),
        "throughput/samples_per_s": interval.samples / time_s,
        "throughput/tokens_per_s": interval.tokens / time_s,
        "throughput/step_time_s": time_s / interval.steps,
        "throughput/data_wait_fraction": min(1.0, wait_s / time_s),
        "progress/epoch": float(state.epoch),
        "progress/samples_seen": float(state.samples_seen),
    }
    if interval.loss_count:  # none when every micro-batch since the last line was skipped (non-finite)
        scalars[objective.loss_tag] = interval.loss_sum / interval.loss_count
    scalars.update(dict(zip(memory_gib().keys(), memory)))
    scalars.update(interval.length_scalars())
    scalars.update(data)
    if draw is not None:
        scalars.update({"rl/f": float(draw.frame), "rl/t": float(draw.timestep)})
        scalars.update({f"rl/{k}": v for k, v in objective.last_stats.items()})
    metrics.log(state.step, scalars)
    if metrics.enabled:
        print(f"step {state.step}/{total_steps} loss {scalars.get(objective.loss_tag, float('nan')):.6f} lr {scalars['optimisation/lr']:.3e} "
              f"grad_norm {scalars['optimisation/grad_norm']:.4f} {scalars['throughput/samples_per_s']:.2f} samples/s "
              f"data_wait {scalars['throughput/data_wait_fraction']:.2%}"
              + (f" f={draw.frame} t={draw.timestep}" if draw is not None else ""), flush=True)


def _log_sample_video(metrics: Metrics, cfg: DictConfig, student: GreedyDistillStudent, batch: Batch, step: int) -> None:
    """Stream a clip for the last batch's first prompt (Algorithm 1) and log it decoded by the VAE. Every
    rank generates; rank 0 logs. Outside the engine's forward ZeRO-3 does not gather parameters on
    access, so the whole student is gathered for it (the full weights: what ZeRO-2 holds all the time)."""
    from gd_train.infer.stream import StreamingGenerator, StreamSettings

    negative = None
    if cfg.student.guidance_scale != 1.0:
        from safetensors.torch import load_file

        negative = load_file(str(Path(cfg.output_dir) / NEGATIVE_EMBEDS_FILE))["negative_prompt_embeds"].to(student.device_)
    generator = StreamingGenerator(student, StreamSettings.from_config(cfg))
    with checkpoint.gathered(list(student.parameters())):
        latents = generator.generate(batch.prompt_embeds[:1].to(student.device_), int(cfg.generate.latent_frames),
                                     seed=int(cfg.generate.seed), negative_embeds=negative)
    if metrics.enabled:
        from gd_train.media import decode_latents
        from gd_train.model.backbone import load_vae

        vae = load_vae(cfg).to(student.device_)
        frames = decode_latents(vae, latents.float())[0]
        metrics.log_video("samples/stream", frames, step, fps=int(cfg.video.fps))
        metrics.log_text("samples/caption", batch.captions[0], step)


def _save(engine, student, run_dir: Path, cfg: DictConfig, state: RunState, reader: ShardReader, fingerprint: str,
          world_size: int, reason: str) -> None:
    now = checkpoint.base_fingerprint(student)
    if now != fingerprint:  # DESIGN §3.5: only adapters and c_f train; this would be a bug, not bad input
        raise RuntimeError(f"step {state.step}: the frozen base weights changed (fingerprint {fingerprint[:12]} -> "
                           f"{now[:12]}); refusing to checkpoint")
    manifest = checkpoint.Manifest(tag=checkpoint.tag_for(state.step), step=state.step, epoch=state.epoch,
                                   samples_seen=state.samples_seen, world_size=world_size,
                                   zero_stage=int(cfg.train.zero_stage), stage=str(cfg.train.stage),
                                   base_fingerprint=fingerprint, reason=reason,
                                   skipped_micro_steps=state.skipped_micro_steps)
    checkpoint.save(engine, student, run_dir, manifest, {"reader": reader.state_dict()}, int(cfg.train.keep_last),
                    files={CONFIG_FILE: to_yaml(cfg)})


class _Trace:
    """Per-rank record of what each micro-step saw (`train.trace`): clip length, sample keys, local
    loss, (f, t).
    Used to prove exact resume (no sample twice, none skipped) and the (f, t) agreement."""

    def __init__(self, run_dir: Path, rank: int, enabled: bool, resumed_step: int):
        self.fh = None
        if not enabled:
            return
        path = run_dir / TRACE_DIR / f"rank-{rank:05d}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        truncate_jsonl(path, resumed_step)
        self.fh = open(path, "a", buffering=1)

    def write(self, *, step, micro, epoch, frames, keys, loss, skipped, draw) -> None:
        if self.fh is None:
            return
        record = {"step": step, "micro": micro, "epoch": epoch, "frames": frames, "keys": list(keys),
                  "loss": loss if math.isfinite(loss) else str(loss), "skipped": skipped}
        if draw is not None:
            record.update({"f": draw.frame, "t": draw.timestep})
        self.fh.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------
# Entry point (one per rank)
# --------------------------------------------------------------------------------------------------
def _die_with_parent() -> None:
    """Exit when the per-node launcher dies (even by SIGKILL): torchrun starts workers in their own
    sessions, so neither a killed launcher nor SLURM's process-group tracking would reach them."""
    if sys.platform != "linux":
        return
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gd_train.train.trainer", description="one training rank")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--stage", choices=("stage1", "stage2"))
    p.add_argument("--config")
    p.add_argument("--resume", action="store_true")
    p.add_argument("overrides", nargs="*")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    _die_with_parent()
    args = build_parser().parse_args(argv)
    run_dir = Path(args.run_dir)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.WARNING, format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_run_config(run_dir, args.stage, args.config, args.resume, args.overrides)
        return train(cfg, run_dir, resume=args.resume)
    except (ConfigError, checkpoint.CheckpointError) as exc:
        print(f"gd-train (rank {rank}): error: {exc}", file=sys.stderr, flush=True)
        return 2
    except TrainingAborted as exc:
        print(f"gd-train (rank {rank}): aborted: {exc}", file=sys.stderr, flush=True)
        return EXIT_ABORTED


if __name__ == "__main__":
    sys.exit(main())
