"""The teacher-data shard format, written by `data_pipeline` and read by `gd_train.data.reader`.

A shard is a WebDataset tar (`shard-000042.tar`). Each sample is two members sharing a key:
- `<key>.safetensors`: `latents` (16, F, H, W), normalised as `WanPipeline(output_type="latent")`
  returns them, and `prompt_embeds` (tokens, text_dim), unpadded — tensors never go through pickle;
- `<key>.json`: caption, seed, source row, video name, length (`num_frames`, `latent_frames`) and the
  sampling settings used.
Keys hold no dots (WebDataset splits member names at the first dot). Every sample of a shard has the
same length (F); shards of one folder may differ (`datagen.lengths`), and the manifest says which.

A shard appears under its final name only when complete (`write_shard`: temporary name, fsync,
rename — WebDataset's own writers write straight to the final name, so a crash would leave a
truncated tar that looks whole). `manifest.json` beside the shards records each finished shard's
sample count, size and checksums — of the whole file, and (since v1 writers added it) one digest per
sample, so that the reader can verify each sample as it streams through and drop just a damaged one.
The reader takes its epoch length, and each shard's latent frames, from it without opening tars.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

SHARD_NAME = "shard-{index:06d}.tar"
SHARD_RE = re.compile(r"^shard-(\d{6})\.tar$")
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "gd-train/teacher-shards/v1"
PARTIAL_SUFFIX = ".partial"
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


# --------------------------------------------------------------------------------------------------
# Whole shards and the manifest
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardRecord:
    """One finished shard, as the manifest records it."""

    samples: int
    bytes: int
    sha256: str
    keys_sha256: str  # digest of its sample keys in order: ties the file to its place in the plan
    # `sample_digest` of each sample in stored order; None in manifests written before it existed
    # (those shards are verified whole, against `sha256`).
    sample_sha256: Optional[list[str]] = None
    # F of every sample in the shard (one length per shard); None in manifests written before it existed
    # (then every shard has the settings' latent_shape).
    latent_frames: Optional[int] = None


SAMPLE_DIGEST_HEX = 32  # 128 bits: against damage, not an adversary; keeps the manifest ~40 B per sample


def sample_digest(key: str, members: dict[str, bytes]) -> str:
    """sha256 over a sample's key and members (extension, length, bytes; extensions sorted), truncated.

    `members` are the member bytes by extension, as `encode_sample` makes them and WebDataset reads
    them back, so writer and reader hash the very bytes that go into and come out of the tar."""
    digest = hashlib.sha256(key.encode("utf-8"))
    for ext in sorted(members):
        data = members[ext]
        digest.update(b"\0%s\0%d\0" % (ext.encode("utf-8"), len(data)))
        digest.update(data)
    return digest.hexdigest()[:SAMPLE_DIGEST_HEX]


def keys_digest(keys: Iterable[str]) -> str:
    return hashlib.sha256("\n".join(keys).encode("utf-8")).hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_shard(path: str | os.PathLike, samples: Iterable[TeacherSample], *, attempt_tag: str) -> ShardRecord:
    """Write `samples` to `path` so that `path` only ever exists complete.

    The tar goes to `<name>.<attempt_tag>.partial` in the same folder (one name per attempt, so a
    retried attempt never shares a file with a dead one), is fsynced, then renamed. Member times are
    fixed so that equal samples give byte-identical shards. `samples` may be a generator: a process
    that dies while it runs leaves only the `.partial` file behind. All samples must have the same
    latent frames (recorded as the shard's `latent_frames`); a sample of another length is refused.
    """
    import webdataset as wds

    path = Path(path)
    tmp = path.with_name(f"{path.name}.{attempt_tag}{PARTIAL_SUFFIX}")
    keys: list[str] = []
    digests: list[str] = []
    frames: Optional[int] = None
    try:
        with open(tmp, "wb") as fh:
            # An int mtime: a float one makes tarfile add a PAX header to every member.
            with wds.TarWriter(fh, encoder=False, mtime=0) as writer:
                for sample in samples:
                    encoded = encode_sample(sample)
                    frames = frames if frames is not None else sample.latents.shape[1]
                    if sample.latents.shape[1] != frames:
                        raise ShardFormatError(f"{path.name}: sample '{sample.key}' has {sample.latents.shape[1]} latent "
                                               f"frames, the shard's earlier samples {frames} (one length per shard)")
                    writer.write(encoded)
                    keys.append(sample.key)
                    digests.append(sample_digest(sample.key, {k: v for k, v in encoded.items() if k != "__key__"}))
            fh.flush()
            os.fsync(fh.fileno())
        record = ShardRecord(samples=len(keys), bytes=tmp.stat().st_size, sha256=file_sha256(tmp),
                             keys_sha256=keys_digest(keys), sample_sha256=digests, latent_frames=frames)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return record


def count_samples(path: str | os.PathLike) -> int:
    """Samples in a shard no manifest describes, from its tar headers (member data is seeked over).

    Fails with `ShardFormatError` on a truncated tar: tarfile notices data cut short, and a tar cut at
    a member boundary lacks the zero blocks every finished tar ends with.
    """
    path = Path(path)
    try:
        keys = []
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                key = member.name.split(".", 1)[0]
                if member.isreg() and (not keys or keys[-1] != key):
                    keys.append(key)
        with open(path, "rb") as fh:
            fh.seek(max(0, path.stat().st_size - 2 * tarfile.BLOCKSIZE))
            if fh.read() != bytes(2 * tarfile.BLOCKSIZE):
                raise tarfile.ReadError("no end-of-archive blocks (written by a process that did not finish)")
    except (tarfile.TarError, OSError) as exc:
        raise ShardFormatError(f"{path}: unreadable tar ({exc})") from None
    return len(keys)


@dataclass
class Manifest:
    """`manifest.json`: what produced a folder of shards, and which of them are finished."""

    settings: dict[str, Any]  # sampling settings and plan fingerprint; a rerun must match them
    total_shards: int  # shards in the plan, finished or not
    shards: dict[str, ShardRecord] = field(default_factory=dict)  # finished shards by file name
    # The plan's lengths, finished shards or not (empty in manifests written before per-sample lengths):
    # latent frames of every planned shard by file name, and {latent frames: planned samples}.
    shard_latent_frames: dict[str, int] = field(default_factory=dict)
    length_histogram: dict[int, int] = field(default_factory=dict)

    @property
    def total_samples(self) -> int:
        return sum(r.samples for r in self.shards.values())

    @classmethod
    def load(cls, folder: str | os.PathLike) -> Optional["Manifest"]:
        path = Path(folder) / MANIFEST_NAME
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("format") != MANIFEST_FORMAT:
                raise ValueError(f"format {data.get('format')!r}, expected {MANIFEST_FORMAT!r}")
            shards = {}
            for name, rec in data["shards"].items():
                if not SHARD_RE.match(name):
                    raise ValueError(f"shard name {name!r} does not match {SHARD_NAME!r}")
                shards[name] = ShardRecord(**rec)
            planned = {str(name): int(f) for name, f in data.get("shard_latent_frames", {}).items()}
            histogram = {int(f): int(n) for f, n in data.get("length_histogram", {}).items()}
            return cls(settings=data["settings"], total_shards=int(data["total_shards"]), shards=shards,
                       shard_latent_frames=planned, length_histogram=histogram)
        except (ValueError, KeyError, TypeError) as exc:
            raise ShardFormatError(f"{path}: not a shard manifest ({type(exc).__name__}: {exc})") from None

    def save(self, folder: str | os.PathLike) -> Path:
        """Atomically replace `manifest.json` (a reader never sees half of it)."""
        path = Path(folder) / MANIFEST_NAME
        data = {"format": MANIFEST_FORMAT, "settings": self.settings, "total_shards": self.total_shards,
                "total_samples": self.total_samples,
                "shards": {name: asdict(rec) for name, rec in sorted(self.shards.items())},
                "shard_latent_frames": dict(sorted(self.shard_latent_frames.items())),
                "length_histogram": {str(f): n for f, n in sorted(self.length_histogram.items())}}
        tmp = path.with_name(path.name + PARTIAL_SUFFIX)
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=1, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        return path


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (the directory entry itself must reach the disk)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
