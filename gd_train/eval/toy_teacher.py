"""The toy teacher: a small `diffusers.WanTransformer3DModel` trained by flow matching on the world's
clips (`gd_train.eval.world`), saved in the Wan2.1-T2V-1.3B-Diffusers folder layout so that
`pretrained_path=<folder>` loads it exactly as it loads the real teacher.

The folder holds `transformer/` (trained), and `vae/`, `text_encoder/`, `tokenizer/`: the tiny random
parts of `configs/toy/model.yaml` (seeded, so the prompt embeddings the teacher was trained on are the
ones every later command computes from the folder).

Training: clips drawn on the fly (a fresh start position for every sample; classes balanced),
x_t = (1 - s)·x + s·ε with s uniform then warped by the sampler's flow shift (3.0, so training covers
the levels UniPC visits) for half of each batch and uniform in [0.85, 1) for the other half (the
levels where only the prompt's motion words say where the object goes: without them the teacher never
bound its direction words — docs/experiment.md), MSE of the velocity against ε − x, AdamW with warm-up
and cosine decay.
One sample in ten is conditioned on Wan's negative prompt instead of its own, so classifier-free
guidance (the pipeline's negative prompt) has an unconditional model to push away from.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from gd_train.config import CONFIG_DIR, WAN_NEGATIVE_PROMPT, load_config
from gd_train.eval import world
from gd_train.flow import add_noise, shift_sigma, velocity_target

TOY_CONFIG = CONFIG_DIR / "toy" / "model.yaml"
REPORT_FILE = "toy_teacher.json"

# ~0.96 M parameters: 4 layers, 4 heads x 32, ffn 256 (STACK_NOTES: this size learns a blob world).
ARCH = dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=16, out_channels=16,
            text_dim=32, freq_dim=256, ffn_dim=256, num_layers=4, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)


@dataclass
class TeacherBudget:
    steps: int = 3000
    batch_size: int = 16
    lr: float = 2e-3
    warmup_steps: int = 100
    frames: int = 8  # latent frames of the training clips (the teacher's training length)
    flow_shift: float = 3.0
    uncond_fraction: float = 0.1
    # Share of each batch drawn at sigma in [HIGH_SIGMA, 1) instead of from the shifted uniform: the
    # levels where only the prompt's motion words tell where the object goes (see prompt_sensitivity).
    high_sigma_fraction: float = 0.5
    seed: int = 0


HIGH_SIGMA = 0.85


def toy_config(overrides=()):
    return load_config(TOY_CONFIG, list(overrides))


def train_toy_teacher(out_dir: str | Path, budget: TeacherBudget,
                      progress: Optional[Callable[..., None]] = print,
                      every: Optional[Callable[[int, torch.nn.Module], dict]] = None, every_steps: int = 500) -> dict:
    """Train and save the teacher folder; returns the report written to `<out_dir>/toy_teacher.json`.
    `every(step, model)`, when given, runs every `every_steps` steps (e.g. `direction_probe`); what it
    returns is printed and kept in the report."""
    from diffusers import WanTransformer3DModel

    from gd_train.model.backbone import PromptEncoder

    out_dir = Path(out_dir)
    cfg = toy_config()
    torch.manual_seed(budget.seed)
    rng = np.random.default_rng(budget.seed)
    encoder = PromptEncoder(cfg)
    specs = world.all_specs()
    cond = encoder.encode_padded([s.prompt for s in specs]).float()  # (classes, tokens, dim)
    uncond = encoder.encode_padded([WAN_NEGATIVE_PROMPT]).float()

    model = WanTransformer3DModel(**ARCH).train()
    if every is not None and not callable(every):  # True: the default probe on this run's own encoder
        every = direction_probe(encoder)
    opt = torch.optim.AdamW(model.parameters(), lr=budget.lr, weight_decay=0.0)

    def lr_at(step: int) -> float:
        if step < budget.warmup_steps:
            return (step + 1) / budget.warmup_steps
        return 0.5 * (1 + math.cos(math.pi * (step - budget.warmup_steps) / max(1, budget.steps - budget.warmup_steps)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    start, losses, probes = time.perf_counter(), [], []
    for step in range(budget.steps):
        idx = rng.integers(0, len(specs), budget.batch_size)
        clips = torch.stack([world.sample_clip(specs[i], budget.frames, rng).latents for i in idx])
        text = cond[idx].clone()
        drop = torch.from_numpy(rng.random(budget.batch_size) < budget.uncond_fraction)
        text[drop] = uncond[0]
        sigma = shift_sigma(torch.rand(budget.batch_size), budget.flow_shift)
        if budget.high_sigma_fraction:
            high = torch.from_numpy(rng.random(budget.batch_size) < budget.high_sigma_fraction)
            sigma[high] = HIGH_SIGMA + (1 - HIGH_SIGMA) * torch.rand(int(high.sum()))
        noise = torch.randn_like(clips)
        noisy = add_noise(clips, noise, sigma[:, None, None, None, None])
        pred = model(hidden_states=noisy, timestep=sigma * 1000.0, encoder_hidden_states=text, return_dict=False)[0]
        loss = F.mse_loss(pred, velocity_target(clips, noise))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if progress and ((step + 1) % 100 == 0 or step + 1 == budget.steps):
            elapsed = time.perf_counter() - start
            progress(f"toy teacher: step {step + 1}/{budget.steps} loss {np.mean(losses[-100:]):.4f} "
                     f"({elapsed:.0f} s, ~{elapsed / (step + 1) * (budget.steps - step - 1):.0f} s left)", flush=True)
        if every and ((step + 1) % every_steps == 0 or step + 1 == budget.steps):
            model.eval()
            probes.append({"step": step + 1, **every(step + 1, model)})
            model.train()
            if progress:
                progress(f"toy teacher: probe {json.dumps(probes[-1])}", flush=True)
    report = {"budget": asdict(budget), "arch": {k: list(v) if isinstance(v, tuple) else v for k, v in ARCH.items()},
              "parameters": sum(p.numel() for p in model.parameters()),
              "final_loss": float(np.mean(losses[-100:])), "train_seconds": round(time.perf_counter() - start, 1),
              "probes": probes}
    save_folder(out_dir, model.eval(), cfg, encoder)
    (out_dir / REPORT_FILE).write_text(json.dumps(report, indent=2))
    return report


def save_folder(out_dir: Path, transformer, cfg, encoder) -> None:
    """The Wan2.1-T2V-1.3B-Diffusers layout: transformer/, vae/, text_encoder/, tokenizer/ (+ model_index.json)."""
    from gd_train.model.backbone import load_vae

    out_dir.mkdir(parents=True, exist_ok=True)
    transformer.save_pretrained(out_dir / "transformer", safe_serialization=True)
    load_vae(cfg).save_pretrained(out_dir / "vae", safe_serialization=True)
    encoder.pipe.text_encoder.save_pretrained(out_dir / "text_encoder", safe_serialization=True)
    encoder.pipe.tokenizer.save_pretrained(out_dir / "tokenizer")
    (out_dir / "model_index.json").write_text(json.dumps({
        "_class_name": "WanPipeline", "_diffusers_version": __import__("diffusers").__version__,
        "scheduler": ["diffusers", "UniPCMultistepScheduler"], "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"], "transformer": ["diffusers", "WanTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLWan"]}, indent=2))


PROBE_SIGMAS = (0.98, 0.9, 0.8, 0.6)  # below ~0.6 x_t itself shows the motion


@dataclass
class _ProbeClips:
    """Held-out clips (fixed seed), their noise, and the prompt embeddings of each word swap."""

    x0: torch.Tensor
    noise: torch.Tensor
    chosen: list  # the clips' true specs
    variants: dict  # "true" / "kind" / "direction" / "speed" -> one spec per clip
    embeds: torch.Tensor  # (classes, tokens, dim)
    row: dict  # spec -> its row in embeds

    def teacher_mse(self, model, sigma: float) -> dict[str, float]:
        """The teacher's velocity MSE (as an x0 error / sigma^2) at `sigma` under each prompt variant."""
        from gd_train.flow import predict_x0

        x_t = add_noise(self.x0, self.noise, sigma)
        t = torch.full((len(self.chosen),), sigma * 1000.0)
        out = {}
        for name, prompts in self.variants.items():
            v = model(hidden_states=x_t, timestep=t, encoder_hidden_states=self.embeds[[self.row[s] for s in prompts]],
                      return_dict=False)[0]
            out[name] = F.mse_loss(predict_x0(x_t, v, sigma), self.x0).item() / sigma ** 2
        return out


