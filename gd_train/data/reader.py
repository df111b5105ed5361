"""The training-side reader of teacher shards: one length per step on every rank, equal steps, exact
mid-epoch resume on any number of ranks.

Each shard holds clips of one length (`data_pipeline` plans it so; without a manifest the first
sample tells). An epoch is planned up front, identically on every rank and independently of the world
size, from the shard list, each shard's sample count and length (read from `manifest.json`):

1. the shards are grouped into buckets by length (latent frames); `gd_train.data.buckets` says how many
   samples one optimizer step holds at each length (`samples_per_step`, world-size free);
2. per bucket, the shards are put in an order drawn from (seed, epoch, length) and their samples laid
   end to end, then cut into blocks of one step's samples — the few samples past the last whole block
   are the bucket's dropped tail, reported in `stats`; blocks are permuted within windows of
   `shuffle_buffer` samples;
3. the steps of all buckets are interleaved in an order drawn from (seed, epoch): step s reads one block
   of one bucket, so every rank runs the same length at every step (same graph, same collectives);
4. rank r takes the r-th contiguous share of the step's block, shuffled (seeded by seed, epoch, step,
   rank) and cut into the step's micro-batches; DataLoader worker w prepares every W-th step.

Why our own assignment rather than `wds.split_by_node` / `split_by_worker` + `wds.shuffle`: those hand
out whole shards round-robin (ranks with more shards run more steps, and a collective hangs), know no
lengths, and keep their shuffle state inside the workers, so a position cannot be saved. Here every
step's samples are a function of (seed, epoch, shard set, step index): the position is just (epoch, steps
consumed), the same on every rank, and a run resumed on another number of ranks re-splits the remaining
steps — no sample repeated or skipped. WebDataset still does the reading (`wds.tarfile_samples`), and
`gd_train.data.shards` the decoding. Reading a share scans its shard's tar from the start (tars have no
index), so a rank reads up to one shard more than its share per step.

`resampled=True` draws each bucket's shards with replacement instead (same steps per epoch, no tail).

Damage never stops training (unless `data.on_damage=refuse`, for what is known at start): a shard
missing from the folder, unrecorded in its manifest, of another size than the manifest says, or whose
tar is cut short, is left out of the plan when the reader starts. Every sample is verified against the
manifest's digests as its bytes stream through (`_SampleStream`: no second pass over the data); one
that differs, cannot be decoded or is missing because its shard ends early is counted and its slot
filled with another sample of the same share, so that batches stay full and step counts equal.
Strict mode (`strict=True`) instead verifies everything once at start and plans from the readable
samples only: no sample twice in an epoch. Every event is logged once, on one line, and counted in
`stats`.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from gd_train.config import ConfigError, latent_shape
from gd_train.data.buckets import BucketBatch, bucket_batches
from gd_train.data.shards import (
    SHARD_RE,
    Manifest,
    ShardFormatError,
    TeacherSample,
    count_samples,
    decode_sample,
    sample_digest,
)
from gd_train.model.backbone import pad_prompt_embeds

log = logging.getLogger(__name__)

STATE_VERSION = 2  # 1: per-rank micro-batches consumed, single length


@dataclass
class Batch:
    latents: torch.Tensor  # (B, 16, F, H, W) float32
    prompt_embeds: torch.Tensor  # (B, max_text_tokens, text_dim) float32, zero-padded
    keys: list[str]
    captions: list[str]

    def pin_memory(self) -> "Batch":  # called by DataLoader(pin_memory=True) on CUDA machines
        return Batch(self.latents.pin_memory(), self.prompt_embeds.pin_memory(), self.keys, self.captions)


# --------------------------------------------------------------------------------------------------
# Shard discovery
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardInfo:
    path: str
    samples: int  # planned samples: those stored, less `excluded`
    # Strict mode: stored indices found unreadable by the scan at start, left out of every plan.
    excluded: frozenset[int] = frozenset()
    # What the manifest records, for verifying the bytes while they stream through the reader:
    sha256: Optional[str] = None  # the whole file (manifests without per-sample digests)
    sample_sha256: Optional[tuple[str, ...]] = None  # one `sample_digest` per sample, in stored order
    latent_frames: Optional[int] = None  # the length of its clips (None: not recorded; read from a sample)


def discover_shards(spec: str) -> tuple[list[ShardInfo], dict[str, str]]:
    """Usable shards of a folder / brace pattern / glob, and why each other shard is left out.

    A folder that disagrees with its manifest is a problem per shard: one listed but missing, one
    present but never recorded as finished, one whose size differs. So is a shard named by a brace
    pattern that does not exist, and (without a manifest) a tar cut short."""
    paths, named_missing = _expand(spec)
    if not paths:
        raise ConfigError(f"key 'data.shards': '{spec}' names no shard-*.tar files "
                          "(expected a folder written by data_pipeline/gen_teacher.py, or a brace/glob pattern)")
    manifests: dict[str, Optional[Manifest]] = {}
    usable: list[ShardInfo] = []
    problems: dict[str, str] = {path: f"{path}: named by data.shards but missing" for path in named_missing}
    for path in paths:
        folder = str(Path(path).parent)
        if folder not in manifests:
            manifests[folder] = _load_manifest(folder)
        manifest = manifests[folder]
        record = manifest.shards.get(Path(path).name) if manifest else None
        try:
            if manifest is not None and record is None:
                raise ShardFormatError(f"{path}: not in {folder}/manifest.json (never recorded as finished by the "
                                       f"generator; left out unverified)")
            if record is not None:
                size = os.path.getsize(path)
                if size != record.bytes:
                    raise ShardFormatError(f"{path}: {size} bytes, the manifest says {record.bytes} (truncated or rewritten)")
                samples = record.samples
                if record.sample_sha256 is not None and len(record.sample_sha256) != samples:
                    raise ShardFormatError(f"{path}: the manifest records {samples} samples but "
                                           f"{len(record.sample_sha256)} sample digests")
            else:
                samples = count_samples(path)
        except ShardFormatError as exc:
            problems[path] = str(exc)
            continue
        except OSError as exc:
            problems[path] = f"{path}: {exc.strerror or exc}"
            continue
        if samples > 0:
            digests = tuple(record.sample_sha256) if record is not None and record.sample_sha256 is not None else None
            usable.append(ShardInfo(path=path, samples=samples, sha256=record.sha256 if record is not None else None,
                                    sample_sha256=digests, latent_frames=_recorded_length(manifest, record)))
    if os.path.isdir(spec) and manifests.get(str(Path(paths[0]).parent)) is not None:
        folder = str(Path(paths[0]).parent)
        present = {Path(p).name for p in paths}
        for name in sorted(set(manifests[folder].shards) - present):
            problems[os.path.join(folder, name)] = (f"{os.path.join(folder, name)}: listed in manifest.json but "
                                                    f"missing from the folder (deleted, or not copied)")
    return usable, dict(sorted(problems.items()))


def _recorded_length(manifest: Optional[Manifest], record) -> Optional[int]:
    """A shard's latent frames as its manifest records them: per shard, or one length for the folder."""
    frames = getattr(record, "latent_frames", None) if record is not None else None
    if frames is None and manifest is not None:
        shape = manifest.settings.get("latent_shape")
        frames = shape[1] if shape else None
    return int(frames) if frames is not None else None


