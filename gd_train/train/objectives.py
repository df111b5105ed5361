"""The two training objectives, as modules the DeepSpeed engine runs (`engine(**inputs) -> loss`).

Stage 1 — next-chunk fine-tuning, Eq. (6): one teacher-forced parallel pass per clip (every c_f from
one ETM pass, every chunk's velocity from one SDD pass), MSE against ε − x_f averaged over chunks.

Stage 2 — RL fine-tuning, Eq. (10) read as in DESIGN §4 and docs/training.md: roll the student out on
its own predictions up to chunk f (no gradient), take its one-step output μ = x̂0 at step t (gradient
through that step only), re-noise μ, and score it with the teacher (adapters off, CFG) and with the
SDD itself. With s read as velocities, s_real − s_gen ∝ x̂0_gen − x̂0_real, so the loss
MSE(μ, sg[μ − (x̂0_gen − x̂0_real) / normaliser]) moves μ toward the teacher's x̂0 (`dmd_loss`).
With `train.rl_fake_score=critic` x̂0_gen comes from a separate critic adapter instead (copied from the
SDD at the start of stage 2), which trains in the same micro-step by flow matching on the detached μ
(`RLFineTuneLoss.critic_loss`, DMD2's fake-score update).

Every random draw of a micro-step comes from a generator seeded by the trainer with (run seed, rank,
step, micro-step): a resumed run draws exactly what the uninterrupted one did.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from gd_train import distributed
from gd_train.data.reader import Batch
from gd_train.flow import add_noise, few_step_sigmas, predict_x0, shift_sigma, velocity_target
from gd_train.infer.stream import StreamingGenerator, StreamSettings
from gd_train.model.student import CRITIC, GreedyDistillStudent

# DMD's range for the scoring level in the 'uniform' reading (avoids the degenerate ends).
UNIFORM_SCORE_RANGE = (0.02, 0.98)


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from labelled parts, stable across processes (Python's `hash` is salted)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


class _Objective(nn.Module):
    """What the DeepSpeed engine holds: the student plus a loss. Its checkpointed state is only what
    trains — adapter weights and c_f."""

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        """The frozen base is rebuilt from the pretrained weights on load, so it is left out (each
        weight has one name: `student.transformer` is a property, not a second registration)."""
        full = super().state_dict(*args, prefix=prefix, keep_vars=keep_vars)
        kept = type(full)((k, v) for k, v in full.items() if _is_trained_weight(k[len(prefix):]))
        if destination is not None:
            destination.update(kept)
            return destination
        return kept


def _is_trained_weight(name: str) -> bool:
    return ".lora_" in name or name.startswith("student.cf_proj.")


# --------------------------------------------------------------------------------------------------
# Stage 1
# --------------------------------------------------------------------------------------------------
class NextChunkLoss(_Objective):
    """Eq. (6). Flow times are drawn per chunk (each chunk's SDD pass is independent under the block
    mask, so per-chunk times estimate the same expectation with less variance), uniformly and then
    warped by the student's flow shift so that training covers the levels few-step sampling visits."""

    stage = "stage1"
    loss_tag = "loss/stage1_next_chunk"  # its own TensorBoard chart: not comparable with stage 2's loss

    def __init__(self, cfg: DictConfig, student: GreedyDistillStudent):
        super().__init__()
        self.student = student
        self.flow_shift = float(cfg.student.flow_shift)
        self.first_noisy = 0 if cfg.student.train_first_frame else 1
        self.last_stats: dict[str, float] = {}

    def draw(self, step: int, latent_frames: int) -> None:  # nothing shared across ranks in stage 1
        return None

    def inputs(self, batch: Batch, draw: None, seed: int) -> dict:
        return {"latents": batch.latents, "prompt_embeds": batch.prompt_embeds, "seed": seed}

    def tokens_per_sample(self, batch: Batch, draw: None) -> int:
        _, _, frames, h, w = batch.latents.shape
        return frames * self.student.tokens_per_chunk(h, w)

    def forward(self, latents: torch.Tensor, prompt_embeds: torch.Tensor, seed: int) -> torch.Tensor:
        student = self.student
        device, dtype = student.device_, student.dtype
        clip = latents.to(device=device, dtype=torch.float32)  # x_0 .. x_F
        text = prompt_embeds.to(device=device, dtype=dtype)
        targets = clip[:, :, self.first_noisy:]
        B, _, n, _, _ = targets.shape
        gen = _generator(device, seed)
        noise = torch.randn(targets.shape, generator=gen, device=device)
        sigmas = shift_sigma(torch.rand((B, n), generator=gen, device=device), self.flow_shift)
        noisy = add_noise(targets, noise, sigmas[:, None, :, None, None])
        out = student.parallel_forward(clip.to(dtype), noisy.to(dtype), sigmas, text)
        return F.mse_loss(out.velocity.float(), velocity_target(targets, noise))