def _probe_clips(encoder, clips: int, seed: int) -> _ProbeClips:
    specs = world.all_specs()
    rng, gen = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    chosen = [specs[i % len(specs)] for i in range(clips)]
    x0 = torch.stack([world.sample_clip(s, 8, rng).latents for s in chosen])
    noise = torch.randn(x0.shape, generator=gen)
    variants = {"true": chosen, **{k: [_wrong_prompts(s)[k] for s in chosen] for k in ("kind", "direction", "speed")}}
    return _ProbeClips(x0=x0, noise=noise, chosen=chosen, variants=variants,
                       embeds=encoder.encode_padded([s.prompt for s in specs]).float(),
                       row={s: i for i, s in enumerate(specs)})


def direction_probe(encoder, clips: int = 48, sigmas=(0.98, 0.9), seed: int = 123) -> Callable:
    """A cheap in-training check of `prompt_sensitivity`'s teacher columns (the same clips): velocity MSE
    with the true prompt and its increase when the kind / direction / speed word is swapped (no Bayes model)."""
    probe_clips = _probe_clips(encoder, clips, seed)

    @torch.no_grad()
    def probe(step: int, model) -> dict:
        out = {}
        for sigma in sigmas:
            mse = probe_clips.teacher_mse(model, sigma)
            out[str(sigma)] = {"true": round(mse["true"], 4),
                               **{k: round(mse[k] - mse["true"], 4) for k in ("kind", "direction", "speed")}}
        return out

    return probe


