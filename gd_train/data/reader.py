"""The training-side reader of teacher shards: equal steps on every rank, exact mid-epoch resume.

An epoch is planned up front, identically on every rank, from the shard list and the sample count of
each shard (read from `manifest.json`, or from tar headers when there is none):

1. the shards are put in an order drawn from (seed, epoch) and their samples laid end to end;
2. the stream is cut at a multiple of world_size x micro_batch_size — the few samples past it (fewer
   than one global batch) are this epoch's dropped tail, reported in `stats` — so every rank gets the
   same number of steps and no collective waits on a rank that ran dry;
3. rank r takes the r-th contiguous span; within it, DataLoader worker w takes every W-th batch, read
   from a contiguous sub-span (so each worker opens few shards);
4. inside a worker, samples are shuffled within consecutive windows of `shuffle_buffer` samples, with
   a generator seeded by (seed, epoch, rank, worker, window).

Why our own assignment rather than `wds.split_by_node` / `split_by_worker` + `wds.shuffle`: those hand
out whole shards round-robin (ranks with more shards run more steps, and a collective hangs) and keep
their shuffle state inside the workers, so a position cannot be saved. Here every batch's content is a
function of (seed, epoch, layout, batch index): the position is just (epoch, batches consumed), and
resuming replays the plan from the window that holds the next batch. WebDataset still does the reading
(`wds.tarfile_samples`), and `gd_train.data.shards` the decoding.

`resampled=True` draws each worker's shards with replacement instead (same steps per epoch, no tail).

Damage never stops training (unless `data.on_damage=refuse`, for what is known at start): a shard
missing from the folder, unrecorded in its manifest, of another size than the manifest says, or whose
tar is cut short, is left out of the plan when the reader starts. Every sample is verified against the
manifest's digests as its bytes stream through (`_SampleStream`: no second pass over the data); one
that differs, cannot be decoded or is missing because its shard ends early is counted and its slot
filled with another sample of the same window, so that batches stay full and step counts equal.
Strict mode (`strict=True`) instead verifies everything once at start and plans from the readable
samples only: no sample twice in an epoch. Every event is logged once, on one line, and counted in
`stats`.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import math
import os
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from gd_train.config import ConfigError, latent_shape
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

STATE_VERSION = 1


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
                                    sample_sha256=digests))
    if os.path.isdir(spec) and manifests.get(str(Path(paths[0]).parent)) is not None:
        folder = str(Path(paths[0]).parent)
        present = {Path(p).name for p in paths}
        for name in sorted(set(manifests[folder].shards) - present):
            problems[os.path.join(folder, name)] = (f"{os.path.join(folder, name)}: listed in manifest.json but "
                                                    f"missing from the folder (deleted, or not copied)")
    return usable, dict(sorted(problems.items()))


def check_latent_shape(cfg, shards: Optional[Sequence[ShardInfo]] = None) -> None:
    """The shards' latent shape against the config's video settings: from the manifest, or else from
    the first sample of the first shard (one sample read, not the data set)."""
    expected = tuple(latent_shape(cfg))
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
    if stored is not None and tuple(stored) != expected:
        raise ConfigError(f"key 'data.shards': {where} latents {tuple(stored)}, the config's video settings "
                          f"(video.num_frames, video.height, video.width) give {expected}")


def scan_unreadable(shards: Sequence[ShardInfo], expected_latent_shape: Optional[tuple[int, ...]]
                    ) -> dict[str, list[int]]:
    """Strict mode's pass at start: the stored index of every sample of `shards` that does not verify
    or decode (each damage logged once, on one line), by shard path."""
    by_path = {s.path: s for s in shards}
    found: dict[str, list[int]] = {}
    for shard in shards:
        stream = _SampleStream((Piece(shard.path, 0, shard.samples),), 0, expected_latent_shape, by_path)
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
# The epoch plan (pure, identical on every rank)
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Piece:
    """Samples [start, stop) of one shard, in stored order."""

    path: str
    start: int
    stop: int


@dataclass(frozen=True)
class WorkerPlan:
    """What one logical DataLoader worker yields in an epoch."""

    worker: int
    pieces: tuple[Piece, ...]
    num_batches: int
    seed: int  # of this worker's window shuffles


@dataclass(frozen=True)
class EpochPlan:
    steps: int
    dropped_tail: int
    workers: tuple[WorkerPlan, ...]


def _derive_seed(*parts: Any) -> int:
    """A 63-bit seed from labelled parts (stable across processes and Python versions; `hash` is not)."""
    text = "/".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


def plan_epoch(shards: Sequence[ShardInfo], *, epoch: int, seed: int, rank: int, world_size: int,
               num_workers: int, micro_batch_size: int, resampled: bool) -> EpochPlan:
    total = sum(s.samples for s in shards)
    global_batch = world_size * micro_batch_size
    steps = total // global_batch
    per_rank = steps * micro_batch_size
    workers = max(1, num_workers)
    batches = [len(range(w, steps, workers)) for w in range(workers)]  # worker w serves batches w, w+W, ...
    plans = []
    if resampled:
        for w in range(workers):
            wseed = _derive_seed("resample", seed, epoch, rank, w)
            plans.append(WorkerPlan(w, _resampled_pieces(shards, batches[w] * micro_batch_size, wseed), batches[w],
                                    _derive_seed("shuffle", seed, epoch, rank, w)))
        return EpochPlan(steps=steps, dropped_tail=0, workers=tuple(plans))

    order = list(shards)
    random.Random(_derive_seed("shard-order", seed, epoch)).shuffle(order)
    span_start = rank * per_rank
    offset = span_start
    for w in range(workers):
        count = batches[w] * micro_batch_size
        plans.append(WorkerPlan(w, _slice(order, offset, offset + count), batches[w],
                                _derive_seed("shuffle", seed, epoch, rank, w)))
        offset += count
    return EpochPlan(steps=steps, dropped_tail=total - steps * global_batch, workers=tuple(plans))


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


def _resampled_pieces(shards: Sequence[ShardInfo], count: int, seed: int) -> tuple[Piece, ...]:
    rng, pieces = random.Random(seed), []
    while count > 0:
        shard = shards[rng.randrange(len(shards))]
        take = min(count, shard.samples)
        pieces.append(Piece(shard.path, 0, take))
        count -= take
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


@dataclass(frozen=True)
class _Assignment:
    plan: WorkerPlan
    first_batch: int  # batches of this worker already consumed (resume)


class _EpochDataset(IterableDataset):
    """Yields (Batch, _Report) for the assignment of the DataLoader worker it runs in.

    Loader worker i gets assignments[i]; the DataLoader's round-robin over workers then returns
    batches in plan order (i = 0, 1, ..., W-1, 0, 1, ...), which is why assignments are rotated on
    resume so that the worker owning the next batch comes first.
    """

    def __init__(self, assignments: Sequence[_Assignment], *, micro_batch_size: int, window_batches: int,
                 shuffle: bool, max_text_tokens: int, expected_latent_shape: Optional[tuple[int, ...]],
                 fallback: Sequence[ShardInfo]):
        self.assignments = list(assignments)
        self.micro_batch_size = micro_batch_size
        self.window_batches = window_batches
        self.shuffle = shuffle
        self.max_text_tokens = max_text_tokens
        self.expected_latent_shape = expected_latent_shape
        self.fallback = list(fallback)
        self._by_path = {shard.path: shard for shard in self.fallback}

    def __iter__(self) -> Iterator[tuple[Batch, _Report]]:
        info = get_worker_info()
        if info is None:  # num_workers = 0: one logical worker, in this process
            assert len(self.assignments) == 1
            yield from self._run(self.assignments[0])
        else:
            yield from self._run(self.assignments[info.id])

    def _run(self, assignment: _Assignment) -> Iterator[tuple[Batch, _Report]]:
        plan, B = assignment.plan, self.micro_batch_size
        window_size = self.window_batches * B
        first_window = assignment.first_batch // self.window_batches
        stream = _SampleStream(plan.pieces, first_window * window_size, self.expected_latent_shape,
                               self._by_path)
        for window in range(first_window, math.ceil(plan.num_batches / self.window_batches)):
            batches_here = min(self.window_batches, plan.num_batches - window * self.window_batches)
            report = _Report()
            good = stream.take(batches_here * B, report)
            if self.shuffle:
                random.Random(_derive_seed(plan.seed, window)).shuffle(good)
            slots = batches_here * B
            if len(good) < slots:
                # Donors come from this window only (or a fixed fallback), never from an earlier window:
                # a resumed worker has not read those, and must fill the slots exactly as before.
                donors = good or self._any_readable_sample()
                report.repeated_samples = slots - len(good)
                report.messages.append(f"worker {plan.worker} window {window}: {slots - len(good)} unreadable "
                                       f"sample(s) replaced by repeats of readable ones (keeps batches full)")
                good = good + [donors[i % len(donors)] for i in range(slots - len(good))]
            skip = assignment.first_batch - window * self.window_batches if window == first_window else 0
            if skip > 0:
                report = _Report()  # the original run already counted this window's events
            for b in range(skip, batches_here):
                yield self._collate(good[b * B:(b + 1) * B]), report
                report = _Report()

    def _any_readable_sample(self) -> list[TeacherSample]:
        """Rare: a whole window unreadable. Borrow the first readable sample of the data set (the
        same one every time); with none at all the data set is gone and we say so."""
        for shard in self.fallback:
            stream = _SampleStream((Piece(shard.path, 0, shard.samples),), 0, self.expected_latent_shape,
                                   self._by_path)
            for _ in range(shard.samples):
                found = stream.take(1, _Report())
                if found:
                    return found
        raise ShardFormatError(f"no readable sample in any of {len(self.fallback)} shard(s) "
                               f"(first: {self.fallback[0].path if self.fallback else '-'})")

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
    """Batches of teacher samples for one rank; see the module docstring for the guarantees."""

    def __init__(self, shards: str, *, rank: int, world_size: int, micro_batch_size: int, num_workers: int,
                 seed: int, max_text_tokens: int, shuffle_buffer: int = 0, resampled: bool = False,
                 expected_latent_shape: Optional[Sequence[int]] = None, on_damage: str = "continue",
                 strict: bool = False, gather: Optional[Callable[[Any], list[Any]]] = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        if micro_batch_size < 1 or num_workers < 0 or shuffle_buffer < 0:
            raise ValueError(f"micro_batch_size >= 1, num_workers >= 0 and shuffle_buffer >= 0 expected, got "
                             f"{micro_batch_size}, {num_workers}, {shuffle_buffer}")
        self.spec, self.rank, self.world_size = shards, rank, world_size
        self.micro_batch_size, self.num_workers, self.seed = micro_batch_size, num_workers, seed
        self.max_text_tokens, self.shuffle_buffer, self.resampled = max_text_tokens, shuffle_buffer, resampled
        self.expected_latent_shape = tuple(expected_latent_shape) if expected_latent_shape else None
        # A window is a whole number of batches, so a resume point always falls on a batch boundary.
        self.window_batches = max(1, math.ceil(shuffle_buffer / micro_batch_size))

        self.shards, problems = discover_shards(shards)
        refuse_damaged(problems, on_damage)
        if rank == 0:  # the same on every rank: reported once
            for line in problems.values():
                log.warning("skipping shard: %s", line)
        self.excluded_samples = 0
        if strict:
            self.shards = self._exclude_unreadable(gather)
        self.samples_per_epoch = sum(s.samples for s in self.shards)
        if self.samples_per_epoch < world_size * micro_batch_size:
            raise ConfigError(
                f"key 'data.shards': '{shards}' holds {self.samples_per_epoch} readable sample(s) in "
                f"{len(self.shards)} shard(s), fewer than world_size x micro_batch_size = "
                f"{world_size * micro_batch_size}: not one step is possible")
        self._epoch, self._consumed = 0, 0
        self._corrupt_shards: set[str] = set(problems)
        self._skipped = sorted(problems)  # left out at start: the same on every rank
        self._counters = {"corrupt_samples": 0, "repeated_samples": 0}

    def _exclude_unreadable(self, gather: Optional[Callable[[Any], list[Any]]]) -> list[ShardInfo]:
        """Strict mode: scan the shards once (rank r the r-th share when `gather`, an all-gather over the
        ranks, is given; all of them otherwise) and plan from the readable samples only."""
        share = self.shards[self.rank::self.world_size] if gather else self.shards
        found = scan_unreadable(share, self.expected_latent_shape)
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
                    gather: Optional[Callable[[Any], list[Any]]] = None) -> "ShardReader":
        expected = latent_shape(cfg)
        check_latent_shape(cfg)
        return cls(cfg.data.shards, rank=rank, world_size=world_size, micro_batch_size=cfg.train.micro_batch_size,
                   num_workers=cfg.data.num_workers, seed=cfg.seed, max_text_tokens=cfg.model.max_text_tokens,
                   shuffle_buffer=cfg.data.shuffle_buffer, resampled=cfg.data.resampled,
                   expected_latent_shape=expected, on_damage=cfg.data.on_damage, strict=cfg.data.strict, gather=gather)

    # ----------------------------------------------------------------------------------------------
    def steps_per_epoch(self) -> int:
        """Identical on every rank: computed from the shard list, never from what a rank has read."""
        return self.samples_per_epoch // (self.world_size * self.micro_batch_size)

    def plan(self, epoch: int) -> EpochPlan:
        return plan_epoch(self.shards, epoch=epoch, seed=self.seed, rank=self.rank, world_size=self.world_size,
                          num_workers=self.num_workers, micro_batch_size=self.micro_batch_size,
                          resampled=self.resampled)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        """This rank's batches of `epoch`, continuing after a restored position of that epoch."""
        start = self._consumed if epoch == self._epoch else 0
        self._epoch, self._consumed = epoch, start
        plan = self.plan(epoch)
        if start >= plan.steps:
            return
        workers = len(plan.workers)
        # Plan batch j is served by worker j % W; the first loader worker must own batch `start`.
        assignments = [_Assignment(plan.workers[(start + i) % workers],
                                   first_batch=len(range((start + i) % workers, start, workers)))
                       for i in range(workers)]
        dataset = _EpochDataset(assignments, micro_batch_size=self.micro_batch_size,
                                window_batches=self.window_batches, shuffle=self.shuffle_buffer > 0,
                                max_text_tokens=self.max_text_tokens,
                                expected_latent_shape=self.expected_latent_shape, fallback=self.shards)
        loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers, collate_fn=_identity,
                            pin_memory=torch.cuda.is_available())
        for batch, report in loader:
            self._absorb(report)
            self._consumed += 1  # counted before the hand-over: a checkpoint taken after it resumes past it
            yield batch
        if self._consumed != plan.steps:  # the plan guarantees this; a mismatch is a bug, not bad data
            raise RuntimeError(f"rank {self.rank}: epoch {epoch} gave {self._consumed} batches, planned {plan.steps}")

    def _absorb(self, report: _Report) -> None:
        self._counters["corrupt_samples"] += report.corrupt_samples
        self._counters["repeated_samples"] += report.repeated_samples
        self._corrupt_shards.update(report.corrupt_shards)
        for line in report.messages:
            log.warning("rank %d: %s", self.rank, line)

    # ----------------------------------------------------------------------------------------------
    def _layout(self) -> dict[str, Any]:
        return {"world_size": self.world_size, "num_workers": max(1, self.num_workers),
                "micro_batch_size": self.micro_batch_size, "seed": self.seed, "shuffle_buffer": self.shuffle_buffer,
                "resampled": self.resampled,
                "shards": hashlib.sha256(repr([(Path(s.path).name, s.samples) for s in self.shards]).encode()).hexdigest()}

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "rank": self.rank, "epoch": self._epoch,
                "batches_consumed": self._consumed, "layout": self._layout(), "counters": dict(self._counters),
                "corrupt_shards": sorted(self._corrupt_shards), "skipped_shards": sorted(self._skipped)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"reader state version {state.get('version')!r}, expected {STATE_VERSION}")
        epoch, consumed = int(state["epoch"]), int(state["batches_consumed"])
        saved, now = state["layout"], self._layout()
        if saved != now:
            # Exact continuation needs the same plan. A changed layout or shard set (a shard lost since)
            # still resumes in the same epoch, at the same fraction of it, and says so.
            changed = sorted(k for k in now if saved.get(k) != now[k])
            old_global = saved["world_size"] * saved["micro_batch_size"]
            consumed = min(self.steps_per_epoch(), consumed * old_global // (self.world_size * self.micro_batch_size))
            log.warning("rank %d: reader position saved under a different %s; resuming epoch %d at batch %d "
                        "(approximate: the sample order differs)", self.rank, ", ".join(changed), epoch, consumed)
        self._epoch, self._consumed = epoch, consumed
        self._counters.update({k: int(v) for k, v in state.get("counters", {}).items() if k in self._counters})
        self._corrupt_shards.update(state.get("corrupt_shards", []))

    @property
    def stats(self) -> dict[str, int]:
        return {"shards": len(self.shards), "samples_per_epoch": self.samples_per_epoch,
                "steps_per_epoch": self.steps_per_epoch(), "corrupt_shards": len(self._corrupt_shards),
                "skipped_shards": len(self._skipped), "excluded_samples": self.excluded_samples,
                "broken_shards": len(self._corrupt_shards - set(self._skipped)),
                "corrupt_samples": self._counters["corrupt_samples"],
                "repeated_samples": self._counters["repeated_samples"],
                "dropped_tail_samples": self.plan(self._epoch).dropped_tail, "epoch": self._epoch,
                "batches_consumed": self._consumed}
