"""World clips as teacher shards and world prompts as an OpenVidHD-layout CSV.

`write_world_shards` writes ground-truth clips in the teacher-shard format (gd_train.data.shards:
atomic tars + manifest), prompts encoded by the configured text encoder like any prompt: data for the
learning test (no teacher needed) and held-out sets for `train.eval_every`. `write_prompts_csv`
writes the world's prompts for the Ray data job (data_pipeline/gen_teacher.py) to sample a teacher on.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from gd_train.data.shards import SHARD_NAME, Manifest, TeacherSample, write_shard
from gd_train.eval import world


def write_world_shards(folder: str | Path, cfg, count: int, frames: int, seed: int, key_prefix: str = "world",
                       samples_per_shard: int = 8) -> list[str]:
    """`count` clips of `frames` latent frames (classes balanced, start positions from `seed`)."""
    from gd_train.model.backbone import PromptEncoder

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    specs = world.sample_specs(count, rng)
    encoder = PromptEncoder(cfg)
    embeds = dict(zip([s.prompt for s in world.all_specs()], encoder.encode([s.prompt for s in world.all_specs()])))
    H, W = cfg.video.height // 8, cfg.video.width // 8
    samples = []
    for i, spec in enumerate(specs):
        clip = world.sample_clip(spec, frames, rng, H, W)
        samples.append(TeacherSample(key=f"{key_prefix}-{i:05d}", latents=clip.latents, prompt_embeds=embeds[spec.prompt],
                                     meta={"caption": spec.prompt, "seed": seed, "start_yx": clip.positions[0].tolist(),
                                           "settings": {"source": "world", "seed": seed}}))
    manifest = Manifest(settings={"source": "world", "seed": seed, "count": count, "frames": frames},
                        total_shards=(count + samples_per_shard - 1) // samples_per_shard)
    for index in range(manifest.total_shards):
        name = SHARD_NAME.format(index=index)
        manifest.shards[name] = write_shard(folder / name, samples[index * samples_per_shard:(index + 1) * samples_per_shard],
                                            attempt_tag="world")
    manifest.save(folder)
    return [s.key for s in samples]


def write_prompts_csv(path: str | Path, count: int, seed: int, key_prefix: str = "p") -> list[world.MotionSpec]:
    """`count` world prompts (balanced classes) as rows video,caption,... (video names give unique keys)."""
    rng = np.random.default_rng(seed)
    specs = world.sample_specs(count, rng)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        out = csv.writer(fh)
        out.writerow(["video", "caption", "aesthetic score", "motion score", "temporal consistency score",
                      "camera motion", "frame", "fps", "seconds"])
        for i, spec in enumerate(specs):
            out.writerow([f"{key_prefix}-{i:05d}.mp4", spec.prompt, "", "", "", "", "", "", ""])
    return specs