def check_latent_shape(cfg, shards: Optional[Sequence[ShardInfo]] = None) -> None:
    """The shards' latent channels and size (C, H, W) against the config's video settings: from the
    manifest, or else from the first sample of the first shard (one sample read, not the data set). The
    length is each shard's own (a run trains on whatever lengths the data holds)."""
    c, _, h, w = latent_shape(cfg)
    try:
        manifest = Manifest.load(cfg.data.shards) if os.path.isdir(cfg.data.shards) else None
    except ShardFormatError:  # reported where the shards are discovered; the samples tell the shape
        manifest = None
    stored = manifest.settings.get("latent_shape") if manifest else None
    where = f"shards in '{cfg.data.shards}' hold"
    if stored is None and shards:
        first = _SampleStream((Piece(shards[0].path, 0, 1),), 0, None, {}).take(1, _Report())
        stored = tuple(first[0].latents.shape) if first else None
        where = f"{shards[0].path} holds"
    if stored is not None and (stored[0], stored[2], stored[3]) != (c, h, w):
        frames = "F" if stored[1] is None else stored[1]
        raise ConfigError(f"key 'data.shards': {where} latents ({stored[0]}, {frames}, {stored[2]}, {stored[3]}), "
                          f"the config's video settings (video.height, video.width) give ({c}, F, {h}, {w})")


def scan_unreadable(shards: Sequence[ShardInfo], expected_chw: Optional[tuple[int, int, int]]
                    ) -> dict[str, list[int]]:
    """Strict mode's pass at start: the stored index of every sample of `shards` that does not verify
    or decode (each damage logged once, on one line), by shard path."""
    by_path = {s.path: s for s in shards}
    found: dict[str, list[int]] = {}
    for shard in shards:
        shape = None
        if expected_chw is not None and shard.latent_frames is not None:
            shape = (expected_chw[0], shard.latent_frames, expected_chw[1], expected_chw[2])
        stream = _SampleStream((Piece(shard.path, 0, shard.samples),), 0, shape, by_path)
        for index, item in enumerate(stream._items):
            if isinstance(item, _Damage):
                found.setdefault(shard.path, []).append(index)
                if item.message:
                    log.warning("strict: %s", item.message)
    return found


ON_DAMAGE = ("continue", "refuse")


def refuse_damaged(problems: dict[str, str], on_damage: str) -> None:
    """`data.on_damage=refuse`: what is known damaged at start stops the run (one line per problem)."""
    if on_damage not in ON_DAMAGE:
        raise ConfigError(f"key 'data.on_damage': expected one of {'|'.join(ON_DAMAGE)}, got {on_damage!r}")
    if problems and on_damage == "refuse":
        raise ConfigError(f"key 'data.on_damage': refuse, and data.shards has {len(problems)} damaged or missing "
                          f"shard(s): " + "; ".join(problems.values()))


