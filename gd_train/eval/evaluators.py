"""Periodic evaluation during training (`train.eval_every`): held-out samples scored by a pluggable
evaluator, identical on every rank count.

The held-out set is the first `train.eval_samples` samples of `data.eval_shards` (shard order, then
stored order): a folder of teacher shards the training reader never reads (the config refuses a
`data.eval_shards` equal to `data.shards`). For every sample, with a seed derived from its key only:
- stage 1: the validation loss — the training objective's Eq. (6) on the held-out clip;
- the student streams `train.eval_frames` latent frames (Algorithm 1) from the sample's prompt;
- the evaluator scores that stream (and may run teacher-forced passes on the held-out clip).

Evaluators (`train.eval_evaluator`):
- `distance`: the student-to-teacher latent distance on held-out teacher samples (MSE over the
  teacher's frames; the real-run evaluator);
- `world`: the synthetic world's exact metrics (gd_train.eval.metrics) on the stream, plus the
  teacher-forced next-frame position error: for each f, the student generates x_f from the held-out
  clip's true x_0..x_{f-1} (c_f from the ETM, few-step SDD), scored against the world's trajectory.

Identical on every rank count: sample i is scored by rank i mod world, each into its own slot of a
vector that one all-reduce sums (every other slot holds exact zeros), and rank 0 averages in sample
order; each sample runs alone (batch 1), so its numbers do not depend on which rank ran it.
"""

from __future__ import annotations

import tarfile
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from omegaconf import DictConfig

from gd_train import distributed
from gd_train.data.reader import discover_shards
from gd_train.data.shards import TeacherSample, decode_sample
from gd_train.eval import metrics, world
from gd_train.flow import euler_step, few_step_sigmas
from gd_train.model.backbone import pad_prompt_embeds


def derive_eval_seed(key: str) -> int:
    import hashlib

    return int.from_bytes(hashlib.sha256(f"eval/{key}".encode()).digest()[:8], "big") >> 1


def read_samples(spec: str, limit: int) -> list[TeacherSample]:
    """The first `limit` samples of a shard folder / pattern, in shard order then stored order."""
    shards, _ = discover_shards(spec)
    out: list[TeacherSample] = []
    for shard in shards:
        members: dict[str, dict] = {}
        order: list[str] = []
        with tarfile.open(shard.path, mode="r:") as tar:
            for member in tar:
                if not member.isreg():
                    continue
                key, ext = member.name.split(".", 1)
                if key not in members:
                    members[key], _ = {"__key__": key, "__url__": shard.path}, order.append(key)
                members[key][ext] = tar.extractfile(member).read()
        for key in order:
            out.append(decode_sample(members[key]))
            if len(out) >= limit:
                return out
    return out


class Evaluator:
    """Scores one held-out sample given the student's stream from its prompt."""

    name = "base"

    def score(self, student, sample: TeacherSample, text: torch.Tensor, stream: torch.Tensor, seed: int) -> dict[str, float]:
        raise NotImplementedError

    def video(self, latents_bcfhw: torch.Tensor, cfg: DictConfig) -> np.ndarray:
        """(T, H, W, 3) uint8 frames of a stream for TensorBoard: decoded by the VAE."""
        from gd_train.media import decode_latents
        from gd_train.model.backbone import load_vae

        return decode_latents(load_vae(cfg), latents_bcfhw.float().cpu())[0]


class TeacherDistance(Evaluator):
    name = "distance"

    def score(self, student, sample, text, stream, seed):
        teacher = sample.latents.float()
        n = min(teacher.shape[1], stream.shape[2])
        return {"teacher_distance": float(((stream[0, :, :n].float().cpu() - teacher[:, :n]) ** 2).mean())}


