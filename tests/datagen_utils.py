"""Shared helpers of the data tests: small real shard folders."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from gd_train.data.shards import SHARD_NAME, Manifest, TeacherSample, write_shard

REPO_ROOT = Path(__file__).resolve().parent.parent
SMALL_LATENTS = (16, 2, 2, 2)
SMALL_TEXT_DIM = 8


def sample_key(shard: int, index: int) -> str:
    return f"s{shard:03d}-{index:03d}"


def make_sample(key: str, tokens: int, seed: int) -> TeacherSample:
    gen = torch.Generator().manual_seed(seed)
    return TeacherSample(key=key, latents=torch.randn(SMALL_LATENTS, generator=gen),
                         prompt_embeds=torch.randn(tokens, SMALL_TEXT_DIM, generator=gen),
                         meta={"caption": f"caption of {key}", "seed": seed})


def make_shards(folder: Path, counts: Sequence[int], *, manifest: bool = True) -> list[str]:
    """Shards shard-000000.tar ... holding `counts[i]` samples each; returns every key in write order."""
    folder.mkdir(parents=True, exist_ok=True)
    keys, records = [], {}
    for shard, count in enumerate(counts):
        samples = [make_sample(sample_key(shard, i), tokens=1 + (shard + i) % 5, seed=shard * 1000 + i)
                   for i in range(count)]
        name = SHARD_NAME.format(index=shard)
        records[name] = write_shard(folder / name, samples, attempt_tag="test")
        keys += [s.key for s in samples]
    if manifest:
        Manifest(settings={"latent_shape": list(SMALL_LATENTS)}, total_shards=len(counts), shards=records).save(folder)
    return keys


def truncate(path: Path, keep_fraction: float = 0.5) -> None:
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.truncate(int(size * keep_fraction))
