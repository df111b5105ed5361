"""Shared helpers of the data tests: small real shard folders and prompt CSVs."""

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


# --------------------------------------------------------------------------------------------------
# Prompt CSVs
# --------------------------------------------------------------------------------------------------
OPENVID_HEADER = b"video,caption,aesthetic score,motion score,temporal consistency score,camera motion,frame,fps,seconds\n"


# frame,fps,seconds of good row i: 0.5, 1 or 1.5 s (at video.fps=16: 9, 17 or 25 frames once snapped to
# 1 + 4k), two rows with only frame/fps readable (`seconds` empty or not a number).
DURATIONS = ("8,16,0.5", "16,16,1.0", "24,16,1.5")
ODD_DURATIONS = {7: "32,32,", 8: "45,30,n/a"}


def source_frames(i: int) -> int:
    """What datagen.lengths.mode=source (min 9, max 25, video.fps 16) plans for good row i."""
    return (9, 17, 25)[i % 3]


def write_prompts_csv(path: Path, valid: int = 36) -> tuple[dict[str, str], list[int]]:
    """An OpenVidHD-layout CSV: `valid` good rows (quoted captions with commas and newlines, one with
    cp1252 bytes; durations of 0.5-1.5 s, `source_frames`) and 5 malformed ones in between. Returns
    {key: caption} of the good rows and the row numbers of the bad ones."""
    rows, expected, bad = [], {}, []
    for i in range(valid):
        caption = f"clip {i}: a red fox, running through snow"
        if i % 7 == 3:
            caption = f"clip {i}: a quoted caption, with a comma\nand a second line"
        raw = caption.encode()
        if i == 5:
            raw = f"clip {i}: caf".encode() + b"\xe9 at dusk"  # cp1252 e-acute: not UTF-8
            caption = f"clip {i}: café at dusk"
        duration = ODD_DURATIONS.get(i, DURATIONS[i % 3]).encode()
        rows.append(b'clip_%04d.mp4,"' % i + raw + b'",5.%d,3.0,0.9,static,' % (i % 10) + duration)
        expected[f"clip_{i:04d}"] = " ".join(caption.split())
        if i in (4, 11, 19, 26, 33):  # a malformed row after these
            kind = len(bad)
            rows.append([b"bad_%d.mp4,,5.0,3.0,0.9,static,81,16,5" % kind,  # empty caption
                         b"bad_%d.mp4,only two fields" % kind,  # missing columns
                         b'bad_%d.mp4,"   ",5.0,3.0,0.9,static,81,16,5' % kind,  # blank caption
                         b"clip_0000.mp4,duplicate video name,5.0,3.0,0.9,static,81,16,5",
                         b"bad_%d.mp4,too,many,fields,1,2,3,4,5,6,7" % kind][kind])
            bad.append(len(rows))
    path.write_bytes(OPENVID_HEADER + b"\n".join(rows) + b"\n")
    return expected, bad