def _load_manifest(folder: str) -> Optional[Manifest]:
    """The folder's manifest; an unreadable one is reported and the tars are counted instead."""
    try:
        manifest = Manifest.load(folder)
    except ShardFormatError as exc:
        log.warning("%s; counting samples from the tar headers instead", exc)
        return None
    if manifest is not None and len(manifest.shards) < manifest.total_shards:
        log.warning("%s: %d of %d planned shards are finished (generation still running, or failed shards); "
                    "reading the finished ones", folder, len(manifest.shards), manifest.total_shards)
    return manifest


def _expand(spec: str) -> tuple[list[str], list[str]]:
    """(existing shard files, files a brace pattern names literally that do not exist)."""
    if os.path.isdir(spec):
        return sorted(str(p) for p in Path(spec).iterdir() if SHARD_RE.match(p.name)), []
    import braceexpand  # webdataset's own dependency, the syntax its URLs use

    found, missing = set(), set()
    for pattern in braceexpand.braceexpand(spec):
        if glob.has_magic(pattern):
            found.update(glob.glob(pattern))
        elif os.path.isfile(pattern):
            found.add(pattern)
        elif os.path.isdir(os.path.dirname(pattern) or "."):
            missing.add(pattern)  # a literal name: a shard the user asked for is gone
    return sorted(found), sorted(missing)


# --------------------------------------------------------------------------------------------------
# The epoch plan (pure, identical on every rank, independent of the world size)
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Piece:
    """Samples [start, stop) of one shard, in stored order."""

    path: str
    start: int
    stop: int


@dataclass(frozen=True)
class StepPlan:
    """One optimizer step of an epoch: its length and which block of its bucket's stream it reads."""

    index: int  # step within the epoch
    latent_frames: int
    block: int  # block of `samples_per_step` samples in the bucket's stream


@dataclass(frozen=True)
class EpochPlan:
    steps: tuple[StepPlan, ...]
    dropped_tail: int  # samples past the last whole step of each bucket
    streams: dict[int, tuple[ShardInfo, ...]]  # each bucket's shards, laid end to end in this epoch's order
    batches: dict[int, BucketBatch]

    def pieces(self, step: StepPlan, rank: int) -> tuple[Piece, ...]:
        """Rank `rank`'s contiguous share of the step's block (a few pieces of one or two shards)."""
        batch = self.batches[step.latent_frames]
        begin = step.block * batch.samples_per_step + rank * batch.samples_per_rank
        return _slice(self.streams[step.latent_frames], begin, begin + batch.samples_per_rank)

    def histogram(self) -> dict[int, int]:
        """Steps per bucket (latent frames -> steps) in this epoch."""
        counts: dict[int, int] = {}
        for step in self.steps:
            counts[step.latent_frames] = counts.get(step.latent_frames, 0) + 1
        return dict(sorted(counts.items()))


def _derive_seed(*parts: Any) -> int:
    """A 63-bit seed from labelled parts (stable across processes and Python versions; `hash` is not)."""
    text = "/".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