class WorldMetrics(Evaluator):
    name = "world"

    def __init__(self, sigmas: Sequence[float]):
        self.sigmas = list(sigmas)

    def score(self, student, sample, text, stream, seed):
        spec = world.parse_prompt(sample.caption)
        out = {f"world/{k}": v for k, v in metrics.score_clip(stream, spec).scalars().items()}
        out["world/next_frame_error"] = self.next_frame_error(student, sample, spec, text, seed)
        return out

    @torch.no_grad()
    def next_frame_error(self, student, sample, spec, text, seed, truth=None) -> float:
        """Teacher-forced: x_f generated from the held-out clip's own x_0 .. x_{f-1}, for every f, against
        `truth[f]` ((F, 2) centres; default: the prompt's motion from the clip's measured frame 0, which
        is the truth for a world clip)."""
        clip = sample.latents.float()[None].to(student.device_, student.dtype)  # (1, C, F, H, W)
        truth = metrics.reference_positions(sample.latents, spec) if truth is None else truth
        gen = torch.Generator().manual_seed(seed)
        errors = []
        for f in range(1, clip.shape[2]):
            cond = student.etm_recompute(clip[:, :, :f], text)
            x = torch.randn(clip[:, :, :1].shape, generator=gen).to(student.device_, student.dtype)
            for sigma, sigma_next in zip(self.sigmas[:-1], self.sigmas[1:]):
                v = student.sdd_recompute(clip[:, :, :1], clip[:, :, f - 1:f], x, sigma, f, cond, text)
                x = euler_step(x, v, sigma, sigma_next)
            errors.append(metrics.next_frame_error(x[0], spec, truth[f]))
        return float(np.mean(errors))

    def video(self, latents_bcfhw, cfg):
        """The two kinds' signature channels as red and blue, 8x enlarged (the world has no pixels)."""
        x = latents_bcfhw[0].float().cpu()
        rgb = torch.zeros(x.shape[1], x.shape[2], x.shape[3], 3)
        rgb[..., 0] = x[list(world.KINDS["red"])].mean(0)
        rgb[..., 2] = x[list(world.KINDS["blue"])].mean(0)
        rgb = (rgb / world.AMPLITUDE).clamp(0, 1).repeat_interleave(8, 1).repeat_interleave(8, 2)
        return (rgb * 255).round().to(torch.uint8).numpy()


EVALUATORS = ("distance", "world")


def build_evaluator(cfg: DictConfig) -> Evaluator:
    name = cfg.train.eval_evaluator
    if name == "distance":
        return TeacherDistance()
    if name == "world":
        return WorldMetrics(few_step_sigmas(list(cfg.student.denoising_steps), cfg.student.flow_shift))
    raise ValueError(f"key 'train.eval_evaluator': expected one of {', '.join(EVALUATORS)}, got '{name}'")


@dataclass
class EvalResult:
    scalars: dict[str, float]  # "eval/..." tags, averaged over the held-out samples
    first_stream: Optional[torch.Tensor]  # the first sample's stream (rank 0 only), for the video
    first_caption: str


class Evaluation:
    """What the trainer holds: the held-out samples (read once) and the evaluator."""

    def __init__(self, cfg: DictConfig, evaluator: Optional[Evaluator] = None):
        self.cfg = cfg
        self.samples = read_samples(str(cfg.data.eval_shards), int(cfg.train.eval_samples))
        if not self.samples:
            raise ValueError(f"key 'data.eval_shards': '{cfg.data.eval_shards}' holds no samples")
        self.evaluator = evaluator or build_evaluator(cfg)
        self.frames = cfg.train.eval_frames

    @torch.no_grad()
    def run(self, student, loss_fn: Optional[Callable[[TeacherSample, torch.Tensor, int], float]] = None,
            negative_embeds: Optional[torch.Tensor] = None) -> EvalResult:
        from gd_train.infer.stream import StreamingGenerator, StreamSettings

        rank, world_size = distributed.rank(), distributed.world_size()
        generator = StreamingGenerator(student, StreamSettings.from_config(self.cfg))
        names: Optional[list[str]] = None
        rows: dict[int, list[float]] = {}
        first_stream = None
        for i, sample in enumerate(self.samples):
            if i % world_size != rank:
                continue
            seed = derive_eval_seed(sample.key)
            text = pad_prompt_embeds([sample.prompt_embeds.float()], int(self.cfg.model.max_text_tokens)).to(
                student.device_, student.dtype)
            values: dict[str, float] = {}
            if loss_fn is not None:
                values["val_loss"] = loss_fn(sample, text, seed)
            frames = int(self.frames) if self.frames else int(sample.latents.shape[1])
            stream = generator.generate(text, frames, seed=seed, negative_embeds=negative_embeds)
            values.update(self.evaluator.score(student, sample, text, stream, seed))
            names = names or list(values)
            rows[i] = [values[n] for n in names]
            if i == 0:
                first_stream = stream
        names = distributed.all_gather_object(names)[0]  # rank 0 always scores sample 0
        width = len(names)
        flat = [0.0] * (width * len(self.samples))
        for i, row in rows.items():
            flat[i * width:(i + 1) * width] = row
        flat = distributed.all_reduce(flat)
        table = np.array(flat, dtype=np.float64).reshape(len(self.samples), width)
        scalars = {f"eval/{n}": float(table[:, j].mean()) for j, n in enumerate(names)}
        return EvalResult(scalars=scalars, first_stream=first_stream, first_caption=self.samples[0].caption)
