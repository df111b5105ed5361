"""The toy teacher: a small `diffusers.WanTransformer3DModel` trained by flow matching on the world's
clips (`gd_train.eval.world`), saved in the Wan2.1-T2V-1.3B-Diffusers folder layout so that
`pretrained_path=<folder>` loads it exactly as it loads the real teacher.

The folder holds `transformer/` (trained), and `vae/`, `text_encoder/`, `tokenizer/`: the tiny random
parts of `configs/toy/model.yaml` (seeded, so the prompt embeddings the teacher was trained on are the
ones every later command computes from the folder).

Training: clips drawn on the fly (a fresh start position for every sample; classes balanced),
x_t = (1 - s)·x + s·ε with s uniform then warped by the sampler's flow shift (3.0, so training covers
the levels UniPC visits), MSE of the velocity against ε − x, AdamW with warm-up and cosine decay.
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
    steps: int = 1500
    batch_size: int = 16
    lr: float = 1e-3
    warmup_steps: int = 100
    frames: int = 8  # latent frames of the training clips (the teacher's training length)
    flow_shift: float = 3.0
    uncond_fraction: float = 0.1
    seed: int = 0


def toy_config(overrides=()):
    return load_config(TOY_CONFIG, list(overrides))


def train_toy_teacher(out_dir: str | Path, budget: TeacherBudget,
                      progress: Optional[Callable[..., None]] = print) -> dict:
    """Train and save the teacher folder; returns the report written to `<out_dir>/toy_teacher.json`."""
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
    opt = torch.optim.AdamW(model.parameters(), lr=budget.lr, weight_decay=0.0)

    def lr_at(step: int) -> float:
        if step < budget.warmup_steps:
            return (step + 1) / budget.warmup_steps
        return 0.5 * (1 + math.cos(math.pi * (step - budget.warmup_steps) / max(1, budget.steps - budget.warmup_steps)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    start, losses = time.perf_counter(), []
    for step in range(budget.steps):
        idx = rng.integers(0, len(specs), budget.batch_size)
        clips = torch.stack([world.sample_clip(specs[i], budget.frames, rng).latents for i in idx])
        text = cond[idx].clone()
        drop = torch.from_numpy(rng.random(budget.batch_size) < budget.uncond_fraction)
        text[drop] = uncond[0]
        sigma = shift_sigma(torch.rand(budget.batch_size), budget.flow_shift)
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
    report = {"budget": asdict(budget), "arch": {k: list(v) if isinstance(v, tuple) else v for k, v in ARCH.items()},
              "parameters": sum(p.numel() for p in model.parameters()),
              "final_loss": float(np.mean(losses[-100:])), "train_seconds": round(time.perf_counter() - start, 1)}
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
