"""Algorithm 1 of the paper: streaming generation with KV caches, one latent frame at a time.

For every chunk f: c_f comes from the ETM cache (window of w chunks), x_f is denoised from noise with
the few-step schedule by the SDD attending to cached x_0 and x_{f-1}; then x_f's clean K/V go into
both caches. The caches are allocated once, so time and memory per chunk do not depend on f, and the
frame count is unbounded (`num_frames=None` streams for ever).

`kv_cache=False` computes the same quantities without caches — the ETM over the whole history, the
SDD over [x_0, x_{f-1}, x_f] — which is what the cache must equal (and what it saves).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from gd_train.flow import euler_step, few_step_sigmas
from gd_train.model.student import GreedyDistillStudent


@dataclass
class StreamSettings:
    height: int  # latent height
    width: int  # latent width
    sigmas: list[float]  # decreasing, ending at 0
    guidance_scale: float = 1.0
    kv_cache: bool = True

    @classmethod
    def from_config(cls, cfg, kv_cache: bool = True, steps=None) -> "StreamSettings":
        from gd_train.config import latent_shape

        _, _, h, w = latent_shape(cfg, 1)
        step_list = list(steps) if steps is not None else list(cfg.student.denoising_steps)
        return cls(height=h, width=w, sigmas=few_step_sigmas(step_list, cfg.student.flow_shift),
                   guidance_scale=float(cfg.student.guidance_scale), kv_cache=kv_cache)


class StreamingGenerator:
    def __init__(self, student: GreedyDistillStudent, settings: StreamSettings):
        self.student = student
        self.s = settings

    @torch.no_grad()
    def stream(self, prompt_embeds: torch.Tensor, num_frames: Optional[int], seed: int,
               negative_embeds: Optional[torch.Tensor] = None) -> Iterator[torch.Tensor]:
        """Yields x_0, x_1, ... as (B, C, 1, H, W) latents; `num_frames=None` never stops."""
        if num_frames is not None and num_frames < 1:
            raise ValueError(f"num_frames: expected >= 1 (or None for an endless stream), got {num_frames}")
        student = self.student
        guided = self.s.guidance_scale != 1.0
        if guided and negative_embeds is None:
            raise ValueError("guidance_scale != 1 needs negative prompt embeddings (Wan's negative prompt)")
        text = torch.cat([prompt_embeds, negative_embeds]) if guided else prompt_embeds
        text = text.to(student.device_, student.dtype)
        B = prompt_embeds.shape[0]
        C = student.transformer.config.in_channels
        gen = torch.Generator(device="cpu").manual_seed(seed)
        doubled = (lambda x: torch.cat([x, x])) if guided else (lambda x: x)  # noqa: E731

        if self.s.kv_cache:
            etm_cache, sdd_cache = student.new_caches(text.shape[0], self.s.height, self.s.width)
        history: list[torch.Tensor] = []  # only without cache
        cond = None
        f = 0
        while num_frames is None or f < num_frames:
            noise = torch.randn(B, C, 1, self.s.height, self.s.width, generator=gen)
            x = noise.to(student.device_, student.dtype)
            for sigma, sigma_next in zip(self.s.sigmas[:-1], self.s.sigmas[1:]):
                if self.s.kv_cache:
                    v = student.sdd_velocity_step(doubled(x), sigma, f, cond, sdd_cache, text)
                else:
                    first = history[0] if history else None
                    prev = history[-1] if history else None
                    v = student.sdd_recompute(first, prev, doubled(x), sigma, f, cond, text)
                if guided:
                    v_cond, v_uncond = v.chunk(2)
                    v = v_uncond + self.s.guidance_scale * (v_cond - v_uncond)
                x = euler_step(x, v, sigma, sigma_next)
            yield x

            clean = doubled(x)
            if self.s.kv_cache:
                student.sdd_context_step(clean, f, sdd_cache, text)
                cond = student.etm_step(clean, f, etm_cache, text)
            else:
                history.append(clean)
                cond = student.etm_recompute(torch.cat(history, dim=2), text)
            f += 1

    def generate(self, prompt_embeds: torch.Tensor, num_frames: int, seed: int,
                 negative_embeds: Optional[torch.Tensor] = None) -> torch.Tensor:
        """All frames at once: (B, C, num_frames, H, W)."""
        return torch.cat(list(self.stream(prompt_embeds, num_frames, seed, negative_embeds)), dim=2)