# --------------------------------------------------------------------------------------------------
# Stage 2
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RLDraw:
    """The (f, t) of one minibatch: chunk f and the index of step t in student.denoising_steps."""

    frame: int
    step_index: int
    timestep: int  # the step's value, e.g. 750


def dmd_loss(mu: torch.Tensor, x0_real: torch.Tensor, x0_gen: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """MSE(μ, sg[μ − (x̂0_gen − x̂0_real) / normaliser]), normaliser = mean |μ − x̂0_real| per sample (DMD).

    Its gradient w.r.t. μ is (x̂0_gen − x̂0_real) / (normaliser · numel / 2): a descent step moves μ
    toward the teacher's x̂0 and away from the generator's own."""
    mu = mu.float()
    with torch.no_grad():
        dims = tuple(range(1, mu.ndim))
        normaliser = (mu - x0_real.float()).abs().mean(dim=dims, keepdim=True).clamp_min(eps)
        target = mu - (x0_gen.float() - x0_real.float()) / normaliser
    return F.mse_loss(mu, target)


class _Guidance:
    """Classifier-free guidance as one doubled batch (conditional first, then the negative prompt)."""

    def __init__(self, text: torch.Tensor, negative: Optional[torch.Tensor], scale: float):
        self.scale = float(scale)
        self.on = self.scale != 1.0
        if self.on and negative is None:
            raise ValueError("guidance scale != 1 needs the negative prompt's embeddings")
        self.text = torch.cat([text, negative.expand_as(text)]) if self.on else text

    def batch(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, x]) if self.on else x

    def combine(self, velocity: torch.Tensor) -> torch.Tensor:
        if not self.on:
            return velocity
        cond, uncond = velocity.chunk(2)
        return uncond + self.scale * (cond - uncond)


