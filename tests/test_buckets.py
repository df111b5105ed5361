"""Per-sample lengths in the reader (issue 12, "must show" 3 at the reader level; issue 13's data
position): every step one length on every rank, equal step counts, every sample of an epoch once,
exact resume with the same sequence of lengths, and a position that another number of ranks continues
without repeating or skipping a sample. Shards are real tar files of mixed lengths."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from gd_train.config import ConfigError
from gd_train.data.buckets import bucket_batches
from gd_train.data.reader import ShardReader
from gd_train.data.shards import SHARD_NAME, Manifest, TeacherSample, write_shard

# (latent frames, samples) per shard: three lengths, counts that divide evenly into nothing.
SHARDS = [(2, 7), (3, 5), (2, 6), (4, 9), (3, 6), (4, 4), (2, 5)]
GLOBAL_BATCH = 4


def make_mixed_shards(folder: Path) -> dict[str, int]:
    """Single-length shards (as data_pipeline writes them); returns {key: latent frames}."""
    folder.mkdir(parents=True)
    records, lengths = {}, {}
    for index, (frames, count) in enumerate(SHARDS):
        samples = []
        for i in range(count):
            key = f"f{frames}-s{index}-{i}"
            gen = torch.Generator().manual_seed(index * 100 + i)
            samples.append(TeacherSample(key=key, latents=torch.randn((16, frames, 2, 2), generator=gen),
                                         prompt_embeds=torch.randn(1 + i % 3, 8, generator=gen),
                                         meta={"caption": key, "latent_frames": frames}))
            lengths[key] = frames
        records[SHARD_NAME.format(index=index)] = write_shard(folder / SHARD_NAME.format(index=index), samples,
                                                              attempt_tag="test")
    Manifest(settings={"latent_shape": [16, None, 2, 2]}, total_shards=len(SHARDS), shards=records).save(folder)
    return lengths


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mixed") / "shards"
    return folder, make_mixed_shards(folder)


def reader_for(folder, rank, world_size, **kw):
    kw.setdefault("num_workers", 2)
    return ShardReader(str(folder), rank=rank, world_size=world_size, micro_batch_size=1, seed=3,
                       max_text_tokens=4, shuffle_buffer=8, global_batch_size=GLOBAL_BATCH,
                       expected_latent_shape=(16, 2, 2), **kw)


def steps_of(reader, epoch, stop_after=None):
    out = []
    for step in reader.steps(epoch):
        out.append({"index": step.index, "frames": step.latent_frames,
                    "shapes": [list(b.latents.shape) for b in step.micro_batches],
                    "keys": [k for b in step.micro_batches for k in b.keys]})
        if stop_after is not None and len(out) == stop_after:
            break
    return out


def _rank_process(rank, folder, out_dir, world_size, stop_after, state_file):
    reader = reader_for(folder, rank, world_size)
    if state_file:
        reader.load_state_dict(json.loads(Path(state_file).read_text()))
    steps = steps_of(reader, 0, stop_after)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"steps": steps, "state": reader.state_dict()}))


def run_ranks(folder, out_dir, world_size, stop_after=None, state=None):
    """`world_size` real rank processes (forked, as torchrun's ranks fork their loader workers)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    state_file = None
    if state is not None:
        state_file = str(out_dir / "state.json")
        Path(state_file).write_text(json.dumps(state))
    mp.start_processes(_rank_process, args=(str(folder), str(out_dir), world_size, stop_after, state_file),
                       nprocs=world_size, join=True, start_method="fork")
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(world_size)]


def test_batch_arithmetic_per_length_and_one_line_refusals():
    lengths = [21, 41, 76]
    samples = bucket_batches(lengths, world_size=4, micro_batch_size=4, global_batch_size=64,
                             policy="token_budget")
    assert {f: (b.micro_batch_size, b.accumulation_steps) for f, b in samples.items()} == {21: (4, 4), 41: (2, 8), 76: (1, 16)}
    assert {b.samples_per_step for b in samples.values()} == {64}
    tokens = bucket_batches(lengths, world_size=4, micro_batch_size=4, global_batch_size=64,
                            policy="token_budget", batch_unit="tokens")
    assert {f: b.samples_per_step for f, b in tokens.items()} == {21: 64, 41: 32, 76: 16}
    table = bucket_batches(lengths, world_size=4, micro_batch_size=4, global_batch_size=64, table={"76": 2})
    assert table[76].micro_batch_size == 2 and table[41].micro_batch_size == 4
    # The step's samples never depend on the world size (what lets another number of ranks resume).
    for world in (1, 2, 4, 8):
        again = bucket_batches(lengths, world_size=world, micro_batch_size=4, global_batch_size=64,
                               policy="token_budget", batch_unit="tokens")
        assert {f: b.samples_per_step for f, b in again.items()} == {21: 64, 41: 32, 76: 16}
    with pytest.raises(ConfigError, match=r"key 'train.global_batch_size': 64 samples per step cannot be split into "
                                          r"micro-batches of 3 \(at 41 latent frames") as err:
        bucket_batches(lengths, world_size=4, micro_batch_size=4, global_batch_size=64, table={"41": 3})
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="train.micro_batch_policy"):
        bucket_batches(lengths, world_size=1, micro_batch_size=1, policy="sometimes")


def test_two_ranks_run_one_length_per_step_and_see_every_sample_once(mixed, tmp_path):
    folder, lengths = mixed
    ranks = run_ranks(folder, tmp_path / "full", world_size=2)
    a, b = (r["steps"] for r in ranks)
    assert len(a) == len(b) > 0
    assert [s["frames"] for s in a] == [s["frames"] for s in b]  # the same length at every step
    assert len({s["frames"] for s in a}) == 3  # and the lengths do mix
    for step_a, step_b in zip(a, b):
        frames = step_a["frames"]
        for s in (step_a, step_b):
            assert all(shape[2] == frames for shape in s["shapes"]) and len(s["keys"]) == GLOBAL_BATCH // 2
            assert all(lengths[k] == frames for k in s["keys"])
    seen = Counter(k for r in (a, b) for s in r for k in s["keys"])
    assert max(seen.values()) == 1  # no sample twice
    per_length = Counter(lengths.values())
    for frames, count in per_length.items():  # each length: all but its tail (< one step) is read
        read = sum(1 for k in seen if lengths[k] == frames)
        assert count - GLOBAL_BATCH < read <= count and read % GLOBAL_BATCH == 0
    assert ranks[0]["state"]["bucket_steps"] == {str(f): n // GLOBAL_BATCH for f, n in sorted(per_length.items())}


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2), (2, 2)])
def test_a_position_continues_on_another_number_of_ranks(mixed, tmp_path, before, after):
    folder, _ = mixed
    full = run_ranks(folder, tmp_path / "full", world_size=1)[0]["steps"]
    first = run_ranks(folder, tmp_path / "first", world_size=before, stop_after=3)
    state = first[0]["state"]
    assert state["steps_consumed"] == 3 and all(r["state"]["steps_consumed"] == 3 for r in first)
    rest = run_ranks(folder, tmp_path / "rest", world_size=after, state=state)
    assert [s["frames"] for s in rest[0]["steps"]] == [s["frames"] for s in full[3:]]  # the same lengths follow
    consumed = [set(k for r in first for k in r["steps"][i]["keys"]) for i in range(3)]
    resumed = [set(k for r in rest for k in r["steps"][i]["keys"]) for i in range(len(rest[0]["steps"]))]
    # Step by step, the same samples as one uninterrupted run: nothing repeated, nothing skipped.
    assert consumed + resumed == [set(s["keys"]) for s in full]