def plan_epoch(buckets: dict[int, Sequence[ShardInfo]], batches: dict[int, BucketBatch], *, epoch: int, seed: int,
               shuffle_buffer: int, resampled: bool) -> EpochPlan:
    """Per bucket: its shards in an order drawn from (seed, epoch, length) — or drawn with replacement
    (`resampled`) — cut into blocks of one step's samples (the rest is the bucket's dropped tail); blocks
    are permuted within windows of `shuffle_buffer` samples. Then the steps of all buckets are
    interleaved in an order drawn from (seed, epoch). Nothing here depends on the rank or world size."""
    streams, labels, dropped = {}, [], 0
    for frames in sorted(buckets):
        shards, per_step = list(buckets[frames]), batches[frames].samples_per_step
        total = sum(s.samples for s in shards)
        steps = total // per_step
        if resampled:
            rng, order, drawn = random.Random(_derive_seed("resample", seed, epoch, frames)), [], 0
            while drawn < steps * per_step:
                order.append(shards[rng.randrange(len(shards))])
                drawn += order[-1].samples
        else:
            order = shards
            random.Random(_derive_seed("shard-order", seed, epoch, frames)).shuffle(order)
            dropped += total - steps * per_step
        streams[frames] = tuple(order)
        window = max(1, shuffle_buffer // per_step)
        blocks = list(range(steps))
        for start in range(0, steps, window):
            part = blocks[start:start + window]
            random.Random(_derive_seed("blocks", seed, epoch, frames, start)).shuffle(part)
            blocks[start:start + window] = part
        labels.extend((frames, block) for block in blocks)
    # Interleave the buckets: shuffle which bucket each step reads, keeping each bucket's block order.
    kinds = [frames for frames, _ in labels]
    random.Random(_derive_seed("bucket-order", seed, epoch)).shuffle(kinds)
    queues = {frames: iter([b for f, b in labels if f == frames]) for frames in streams}
    steps = tuple(StepPlan(i, frames, next(queues[frames])) for i, frames in enumerate(kinds))
    return EpochPlan(steps=steps, dropped_tail=dropped, streams=streams, batches=dict(batches))


def _slice(order: Sequence[ShardInfo], begin: int, end: int) -> tuple[Piece, ...]:
    """The pieces of shards that hold stream positions [begin, end) of the shards laid end to end."""
    pieces, position = [], 0
    for shard in order:
        lo, hi = max(begin, position), min(end, position + shard.samples)
        if lo < hi:
            pieces.append(Piece(shard.path, lo - position, hi - position))
        position += shard.samples
        if position >= end:
            break
    return tuple(pieces)


# --------------------------------------------------------------------------------------------------
# Reading inside a DataLoader worker
# --------------------------------------------------------------------------------------------------
@dataclass
class _Report:
    """Events a worker met while preparing one batch (merged into `ShardReader.stats` by the loop)."""

    corrupt_samples: int = 0
    repeated_samples: int = 0
    corrupt_shards: list[str] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Damage:
    """A planned sample that could not be read."""

    shard: str
    message: str  # one line; "" for the rest of a shard already reported on one line
    shard_broken: bool  # the tar itself ended early (not just one undecodable sample)



@dataclass
class StepBatches:
    """One optimizer step's data on one rank: `accumulation_steps` micro-batches of one length."""

    epoch: int
    index: int  # step within the epoch
    latent_frames: int
    micro_batches: list[Batch]

    @property
    def samples(self) -> int:
        return sum(len(b.keys) for b in self.micro_batches)


@dataclass(frozen=True)
class _StepWork:
    step: StepPlan
    pieces: tuple[Piece, ...]
    batch: BucketBatch
    shuffle_seed: Optional[int]  # of this rank's samples within the step (None: stored order)


class _EpochDataset(IterableDataset):
    """Yields (StepBatches, _Report) for the steps of the DataLoader worker it runs in.

    Loader worker i gets work[i] (steps start+i, start+i+W, ...); the DataLoader's round-robin over
    workers then returns the steps in plan order."""

    def __init__(self, work: Sequence[Sequence[_StepWork]], *, epoch: int, max_text_tokens: int,
                 expected_chw: Optional[tuple[int, int, int]], buckets: dict[int, Sequence[ShardInfo]]):
        self.work = [list(w) for w in work]
        self.epoch = epoch
        self.max_text_tokens = max_text_tokens
        self.expected_chw = expected_chw
        self.buckets = {f: list(s) for f, s in buckets.items()}
        self._by_path = {shard.path: shard for shards in self.buckets.values() for shard in shards}

    def __iter__(self) -> Iterator[tuple[StepBatches, _Report]]:
        info = get_worker_info()
        for work in self.work[info.id if info is not None else 0]:
            yield self._read(work)

    def _shape(self, frames: int) -> Optional[tuple[int, ...]]:
        if self.expected_chw is None:
            return None
        c, h, w = self.expected_chw
        return (c, frames, h, w)

    def _read(self, work: _StepWork) -> tuple[StepBatches, _Report]:
        frames, batch, report = work.step.latent_frames, work.batch, _Report()
        slots = batch.samples_per_rank
        good = _SampleStream(work.pieces, 0, self._shape(frames), self._by_path).take(slots, report)
        if work.shuffle_seed is not None:
            random.Random(work.shuffle_seed).shuffle(good)
        if len(good) < slots:
            # Donors come from this step's share only (or a fixed fallback of the same length): a resumed
            # run has not read anything else, and must fill the slots exactly as before.
            donors = good or self._any_readable_sample(frames)
            report.repeated_samples = slots - len(good)
            report.messages.append(f"step {work.step.index} ({frames} latent frames): {slots - len(good)} unreadable "
                                   f"sample(s) replaced by repeats of readable ones (keeps batches full)")
            good = good + [donors[i % len(donors)] for i in range(slots - len(good))]
        m = batch.micro_batch_size
        micro = [self._collate(good[i * m:(i + 1) * m]) for i in range(batch.accumulation_steps)]
        return StepBatches(self.epoch, work.step.index, frames, micro), report

    def _any_readable_sample(self, frames: int) -> list[TeacherSample]:
        """Rare: a whole share unreadable. Borrow the first readable sample of this length (the same one
        every time); with none at all the bucket is gone and we say so."""
        shards = self.buckets.get(frames, [])
        for shard in shards:
            stream = _SampleStream((Piece(shard.path, 0, shard.samples),), 0, self._shape(frames), self._by_path)
            for _ in range(shard.samples):
                found = stream.take(1, _Report())
                if found:
                    return found
        raise ShardFormatError(f"no readable sample of {frames} latent frames in any of {len(shards)} shard(s) "
                               f"(first: {shards[0].path if shards else '-'})")

    def _collate(self, samples: list[TeacherSample]) -> Batch:
        return Batch(latents=torch.stack([s.latents.float() for s in samples]),
                     prompt_embeds=pad_prompt_embeds([s.prompt_embeds.float() for s in samples], self.max_text_tokens),
                     keys=[s.key for s in samples], captions=[s.caption for s in samples])


class _SampleStream:
    """A worker's planned samples in order, read with WebDataset one shard at a time, each verified
    against the manifest as its bytes stream through (no second pass over the data):

    - with per-sample digests, each sample's member bytes are hashed as they arrive, and one that
      differs is dropped on its own (the rest of the shard is used);
    - with only the whole file's sha256 (older manifests), the file is hashed as the tar streams
      through, and the piece's samples are held back until the digest agrees at the end of the file
      (a piece that stops early reads on to the end, hashing only). On a mismatch none of them is used.
      Holding back costs up to one shard of decoded samples per worker (64 x 8 MB at the 480p config);
    - without a manifest there is nothing to verify against: only the tar structure and decoding.
    """

    def __init__(self, pieces: Sequence[Piece], start_position: int, expected_latent_shape: Optional[tuple[int, ...]],
                 shards: dict[str, ShardInfo]):
        self.expected_latent_shape = expected_latent_shape
        self.shards = shards
        self._items = self._iterate(pieces, start_position)

    def take(self, count: int, report: _Report) -> list[TeacherSample]:
        good = []
        for _ in range(count):
            item = next(self._items, None)
            if item is None:
                break
            if isinstance(item, TeacherSample):
                good.append(item)
            else:
                report.corrupt_samples += 1
                if item.message:
                    report.messages.append(item.message)
                if item.shard_broken and item.shard not in report.corrupt_shards:
                    report.corrupt_shards.append(item.shard)
        return good

    def _iterate(self, pieces: Sequence[Piece], start_position: int) -> Iterator[TeacherSample | _Damage]:
        position = 0
        for piece in pieces:
            size = piece.stop - piece.start
            if position + size <= start_position:
                position += size
                continue
            skip = max(0, start_position - position)
            yield from self._read_piece(Piece(piece.path, piece.start + skip, piece.stop))
            position += size

    def _read_piece(self, piece: Piece) -> Iterator[TeacherSample | _Damage]:
        from webdataset.tariterators import group_by_keys, tar_file_expander

        info = self.shards.get(piece.path)
        digests = info.sample_sha256 if info is not None else None
        whole_sha = info.sha256 if info is not None and digests is None else None
        errors: list[str] = []

        def note(exc: Exception) -> bool:  # WebDataset's handler protocol: True = carry on
            errors.append(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            return True

        items: list[TeacherSample | _Damage] = []  # held back only under whole-file verification
        index = 0
        try:
            source = _HashingReader(piece.path, whole_sha is not None)
        except OSError as exc:
            errors.append(f"{exc.strerror or exc}")
            source = None
        if source is not None:
            with source:
                samples = group_by_keys(tar_file_expander([{"url": piece.path, "stream": source}], handler=note,
                                                          eof_value=None), handler=note)
                excluded = info.excluded if info is not None else frozenset()
                for stored, raw in enumerate(samples):  # `index` counts planned samples, `stored` all of them
                    if stored in excluded:
                        continue
                    if index >= piece.stop:
                        break
                    if index >= piece.start:
                        item = self._check(raw, stored, digests)
                        if whole_sha is None:
                            yield item
                        else:
                            items.append(item)
                    index += 1
                samples.close()
                if whole_sha is not None:
                    source.drain()
        cause = errors[0] if errors else "the tar ends early or a header is damaged"
        missing = [_Damage(piece.path, f"{piece.path}: sample #{i} missing, the shard ended after {index} ({cause})",
                           shard_broken=True) for i in range(max(index, piece.start), piece.stop)]
        if whole_sha is not None and source is not None and source.hexdigest() != whole_sha:
            planned = piece.stop - piece.start
            items = [_Damage(piece.path, f"{piece.path}: its bytes differ from the manifest's sha256 (damaged); "
                                         f"all {planned} sample(s) planned from it here are dropped" if i == 0 else "",
                             shard_broken=True) for i in range(planned)]
            missing = []
        yield from items
        yield from missing

    def _check(self, raw: dict[str, Any], index: int, digests: Optional[tuple[str, ...]]) -> TeacherSample | _Damage:
        source, key = str(raw.get("__url__")), str(raw.get("__key__", "?"))
        if digests is not None:
            members = {k: v for k, v in raw.items() if not k.startswith("__")}
            if index >= len(digests) or sample_digest(key, members) != digests[index]:
                return _Damage(source, f"{source}: sample '{key}' (#{index}) differs from the manifest's digest "
                                       f"(damaged bytes); dropped", shard_broken=False)
        return self._decode(raw)

    def _decode(self, raw: dict[str, Any]) -> TeacherSample | _Damage:
        source = str(raw.get("__url__"))
        try:
            sample = decode_sample(raw)
        except ShardFormatError as exc:
            return _Damage(source, str(exc), shard_broken=False)
        shape = tuple(sample.latents.shape)
        if self.expected_latent_shape is not None and shape != self.expected_latent_shape:
            return _Damage(source, f"{source}: sample '{sample.key}' has latents {shape}, expected "
                                   f"{self.expected_latent_shape} (video settings differ from the config)", False)
        return sample


class _HashingReader:
    """A shard file as the tar reader consumes it (sequential `read` only), optionally hashed on the way."""

    def __init__(self, path: str, hashed: bool):
        self.name = path
        self._fh = open(path, "rb")
        self._hash = hashlib.sha256() if hashed else None

    def read(self, size: int = -1) -> bytes:
        data = self._fh.read(size)
        if self._hash is not None:
            self._hash.update(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass

    def hexdigest(self) -> Optional[str]:
        return self._hash.hexdigest() if self._hash is not None else None

    def __enter__(self) -> "_HashingReader":
        return self

    def __exit__(self, *exc) -> None:
        self._fh.close()

    def __repr__(self) -> str:  # WebDataset appends it to error messages
        return self.name


def _identity(item: Any) -> Any:
    return item



# --------------------------------------------------------------------------------------------------
# The reader
# --------------------------------------------------------------------------------------------------
class ShardReader:
    """Steps of teacher samples for one rank; see the module docstring for the guarantees."""

    def __init__(self, shards: str, *, rank: int, world_size: int, micro_batch_size: int, num_workers: int,
                 seed: int, max_text_tokens: int, shuffle_buffer: int = 0, resampled: bool = False,
                 expected_latent_shape: Optional[Sequence[int]] = None, on_damage: str = "continue",
                 strict: bool = False, gather: Optional[Callable[[Any], list[Any]]] = None,
                 global_batch_size: Optional[int] = None, batch_unit: str = "samples",
                 micro_batch_policy: str = "fixed", micro_batch_table: Optional[dict[str, int]] = None,
                 latent_frames_range: tuple[Optional[int], Optional[int]] = (None, None)):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        if micro_batch_size < 1 or num_workers < 0 or shuffle_buffer < 0:
            raise ValueError(f"micro_batch_size >= 1, num_workers >= 0 and shuffle_buffer >= 0 expected, got "
                             f"{micro_batch_size}, {num_workers}, {shuffle_buffer}")
        self.spec, self.rank, self.world_size = shards, rank, world_size
        self.micro_batch_size, self.num_workers, self.seed = micro_batch_size, num_workers, seed
        self.max_text_tokens, self.shuffle_buffer, self.resampled = max_text_tokens, shuffle_buffer, resampled
        shape = tuple(expected_latent_shape) if expected_latent_shape else None
        # (C, H, W) checked on every sample; a 4-tuple (C, F, H, W) also fixes the length.
        self.expected_chw = (shape[0], shape[-2], shape[-1]) if shape else None
        low, high = latent_frames_range
        if shape is not None and len(shape) == 4:
            low, high = shape[1], shape[1]

        self.shards, problems = discover_shards(shards)
        refuse_damaged(problems, on_damage)
        if rank == 0:  # the same on every rank: reported once
            for line in problems.values():
                log.warning("skipping shard: %s", line)
        self.shards = _with_lengths(self.shards)
        self.shards, outside = _within(self.shards, low, high)
        if rank == 0 and outside:
            log.warning("leaving out %s", outside)
        self.excluded_samples = 0
        if strict:
            self.shards = self._exclude_unreadable(gather)
        self.buckets: dict[int, list[ShardInfo]] = {}
        for shard in self.shards:
            self.buckets.setdefault(shard.latent_frames, []).append(shard)
        self.samples_per_epoch = sum(s.samples for s in self.shards)
        self.batches = bucket_batches(self.buckets, world_size=world_size, micro_batch_size=micro_batch_size,
                                      global_batch_size=global_batch_size, batch_unit=batch_unit,
                                      policy=micro_batch_policy, table=micro_batch_table)
        if not any(sum(s.samples for s in self.buckets[f]) >= b.samples_per_step for f, b in self.batches.items()):
            need = min((b.samples_per_step for b in self.batches.values()), default=world_size * micro_batch_size)
            raise ConfigError(
                f"key 'data.shards': '{shards}' holds {self.samples_per_epoch} readable sample(s) in "
                f"{len(self.shards)} shard(s) ({_describe(self.buckets)}), no length with one step's "
                f"{need} samples: not one step is possible")
        self._epoch, self._consumed = 0, 0
        self._corrupt_shards: set[str] = set(problems)
        self._skipped = sorted(problems)  # left out at start: the same on every rank
        self._counters = {"corrupt_samples": 0, "repeated_samples": 0}
        self._plans: dict[int, EpochPlan] = {}

    def _exclude_unreadable(self, gather: Optional[Callable[[Any], list[Any]]]) -> list[ShardInfo]:
        """Strict mode: scan the shards once (rank r the r-th share when `gather`, an all-gather over the
        ranks, is given; all of them otherwise) and plan from the readable samples only."""
        share = self.shards[self.rank::self.world_size] if gather else self.shards
        found = scan_unreadable(share, self.expected_chw)
        if gather:
            merged: dict[str, list[int]] = {}
            for part in gather(found):
                merged.update(part)
            found = merged
        self.excluded_samples = sum(len(v) for v in found.values())
        out = []
        for shard in self.shards:
            bad = frozenset(found.get(shard.path, ()))
            if len(bad) < shard.samples:
                out.append(replace(shard, samples=shard.samples - len(bad), excluded=bad))
        return out

    @classmethod
    def from_config(cls, cfg, *, rank: int, world_size: int,
                    gather: Optional[Callable[[Any], list[Any]]] = None,
                    global_batch_size: Optional[int] = None) -> "ShardReader":
        """The reader of a run: `global_batch_size` is the trainer's (None: one micro-batch per step)."""
        c, _, h, w = latent_shape(cfg)
        check_latent_shape(cfg)
        t, d = cfg.train, cfg.data
        return cls(d.shards, rank=rank, world_size=world_size, micro_batch_size=t.micro_batch_size,
                   num_workers=d.num_workers, seed=cfg.seed, max_text_tokens=cfg.model.max_text_tokens,
                   shuffle_buffer=d.shuffle_buffer, resampled=d.resampled, expected_latent_shape=(c, h, w),
                   on_damage=d.on_damage, strict=d.strict, gather=gather, global_batch_size=global_batch_size,
                   batch_unit=t.batch_unit, micro_batch_policy=t.micro_batch_policy,
                   micro_batch_table=dict(t.micro_batch_table), latent_frames_range=run_frames_range(cfg))

    # ----------------------------------------------------------------------------------------------
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch, identical on every rank: computed from the shard list, never from
        what a rank has read."""
        return len(self.plan(self._epoch).steps)

    def plan(self, epoch: int) -> EpochPlan:
        if epoch not in self._plans:
            self._plans = {epoch: plan_epoch(self.buckets, self.batches, epoch=epoch, seed=self.seed,
                                             shuffle_buffer=self.shuffle_buffer, resampled=self.resampled)}
        return self._plans[epoch]

    def steps(self, epoch: int) -> Iterator[StepBatches]:
        """This rank's steps of `epoch`, continuing after a restored position of that epoch."""
        start = self._consumed if epoch == self._epoch else 0
        self._epoch, self._consumed = epoch, start
        plan = self.plan(epoch)
        if start >= len(plan.steps):
            return
        workers = max(1, self.num_workers)
        work = [[_StepWork(step, plan.pieces(step, self.rank), plan.batches[step.latent_frames],
                           _derive_seed("shuffle", self.seed, epoch, step.index, self.rank)
                           if self.shuffle_buffer > 0 else None)
                 for step in plan.steps[start + i::workers]] for i in range(workers)]
        dataset = _EpochDataset(work, epoch=epoch, max_text_tokens=self.max_text_tokens,
                                expected_chw=self.expected_chw, buckets=self.buckets)
        loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers, collate_fn=_identity,
                            pin_memory=torch.cuda.is_available())
        for step_batches, report in loader:
            self._absorb(report)
            self._consumed += 1  # counted before the hand-over: a checkpoint taken after it resumes past it
            yield step_batches
        if self._consumed != len(plan.steps):  # the plan guarantees this; a mismatch is a bug, not bad data
            raise RuntimeError(f"rank {self.rank}: epoch {epoch} gave {self._consumed} steps, "
                               f"planned {len(plan.steps)}")

    def epoch(self, epoch: int) -> Iterator[Batch]:
        """This rank's micro-batches of `epoch`, in order (the steps' micro-batches one after another)."""
        for step in self.steps(epoch):
            yield from step.micro_batches

    def _absorb(self, report: _Report) -> None:
        self._counters["corrupt_samples"] += report.corrupt_samples
        self._counters["repeated_samples"] += report.repeated_samples
        self._corrupt_shards.update(report.corrupt_shards)
        for line in report.messages:
            log.warning("rank %d: %s", self.rank, line)

    # ----------------------------------------------------------------------------------------------
    def _layout(self) -> dict[str, Any]:
        """What fixes the sample content of every step, independent of the world size."""
        return {"seed": self.seed, "shuffle_buffer": self.shuffle_buffer, "resampled": self.resampled,
                "samples_per_step": {str(f): b.samples_per_step for f, b in sorted(self.batches.items())},
                "shards": hashlib.sha256(repr([(Path(s.path).name, s.samples) for s in self.shards]).encode()).hexdigest()}

    def state_dict(self) -> dict[str, Any]:
        """The position is global: (epoch, steps consumed) in a plan that all ranks share and that does
        not depend on the world size, so any number of ranks can continue it."""
        plan = self.plan(self._epoch)
        upcoming = plan.steps[self._consumed] if self._consumed < len(plan.steps) else None
        return {"version": STATE_VERSION, "rank": self.rank, "world_size": self.world_size, "epoch": self._epoch,
                "steps_consumed": self._consumed, "steps_in_epoch": len(plan.steps),
                "next_latent_frames": upcoming.latent_frames if upcoming else None,
                "bucket_steps": {str(f): n for f, n in plan.histogram().items()},
                "layout": self._layout(), "counters": dict(self._counters),
                "corrupt_shards": sorted(self._corrupt_shards), "skipped_shards": sorted(self._skipped)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        version = state.get("version")
        if version not in (1, STATE_VERSION):
            raise ValueError(f"reader state version {version!r}, expected {STATE_VERSION}")
        epoch = int(state["epoch"])
        steps = len(self.plan(epoch).steps)
        if version == 1:  # a position in per-rank micro-batches of a single-length plan
            old = state["layout"]
            fraction = int(state["batches_consumed"]) * old["world_size"] * old["micro_batch_size"] / max(1, self.samples_per_epoch)
            consumed = min(steps, int(fraction * steps))
            log.warning("rank %d: reader position of an older format; resuming epoch %d at step %d "
                        "(approximate: the sample order differs)", self.rank, epoch, consumed)
        elif state["layout"] != self._layout():
            # Exact continuation needs the same plan. A changed layout or shard set (a shard lost since)
            # still resumes in the same epoch, at the same fraction of it, and says so.
            saved, now = state["layout"], self._layout()
            changed = sorted(k for k in now if saved.get(k) != now[k])
            consumed = min(steps, int(state["steps_consumed"]) * steps // max(1, int(state["steps_in_epoch"])))
            log.warning("rank %d: reader position saved under a different %s; resuming epoch %d at step %d "
                        "(approximate: the sample order differs)", self.rank, ", ".join(changed), epoch, consumed)
        else:
            consumed = int(state["steps_consumed"])
            if int(state.get("world_size", self.world_size)) != self.world_size and self.rank == 0:
                log.warning("reader position of %d rank(s) continued on %d: epoch %d from step %d, each step's "
                            "samples re-split over the ranks (none repeated or skipped)",
                            int(state["world_size"]), self.world_size, epoch, consumed)
        self._epoch, self._consumed = epoch, consumed
        same_rank = int(state.get("rank", self.rank)) == self.rank and int(state.get("world_size", self.world_size)) == self.world_size
        if same_rank:  # per-rank counters; on another world size they restart (the totals stay rank 0's)
            self._counters.update({k: int(v) for k, v in state.get("counters", {}).items() if k in self._counters})
        self._corrupt_shards.update(state.get("corrupt_shards", []))

    @property
    def stats(self) -> dict[str, Any]:
        plan = self.plan(self._epoch)
        return {"shards": len(self.shards), "samples_per_epoch": self.samples_per_epoch,
                "steps_per_epoch": len(plan.steps), "corrupt_shards": len(self._corrupt_shards),
                "skipped_shards": len(self._skipped), "excluded_samples": self.excluded_samples,
                "broken_shards": len(self._corrupt_shards - set(self._skipped)),
                "corrupt_samples": self._counters["corrupt_samples"],
                "repeated_samples": self._counters["repeated_samples"],
                "dropped_tail_samples": plan.dropped_tail, "epoch": self._epoch,
                "steps_consumed": self._consumed, "bucket_steps": plan.histogram()}


def check_batches(cfg, shards: Sequence[ShardInfo], world_size: int) -> dict[int, BucketBatch]:
    """Before any rank starts: the run's lengths (data.min_frames/max_frames) and the global batch at
    each length the data holds, on this world size (one line for what cannot divide or run a step)."""
    t, d = cfg.train, cfg.data
    kept, outside = _within(_with_lengths(shards), *run_frames_range(cfg))
    buckets: dict[int, list[ShardInfo]] = {}
    for shard in kept:
        buckets.setdefault(shard.latent_frames, []).append(shard)
    batches = bucket_batches(buckets, world_size=world_size, micro_batch_size=t.micro_batch_size,
                             global_batch_size=t.global_batch_size, batch_unit=t.batch_unit,
                             policy=t.micro_batch_policy, table=dict(t.micro_batch_table))
    if not any(sum(s.samples for s in buckets[f]) >= b.samples_per_step for f, b in batches.items()):
        raise ConfigError(f"key 'data.shards': '{d.shards}' holds {_describe(buckets)} readable sample(s)"
                          f"{' (left out: ' + outside + ')' if outside else ''}, no length with one step's samples "
                          f"({', '.join(f'{b.samples_per_step} at {f}' for f, b in batches.items()) or 'none'}): "
                          f"not one step is possible")
    return batches


def run_frames_range(cfg) -> tuple[Optional[int], Optional[int]]:
    """data.min_frames / data.max_frames (pixel frames) as latent frames; None: no bound."""
    d = cfg.data
    return tuple(None if n is None else latent_frames_of(int(n), f"data.{k}")
                 for n, k in ((d.min_frames, "min_frames"), (d.max_frames, "max_frames")))


def latent_frames_of(pixel_frames: int, key: str) -> int:
    if pixel_frames < 1 or (pixel_frames - 1) % 4:
        raise ConfigError(f"key '{key}': {pixel_frames} is not 1 + 4k frames (the Wan VAE compresses time by 4)")
    return 1 + (pixel_frames - 1) // 4


def _with_lengths(shards: Sequence[ShardInfo]) -> list[ShardInfo]:
    """Every shard with its clip length: the manifest's, else its first sample's (one sample read)."""
    out = []
    for shard in shards:
        if shard.latent_frames is None:
            first = _SampleStream((Piece(shard.path, 0, 1),), 0, None, {}).take(1, _Report())
            if not first:
                continue  # unreadable from its first sample: reported when it is read (or by strict mode)
            shard = replace(shard, latent_frames=int(first[0].latents.shape[1]))
        out.append(shard)
    return out


def _within(shards: Sequence[ShardInfo], low: Optional[int], high: Optional[int]) -> tuple[list[ShardInfo], str]:
    """The shards whose length lies in [low, high] latent frames, and one line on those left out."""
    kept = [s for s in shards if (low is None or s.latent_frames >= low) and (high is None or s.latent_frames <= high)]
    out = [s for s in shards if s not in kept]
    if not out:
        return kept, ""
    lengths = sorted({s.latent_frames for s in out})
    return kept, (f"{len(out)} shard(s), {sum(s.samples for s in out)} sample(s) of {lengths} latent frames: "
                  f"outside the run's lengths ({low or 1}..{high or 'any'} latent frames, data.min_frames/max_frames)")


def _describe(buckets: dict[int, Sequence[ShardInfo]]) -> str:
    return ", ".join(f"{sum(s.samples for s in shards)} of {f} latent frames" for f, shards in sorted(buckets.items())) or "none"