def _wrong_prompts(spec: world.MotionSpec) -> dict[str, world.MotionSpec]:
    """The spec with one attribute swapped for its opposite: what each prompt word alone should change."""
    flip_dir = {"left": "right", "right": "left", "up": "down", "down": "up"}
    return {"kind": world.MotionSpec("blue" if spec.kind == "red" else "red", spec.direction, spec.speed),
            "direction": world.MotionSpec(spec.kind, flip_dir[spec.direction], spec.speed),
            "speed": world.MotionSpec(spec.kind, spec.direction, "quickly" if spec.speed == "slowly" else "slowly")}


def _bayes_x0(x_t: torch.Tensor, sigma: float, bank: torch.Tensor) -> torch.Tensor:
    """E[x0 | x_t, prompt] of the world: a posterior over the start positions in `bank` (K, D)."""
    d2 = ((x_t[None] - (1 - sigma) * bank) ** 2).sum(-1)
    return torch.softmax(-d2 / (2 * sigma * sigma), 0) @ bank


@torch.no_grad()
def prompt_sensitivity(folder: str | Path, clips: int = 48, sigmas=PROBE_SIGMAS, grid: int = 15,
                       seed: int = 123) -> dict:
    """How much each prompt word matters to the teacher's prediction, against how much it matters to a
    perfect model of the world (issue 9's diagnosis of a teacher that ignores its prompt's direction).

    For held-out clips x (fixed seed) at each noise level sigma: the velocity MSE with the true prompt,
    and its increase when one word is swapped for its opposite (kind, direction, speed), for the teacher
    and for the world's Bayes-optimal denoiser (a posterior over start positions on a `grid` x 1.5·grid
    lattice). A teacher that has bound a word shows a gap of the Bayes gap's order; one that ignores it
    shows ~0. `bayes_kind_only`: the MSE of a perfect model that ignores the direction and speed words.
    """
    from diffusers import WanTransformer3DModel

    from gd_train.model.backbone import PromptEncoder

    folder = Path(folder)
    encoder = PromptEncoder(toy_config([f"pretrained_path={folder}"]))
    model = WanTransformer3DModel.from_pretrained(folder / "transformer").eval()
    specs = world.all_specs()
    probe_clips = _probe_clips(encoder, clips, seed)
    x0, noise, chosen, variants = probe_clips.x0, probe_clips.noise, probe_clips.chosen, probe_clips.variants
    lo, hi = world.bounds()
    starts = [(y, x) for y in np.linspace(lo[0], hi[0], grid) for x in np.linspace(lo[1], hi[1], int(grid * 1.5))]
    banks = {s: torch.stack([world.render(s.kind, world.trajectory(st, s.velocity, 8)).flatten()
                             for st in starts]).double() for s in specs}  # float64: the posterior is sharp
    # A perfect model that knows the kind but ignores the motion words: the posterior over every
    # direction and speed of that kind (each spec's lattice has the same size: a uniform prior).
    kind_only = {k: torch.cat([banks[s] for s in specs if s.kind == k]) for k in world.KINDS}
    out = {"clips": clips, "sigmas": list(sigmas), "teacher": {}, "bayes": {}, "bayes_kind_only": {}}
    for sigma in sigmas:
        x_t = add_noise(x0, noise, sigma)
        teacher, bayes = probe_clips.teacher_mse(model, sigma), {}
        for name, prompts in variants.items():
            est = torch.stack([_bayes_x0(x_t[i].flatten().double(), sigma, banks[s]) for i, s in enumerate(prompts)])
            bayes[name] = (((est - x0.flatten(1).double()) / sigma) ** 2).mean().item()
        est = torch.stack([_bayes_x0(x_t[i].flatten().double(), sigma, kind_only[s.kind])
                           for i, s in enumerate(chosen)])
        out["bayes_kind_only"][sigma] = (((est - x0.flatten(1).double()) / sigma) ** 2).mean().item()
        for who, mse in (("teacher", teacher), ("bayes", bayes)):
            out[who][sigma] = {"true": mse["true"], **{k: mse[k] - mse["true"] for k in mse if k != "true"}}
    return out
