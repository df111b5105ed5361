"""Batch arithmetic per clip length: how many samples one optimizer step holds at each length.

Every optimizer step reads clips of one length (a *bucket*: one latent-frame count), the same on every
rank, so that all ranks build the same graph and issue the same ZeRO collectives. At latent length F a
step is `accumulation_steps` micro-steps of `micro_batch_size` samples on each of `world_size` ranks:

- the micro-batch: `micro_batch_size` at every length (policy `fixed`), or a token budget — the tokens
  of `micro_batch_size` clips of the shortest length, so `micro_batch_size * F_min // F` clips (at least
  one) at length F (`token_budget`); a table {F: micro-batch} overrides either for the lengths it names;
- the step (`batch_unit`): `samples` — `global_batch_size` samples at every length, the accumulation
  steps recomputed per length; `tokens` — the accumulation of the shortest length at every length, so a
  step holds about the tokens of `global_batch_size` shortest clips (fewer samples at longer lengths).

`samples_per_step` never depends on the world size, which is what lets a run resume on another number
of ranks with the same global batches (gd_train.data.reader plans whole global steps). Losses are
averaged per sample within a step (every micro-batch of a step has the same size), so a longer clip
weighs as much as a shorter one; per-chunk weighting is not offered (docs/training.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Optional

from gd_train.config import ConfigError

BATCH_UNITS = ("samples", "tokens")
MICRO_BATCH_POLICIES = ("fixed", "token_budget")


@dataclass(frozen=True)
class BucketBatch:
    latent_frames: int
    micro_batch_size: int  # per rank and micro-step
    accumulation_steps: int
    world_size: int

    @property
    def samples_per_rank(self) -> int:
        return self.micro_batch_size * self.accumulation_steps

    @property
    def samples_per_step(self) -> int:
        return self.samples_per_rank * self.world_size


def micro_batch_at(frames: int, shortest: int, micro_batch_size: int, policy: str,
                   table: Optional[Mapping[str, int]] = None) -> int:
    if table and str(frames) in table:
        return int(table[str(frames)])
    if policy == "token_budget":
        return max(1, micro_batch_size * shortest // frames)
    return micro_batch_size


def bucket_batches(lengths: Iterable[int], *, world_size: int, micro_batch_size: int,
                   global_batch_size: Optional[int] = None, batch_unit: str = "samples", policy: str = "fixed",
                   table: Optional[Mapping[str, int]] = None) -> dict[int, BucketBatch]:
    """{latent frames: BucketBatch} for the lengths a data set holds; a length at which the global batch
    cannot be divided is refused in one line naming the keys and numbers. `global_batch_size=None`: one
    micro-step per step at every length (the reader on its own, without a trainer)."""
    if batch_unit not in BATCH_UNITS:
        raise ConfigError(f"key 'train.batch_unit': expected {'|'.join(BATCH_UNITS)}, got {batch_unit!r}")
    if policy not in MICRO_BATCH_POLICIES:
        raise ConfigError(f"key 'train.micro_batch_policy': expected {'|'.join(MICRO_BATCH_POLICIES)}, got {policy!r}")
    for key, value in (table or {}).items():
        if not str(key).isdigit() or int(value) < 1:
            raise ConfigError(f"key 'train.micro_batch_table': expected latent frames -> micro-batch >= 1, got "
                              f"{key!r}: {value!r}")
    lengths = sorted(set(int(f) for f in lengths))
    if not lengths:
        return {}
    shortest = lengths[0]
    if global_batch_size is not None and batch_unit == "tokens" and global_batch_size % (micro_batch_size * world_size):
        raise ConfigError(f"key 'train.global_batch_size': {global_batch_size} is not divisible by "
                          f"train.micro_batch_size {micro_batch_size} x world size {world_size} (batch_unit=tokens: "
                          f"the accumulation of the shortest length, {shortest} latent frames, holds at every length)")
    out = {}
    for frames in lengths:
        micro = micro_batch_at(frames, shortest, micro_batch_size, policy, table)
        if global_batch_size is None:
            accumulation = 1
        elif batch_unit == "tokens":
            accumulation = global_batch_size // (micro_batch_size * world_size)
        else:
            if global_batch_size % (micro * world_size):
                raise ConfigError(
                    f"key 'train.global_batch_size': {global_batch_size} samples per step cannot be split into "
                    f"micro-batches of {micro} (at {frames} latent frames, train.micro_batch_policy={policy}) x "
                    f"world size {world_size}; choose a multiple of {micro * world_size}, set "
                    f"train.micro_batch_table.{frames}=N, or train.batch_unit=tokens")
            accumulation = global_batch_size // (micro * world_size)
        out[frames] = BucketBatch(frames, micro, accumulation, world_size)
    return out
