"""The teacher-data shard format, written by `data_pipeline` and read by `gd_train.data.reader`.

A shard is a WebDataset tar (`shard-000042.tar`). Each sample is two members sharing a key:
- `<key>.safetensors`: `latents` (16, F, H, W), normalised as `WanPipeline(output_type="latent")`
  returns them, and `prompt_embeds` (tokens, text_dim), unpadded — tensors never go through pickle;
- `<key>.json`: caption, seed, source row, video name and the sampling settings used.
Keys hold no dots (WebDataset splits member names at the first dot).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

SHARD_NAME = "shard-{index:06d}.tar"
SHARD_RE = re.compile(r"^shard-(\d{6})\.tar$")
MANIFEST_NAME = "manifest.json"
KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")


class ShardFormatError(ValueError):
    """A sample that does not follow this format (names the key and what was expected)."""


@dataclass
class TeacherSample:
    key: str
    latents: torch.Tensor  # (16, F, H, W)
    prompt_embeds: torch.Tensor  # (tokens, text_dim), unpadded
    meta: dict[str, Any]  # caption, seed, source_row, video, settings, ...

    @property
    def caption(self) -> str:
        return self.meta["caption"]


def encode_sample(sample: TeacherSample) -> dict[str, Any]:
    """A dict for `webdataset.TarWriter.write` (`__key__` plus one bytes value per member)."""
    if not KEY_RE.match(sample.key):
        raise ShardFormatError(f"sample key '{sample.key}': expected letters, digits, '_' or '-' only")
    if sample.latents.ndim != 4 or sample.prompt_embeds.ndim != 2:
        raise ShardFormatError(
            f"sample '{sample.key}': expected latents (C, F, H, W) and prompt_embeds (tokens, dim), got "
            f"{tuple(sample.latents.shape)} and {tuple(sample.prompt_embeds.shape)}")
    tensors = {"latents": sample.latents.detach().contiguous().cpu(),
               "prompt_embeds": sample.prompt_embeds.detach().contiguous().cpu()}
    meta = dict(sample.meta)
    meta["key"] = sample.key
    return {"__key__": sample.key, "safetensors": st_save(tensors),
            "json": json.dumps(meta, sort_keys=True).encode("utf-8")}


def decode_sample(raw: dict[str, Any]) -> TeacherSample:
    """The inverse of `encode_sample`, from a raw WebDataset sample (member bytes by extension)."""
    key = raw.get("__key__", "?")
    source = raw.get("__url__", "?")
    missing = [ext for ext in ("safetensors", "json") if ext not in raw]
    if missing:
        raise ShardFormatError(f"{source}: sample '{key}' lacks member(s) {', '.join('.' + m for m in missing)}")
    try:
        tensors = st_load(raw["safetensors"])
        meta = json.loads(raw["json"].decode("utf-8"))
    except Exception as exc:  # safetensors / json errors: name the sample
        raise ShardFormatError(f"{source}: sample '{key}' is unreadable ({type(exc).__name__}: {exc})") from None
    if "latents" not in tensors or "prompt_embeds" not in tensors:
        raise ShardFormatError(f"{source}: sample '{key}' lacks the 'latents' or 'prompt_embeds' tensor")
    return TeacherSample(key=key, latents=tensors["latents"], prompt_embeds=tensors["prompt_embeds"], meta=meta)
