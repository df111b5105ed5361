"""Algorithm 1 of the paper: streaming generation with KV caches, one latent frame at a time.

For every chunk f: c_f comes from the ETM cache (window of w chunks), x_f is denoised from noise with
the few-step schedule by the SDD attending to cached x_0 and x_{f-1}; then x_f's clean K/V go into
both caches. The caches are allocated once, so time and memory per chunk do not depend on f, and the
frame count is unbounded (`num_frames=None` streams for ever).

`kv_cache=False` computes the same quantities without caches — the ETM over the whole history, the
SDD over [x_0, x_{f-1}, x_f] — which is what the cache must equal (and what it saves).

Image-to-video: a given x_0 (a VAE-encoded image, normalised like the teacher latents) is yielded as
frame 0 instead of being denoised; every later frame is conditioned on it as usual.

Prompt switches (`PromptSchedule`): from frame s on, the stream runs under the new prompt. Everything
cached under the old one is re-encoded under the new: the prompt's cross-attention K/V, the SDD
context (x_0 and x_{s-1}: 2 context passes) and the ETM window (its last w+1 clean frames x_{s-1-w}..
x_{s-1}, re-run as a fresh window: w+1 single-chunk ETM passes, whose last gives c_s). So a switch
costs w+1 ETM passes and 2 SDD context passes once (w = 3: 6 single-chunk passes, as many as one frame
takes at T = 4), and the caches are reused in place: no memory grows. The ETM's memory of the frames before
that window ends at a switch, in both modes (without cache the ETM history restarts at the window).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
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
    # Run the passes through per-adapter merged weights instead of PEFT's LoRA layers (generation;
    # one extra copy of the adapted weights per adapter: gd_train.model.merged). Training rollouts keep PEFT.
    merged_adapters: bool = False

    @classmethod
    def from_config(cls, cfg, kv_cache: bool = True, steps=None, merged_adapters: bool = False) -> "StreamSettings":
        from gd_train.config import latent_shape

        _, _, h, w = latent_shape(cfg, 1)
        step_list = list(steps) if steps is not None else list(cfg.student.denoising_steps)
        return cls(height=h, width=w, sigmas=few_step_sigmas(step_list, cfg.student.flow_shift),
                   guidance_scale=float(cfg.student.guidance_scale), kv_cache=kv_cache,
                   merged_adapters=merged_adapters)


@dataclass
class PromptSwitch:
    prompt_embeds: torch.Tensor  # (B, tokens, text_dim), padded like the stream's first prompt
    negative_embeds: Optional[torch.Tensor] = None  # None: keep the stream's negative prompt


@dataclass
class PromptSchedule:
    """Latent frame index -> the prompt from that frame on. `switch` may be called while a stream runs
    (between two frames it yields) for any frame not yet generated."""

    switches: dict[int, PromptSwitch] = field(default_factory=dict)
    next_frame: int = 0  # the frame the stream generates next (kept by the stream)

    def switch(self, frame: int, prompt_embeds: torch.Tensor, negative_embeds: Optional[torch.Tensor] = None) -> None:
        if frame < self.next_frame:
            raise ValueError(f"prompt switch at frame {frame}: frames up to {self.next_frame - 1} are already generated")
        self.switches[int(frame)] = PromptSwitch(prompt_embeds, negative_embeds)

    def pop(self, frame: int) -> Optional[PromptSwitch]:
        self.next_frame = frame + 1
        return self.switches.pop(frame, None)


class StreamingGenerator:
    def __init__(self, student: GreedyDistillStudent, settings: StreamSettings):
        self.student = student
        self.s = settings

    @torch.no_grad()
    def stream(self, prompt_embeds: torch.Tensor, num_frames: Optional[int], seed: int,
               negative_embeds: Optional[torch.Tensor] = None, *, first_frame: Optional[torch.Tensor] = None,
               schedule: Optional[PromptSchedule] = None) -> Iterator[torch.Tensor]:
        """Yields x_0, x_1, ... as (B, C, 1, H, W) latents; `num_frames=None` never stops.
        `first_frame`: a given x_0 (B, C, 1, H, W), yielded as is; `schedule`: prompt switches."""
        if num_frames is not None and num_frames < 1:
            raise ValueError(f"num_frames: expected >= 1 (or None for an endless stream), got {num_frames}")
        student = self.student
        student.merged_inference(self.s.merged_adapters)  # (re)merges only if a LoRA weight changed
        guided = self.s.guidance_scale != 1.0
        if guided and negative_embeds is None:
            raise ValueError("guidance_scale != 1 needs negative prompt embeddings (Wan's negative prompt)")

        def stream_text(embeds: torch.Tensor, negative: Optional[torch.Tensor]) -> torch.Tensor:
            if embeds.shape != prompt_embeds.shape:
                raise ValueError(f"prompt switch: embeddings of shape {tuple(embeds.shape)}, the stream's are "
                                 f"{tuple(prompt_embeds.shape)} (pad to model.max_text_tokens)")
            return (torch.cat([embeds, negative]) if guided else embeds).to(student.device_, student.dtype)

        text = stream_text(prompt_embeds, negative_embeds)
        schedule = schedule if schedule is not None else PromptSchedule()
        B = prompt_embeds.shape[0]
        C = student.transformer.config.in_channels
        gen = torch.Generator(device="cpu").manual_seed(seed)
        doubled = (lambda x: torch.cat([x, x])) if guided else (lambda x: x)  # noqa: E731

        if first_frame is not None and tuple(first_frame.shape) != (B, C, 1, self.s.height, self.s.width):
            raise ValueError(f"first_frame: expected a latent frame {(B, C, 1, self.s.height, self.s.width)}, "
                             f"got {tuple(first_frame.shape)}")
        if self.s.kv_cache:
            etm_cache, sdd_cache = student.new_caches(text.shape[0], self.s.height, self.s.width)
        history: list[torch.Tensor] = []  # only without cache: the ETM's clean frames
        window: deque[torch.Tensor] = deque(maxlen=student.window + 1)  # with cache: kept for prompt switches
        x0 = None  # clean x_0, as the SDD context sees it
        etm_origin = 0  # the ETM numbers frames from its last (re)start
        cond = None
        f = 0
        while num_frames is None or f < num_frames:
            switch = schedule.pop(f)
            if switch is not None:
                text = stream_text(switch.prompt_embeds, switch.negative_embeds
                                   if switch.negative_embeds is not None else negative_embeds)
                if f > 0:
                    if self.s.kv_cache:
                        cond, etm_origin = self._reencode(list(window), x0, f, text, etm_cache, sdd_cache)
                    else:
                        history = history[-(student.window + 1):]
                        cond = student.etm_recompute(torch.cat(history, dim=2), text)
            # Drawn for a given x_0 too, so that frame f's noise depends on (seed, f) only.
            noise = torch.randn(B, C, 1, self.s.height, self.s.width, generator=gen)
            x = noise.to(student.device_, student.dtype)
            sigmas = self.s.sigmas
            if f == 0 and first_frame is not None:
                x, sigmas = first_frame.to(student.device_, student.dtype), []
            for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
                if self.s.kv_cache:
                    v = student.sdd_velocity_step(doubled(x), sigma, f, cond, sdd_cache, text)
                else:
                    prev = history[-1] if history else None
                    v = student.sdd_recompute(x0, prev, doubled(x), sigma, f, cond, text)
                if guided:
                    v_cond, v_uncond = v.chunk(2)
                    v = v_uncond + self.s.guidance_scale * (v_cond - v_uncond)
                x = euler_step(x, v, sigma, sigma_next)
            yield x

            clean = doubled(x)
            x0 = clean if f == 0 else x0
            if self.s.kv_cache:
                student.sdd_context_step(clean, f, sdd_cache, text)
                cond = student.etm_step(clean, f - etm_origin, etm_cache, text)
                window.append(clean)
            else:
                history.append(clean)
                cond = student.etm_recompute(torch.cat(history, dim=2), text)
            f += 1

    def _reencode(self, window: list[torch.Tensor], x0: torch.Tensor, f: int, text: torch.Tensor,
                  etm_cache, sdd_cache) -> tuple[torch.Tensor, int]:
        """Before frame f, under a new prompt: the SDD context (x_0, x_{f-1}) and the ETM window as a
        fresh one (frames numbered 0..len(window)-1). Returns c_f and the ETM's new origin."""
        student = self.student
        for cache in (etm_cache, sdd_cache):
            cache.text_kv.clear()  # the old prompt's cross-attention K/V
        student.sdd_context_step(x0, 0, sdd_cache, text)
        if f > 1:
            student.sdd_context_step(window[-1], f - 1, sdd_cache, text)
        cond = None
        for j, frame in enumerate(window):
            cond = student.etm_step(frame, j, etm_cache, text)
        return cond, f - len(window)

    def generate(self, prompt_embeds: torch.Tensor, num_frames: int, seed: int,
                 negative_embeds: Optional[torch.Tensor] = None, **kwargs) -> torch.Tensor:
        """All frames at once: (B, C, num_frames, H, W); kwargs as `stream`."""
        return torch.cat(list(self.stream(prompt_embeds, num_frames, seed, negative_embeds, **kwargs)), dim=2)