class RLFineTuneLoss(_Objective):
    """Eq. (10), DMD-style deterministic policy gradient with the SDD as its own critic (default), or
    with a separately trained critic adapter (`train.rl_fake_score=critic`)."""

    stage = "stage2"
    loss_tag = "loss/stage2_rl"

    def __init__(self, cfg: DictConfig, student: GreedyDistillStudent, negative_embeds: Optional[torch.Tensor]):
        super().__init__()
        self.student = student
        self.seed = int(cfg.seed)
        self.steps = [int(s) for s in cfg.student.denoising_steps]
        self.flow_shift = float(cfg.student.flow_shift)
        self.sigmas = few_step_sigmas(self.steps, self.flow_shift)
        self.score_level = str(cfg.train.rl_score_level)
        self.teacher_scale = float(cfg.train.teacher_guidance_scale)
        self.student_scale = float(cfg.student.guidance_scale)
        # Not a parameter and not saved: recomputed from the prompt text on every start.
        self.register_buffer("negative_embeds", negative_embeds, persistent=False)
        self.rollout = StreamingGenerator(student, StreamSettings.from_config(cfg))
        self.last_stats: dict[str, float] = {}
        # The adapter that scores μ as s_gen: the SDD itself, or the critic. The critic starts as a copy of
        # the SDD as it is now — after train.init_from was loaded, before the optimizer is built; a resume
        # then overwrites it with the checkpoint's — so at step 0 it scores exactly as the SDD does.
        self.fake_adapter = str(cfg.train.rl_fake_score)
        if self.fake_adapter == CRITIC:
            if not student.has_critic:
                raise ValueError("train.rl_fake_score=critic needs a student built with it (it adds the critic adapter)")
            student.init_critic_from_sdd()

    # -- the (f, t) agreement -------------------------------------------------------------------------
    def draw(self, step: int, latent_frames: int) -> RLDraw:
        """Drawn on rank 0 and broadcast, once per minibatch: every rank and every accumulation
        micro-step of the minibatch roll out to the same chunk and take the gradient at the same step
        (the computation graphs — and so ZeRO's collectives — match across ranks). f is drawn from
        1 .. F-1 of the step's clips (x_0 .. x_{F-1}), so a rollout never runs past the clip length the
        step's bucket was generated at."""
        if latent_frames < 2:
            raise ValueError(f"stage 2 needs clips of at least 2 latent frames, the step's have {latent_frames} "
                             f"(set data.min_frames=5 to leave shorter shards out)")
        # With the 'next' reading the last step's next level is clean data, where both scores return
        # μ itself and the loss vanishes: t is drawn from the steps that have a noisy next level.
        usable_steps = len(self.steps) - 1 if self.score_level == "next" else len(self.steps)
        rng = random.Random(derive_seed("rl-draw", self.seed, step))
        frame, step_index = rng.randint(1, latent_frames - 1), rng.randrange(usable_steps)
        frame, step_index = distributed.broadcast_ints([frame, step_index], src=0)
        return RLDraw(frame=frame, step_index=step_index, timestep=self.steps[step_index])

    def inputs(self, batch: Batch, draw: RLDraw, seed: int) -> dict:
        return {"prompt_embeds": batch.prompt_embeds, "frame": draw.frame, "step_index": draw.step_index, "seed": seed}

    def tokens_per_sample(self, batch: Batch, draw: RLDraw) -> int:
        _, _, _, h, w = batch.latents.shape
        return (draw.frame + 1) * self.student.tokens_per_chunk(h, w)

    def score_sigma(self, step_index: int, gen: torch.Generator) -> float:
        if self.score_level == "next":
            return self.sigmas[step_index + 1]
        low, high = UNIFORM_SCORE_RANGE
        u = low + (high - low) * float(torch.rand((), generator=gen, device=gen.device))
        return float(shift_sigma(u, self.flow_shift))

    # -- the loss ---------------------------------------------------------------------------------------
    def forward(self, prompt_embeds: torch.Tensor, frame: int, step_index: int, seed: int) -> torch.Tensor:
        gen = _generator(self.student.device_, seed)
        rollout = self.rollout_to(prompt_embeds, frame, step_index, seed, gen)
        mu = self.one_step(rollout)
        x0_real, x0_gen, sigma_s = self.scores(rollout, mu.detach(), gen)
        with torch.no_grad():
            stats = {"score_sigma": sigma_s, "mu_to_teacher_x0": float((mu - x0_real).abs().mean()),
                     "gen_minus_real_x0": float((x0_gen - x0_real).abs().mean())}
        loss = dmd_loss(mu, x0_real, x0_gen)
        if self.fake_adapter == CRITIC:
            # One backward for both updates. Their gradients are disjoint: the scores above ran without
            # grad, and the critic's inputs (μ, context, c_f) are detached, so the generator's loss reaches
            # only etm/sdd/c_f and the critic's only the critic; one AdamW over both parameter groups is
            # then two simultaneous separate updates — except DeepSpeed's gradient clipping
            # (train.grad_clip), which is global: one norm over both, so a large critic gradient also
            # scales the generator's step down (and vice versa).
            critic = self.critic_loss(rollout, mu.detach(), gen)
            stats["critic_loss"] = float(critic.detach())
            loss = loss + critic
        self.last_stats = stats
        return loss

    def rollout_to(self, prompt_embeds: torch.Tensor, frame: int, step_index: int, seed: int,
                   gen: torch.Generator) -> "Rollout":
        """The student on its own predictions: x_0 .. x_{f-1} by Algorithm 1, then chunk f from noise down
        to level t. No gradient: the policy gradient flows through the last step only."""
        student = self.student
        device, dtype = student.device_, student.dtype
        text = prompt_embeds.to(device=device, dtype=dtype)
        negative = self.negative_embeds.to(dtype).expand_as(text) if self.negative_embeds is not None else None
        guide = _Guidance(text, negative, self.student_scale)
        with torch.no_grad():
            history = self.rollout.generate(text, frame, seed=seed, negative_embeds=negative)  # (B, C, f, H, W)
            first, prev = guide.batch(history[:, :, :1]), guide.batch(history[:, :, -1:])
            cond = student.etm_recompute(guide.batch(history), guide.text)
            B, C, _, H, W = history.shape
            x_t = torch.randn((B, C, 1, H, W), generator=gen, device=device).to(dtype)
            for sigma, sigma_next in zip(self.sigmas[:step_index], self.sigmas[1:step_index + 1]):
                v = guide.combine(student.sdd_recompute(first, prev, guide.batch(x_t), sigma, frame, cond, guide.text))
                x_t = x_t + (sigma_next - sigma) * v
        return Rollout(text=text, negative=negative, guide=guide, history=history, first=first, prev=prev,
                       cond=cond, x_t=x_t, frame=frame, step_index=step_index)

    def one_step(self, r: "Rollout") -> torch.Tensor:
        """μ_θ(x_t^f): the student's x̂0 at level t, with gradient into the SDD, c_f and the ETM."""
        student, guide = self.student, r.guide
        cond = student.etm_recompute(guide.batch(r.history), guide.text)  # c_f on the (detached) rollout
        sigma_t = self.sigmas[r.step_index]
        v = guide.combine(student.sdd_recompute(r.first, r.prev, guide.batch(r.x_t), sigma_t, r.frame, cond, guide.text))
        return predict_x0(r.x_t.float(), v.float(), sigma_t)

    @torch.no_grad()
    def scores(self, r: "Rollout", mu: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(x̂0_real, x̂0_gen, level) of μ re-noised. The teacher sees the whole rolled-out clip
        x_0..x_{f-1}, μ noised at one level (it was trained with one level for all frames) and chunk f is
        read from its prediction; the SDD scores the same noised chunk with its own context."""
        student, guide = self.student, r.guide
        device, dtype = student.device_, student.dtype
        sigma_s = self.score_sigma(r.step_index, gen)
        clip = torch.cat([r.history.float(), mu.float()], dim=2)
        noisy_clip = add_noise(clip, torch.randn(clip.shape, generator=gen, device=device), sigma_s).to(dtype)
        noisy_f = noisy_clip[:, :, -1:]
        teacher = _Guidance(r.text, r.negative, self.teacher_scale)
        timestep = torch.full((teacher.text.shape[0],), sigma_s * 1000.0, device=device)
        v_real = teacher.combine(student.teacher_velocity(teacher.batch(noisy_clip), timestep, teacher.text))[:, :, -1:]
        v_gen = guide.combine(student.sdd_recompute(r.first, r.prev, guide.batch(noisy_f), sigma_s, r.frame, r.cond,
                                                    guide.text, adapter=self.fake_adapter))
        return predict_x0(noisy_f.float(), v_real.float(), sigma_s), predict_x0(noisy_f.float(), v_gen.float(), sigma_s), sigma_s

    def critic_loss(self, r: "Rollout", mu: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """DMD2's fake-score update, as flow matching on the generator's (detached) output: μ noised at a
        level drawn as stage 1 draws them (uniform, warped by the flow shift), the critic's velocity with
        the SDD's detached context (the pass and guidance s_gen uses), MSE against ε − μ. Drawn after the
        scores' draws from the micro-step's generator, so they are unchanged and a resume is exact."""
        student, guide = self.student, r.guide
        device, dtype = student.device_, student.dtype
        mu = mu.detach().float()
        sigma = float(shift_sigma(float(torch.rand((), generator=gen, device=device)), self.flow_shift))
        noise = torch.randn(mu.shape, generator=gen, device=device)
        noisy = add_noise(mu, noise, sigma).to(dtype)
        v = guide.combine(student.sdd_recompute(r.first, r.prev, guide.batch(noisy), sigma, r.frame, r.cond,
                                                guide.text, adapter=CRITIC))
        return F.mse_loss(v.float(), velocity_target(mu, noise))


@dataclass
class Rollout:
    text: torch.Tensor
    negative: Optional[torch.Tensor]
    guide: _Guidance
    history: torch.Tensor  # clean x_0 .. x_{f-1} the student generated, (B, C, f, H, W)
    first: torch.Tensor  # the SDD's context: x_0 ...
    prev: torch.Tensor  # ... and x_{f-1} (doubled under guidance)
    cond: torch.Tensor  # c_f of the rollout, without gradient
    x_t: torch.Tensor  # chunk f at level t, (B, C, 1, H, W)
    frame: int
    step_index: int


def build_objective(cfg: DictConfig, student: GreedyDistillStudent,
                    negative_embeds: Optional[torch.Tensor] = None) -> nn.Module:
    if cfg.train.stage == "stage1":
        return NextChunkLoss(cfg, student)
    return RLFineTuneLoss(cfg, student, negative_embeds)
