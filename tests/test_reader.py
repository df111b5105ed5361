"""The training-side shard reader (issue 3, "must show" 3): exactly-once across 2 ranks x 2 workers
with equal step counts, a deterministic per-epoch order, exact mid-epoch resume, damaged shards
skipped and counted. Shards are real tar files written through `gd_train.data.shards`."""

from __future__ import annotations

import json
import logging
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import webdataset as wds

from datagen_utils import SMALL_LATENTS, SMALL_TEXT_DIM, make_shards, sample_key, truncate
from gd_train.config import ConfigError, load_config
from gd_train.data.reader import ShardReader, _EpochDataset
from gd_train.data.shards import SHARD_NAME, Manifest, file_sha256, keys_digest

COUNTS = [5, 5, 5, 5, 5, 5, 3]  # 33 samples in 7 shards: divides evenly over neither ranks nor batches
MAX_TOKENS = 6


def make_reader(folder, rank=0, world_size=2, micro_batch_size=2, num_workers=2, shuffle_buffer=4, **kw):
    return ShardReader(str(folder), rank=rank, world_size=world_size, micro_batch_size=micro_batch_size,
                       num_workers=num_workers, seed=7, max_text_tokens=MAX_TOKENS, shuffle_buffer=shuffle_buffer,
                       **kw)


def epoch_keys(reader, epoch):
    return [batch.keys for batch in reader.epoch(epoch)]


def _read_rank_process(rank: int, folder: str, out_dir: str, resampled: bool) -> None:
    """One training rank in its own process, with its own DataLoader workers."""
    reader = make_reader(folder, rank=rank, resampled=resampled)
    result = {"steps": reader.steps_per_epoch(), "batches": epoch_keys(reader, 0), "stats": reader.stats}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


def run_two_ranks(folder: Path, tmp_path: Path, resampled: bool = False) -> list[dict]:
    # Two rank processes, each with its own DataLoader workers. Forked, as torchrun's ranks fork theirs
    # (a spawned rank would make its workers spawn too, and re-import torch: seconds each here).
    mp.start_processes(_read_rank_process, args=(str(folder), str(tmp_path), resampled), nprocs=2, join=True,
                       start_method="fork")
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.fixture
def shard_dir(tmp_path):
    folder = tmp_path / "shards"
    return folder, make_shards(folder, COUNTS)


def test_two_ranks_two_workers_see_every_sample_once(shard_dir, tmp_path):
    folder, keys = shard_dir
    ranks = run_two_ranks(folder, tmp_path)
    steps = [len(r["batches"]) for r in ranks]
    assert steps == [r["steps"] for r in ranks] == [8, 8]  # 33 // (2 ranks x 2): equal on both ranks
    assert all(len(batch) == 2 for r in ranks for batch in r["batches"])
    seen = [k for r in ranks for batch in r["batches"] for k in batch]
    assert len(seen) == len(set(seen)) == 32  # no sample twice
    assert set(seen) <= set(keys)
    dropped = set(keys) - set(seen)
    assert len(dropped) == ranks[0]["stats"]["dropped_tail_samples"] == ranks[1]["stats"]["dropped_tail_samples"] == 1


def test_resampled_mode_gives_every_rank_the_same_steps(shard_dir, tmp_path):
    folder, keys = shard_dir
    ranks = run_two_ranks(folder, tmp_path, resampled=True)
    assert [len(r["batches"]) for r in ranks] == [8, 8]
    assert {k for r in ranks for b in r["batches"] for k in b} <= set(keys)


def test_order_is_deterministic_from_seed_and_epoch(shard_dir):
    folder, _ = shard_dir
    first = epoch_keys(make_reader(folder), 0)
    assert epoch_keys(make_reader(folder), 0) == first
    assert epoch_keys(make_reader(folder), 1) != first
    other_seed = ShardReader(str(folder), rank=0, world_size=2, micro_batch_size=2, num_workers=2, seed=8,
                             max_text_tokens=MAX_TOKENS, shuffle_buffer=4)
    assert epoch_keys(other_seed, 0) != first


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("stop_after", [1, 2, 3, 5, 8])
def test_restored_position_continues_with_the_same_next_batches(shard_dir, num_workers, stop_after):
    folder, _ = shard_dir
    full = epoch_keys(make_reader(folder, num_workers=num_workers), 1)

    interrupted = make_reader(folder, num_workers=num_workers)
    got = []
    for batch in interrupted.epoch(1):
        got.append(batch.keys)
        if len(got) == stop_after:
            break
    state = json.loads(json.dumps(interrupted.state_dict()))  # what a checkpoint stores
    assert state["epoch"] == 1 and state["steps_consumed"] == stop_after

    resumed = make_reader(folder, num_workers=num_workers)
    resumed.load_state_dict(state)
    rest = epoch_keys(resumed, 1)
    assert got + rest == full
    assert len(rest) == resumed.steps_per_epoch() - stop_after
    assert epoch_keys(resumed, 2) == epoch_keys(make_reader(folder, num_workers=num_workers), 2)


def test_batches_hold_float32_latents_and_zero_padded_embeddings(shard_dir):
    folder, _ = shard_dir
    batch = next(make_reader(folder, shuffle_buffer=0).epoch(0))
    assert batch.latents.shape == (2, *SMALL_LATENTS) and batch.latents.dtype == torch.float32
    assert batch.prompt_embeds.shape == (2, MAX_TOKENS, SMALL_TEXT_DIM) and batch.prompt_embeds.dtype == torch.float32
    assert batch.captions == [f"caption of {k}" for k in batch.keys]
    for row, key in zip(batch.prompt_embeds, batch.keys):
        shard, index = (int(part[1:]) if part.startswith("s") else int(part) for part in key.split("-"))
        tokens = 1 + (shard + index) % 5  # as make_shards writes them
        assert row[:tokens].abs().sum() > 0 and row[tokens:].abs().sum() == 0


def test_truncated_shard_is_skipped_and_counted(shard_dir, tmp_path, caplog):
    folder, keys = shard_dir
    truncate(folder / SHARD_NAME.format(index=2))
    ranks = run_two_ranks(folder, tmp_path)
    assert [len(r["batches"]) for r in ranks] == [7, 7]  # 28 readable samples // 4
    assert all(r["stats"]["corrupt_shards"] == 1 for r in ranks)
    seen = [k for r in ranks for b in r["batches"] for k in b]
    assert len(seen) == len(set(seen)) == 28
    assert not {k for k in seen if k.startswith("s002-")}
    with caplog.at_level(logging.WARNING, logger="gd_train.data.reader"):
        make_reader(folder)
    assert [r.getMessage() for r in caplog.records] == [
        f"skipping shard: {folder / 'shard-000002.tar'}: {(folder / 'shard-000002.tar').stat().st_size} bytes, "
        f"the manifest says {Manifest.load(folder).shards['shard-000002.tar'].bytes} (truncated or rewritten)"]


def test_shard_cut_at_a_member_boundary_is_caught_without_a_manifest(tmp_path, caplog):
    """The trap of STACK_NOTES: a tar cut between members looks whole to tarfile and WebDataset."""
    folder = tmp_path / "shards"
    make_shards(folder, COUNTS, manifest=False)
    victim = folder / SHARD_NAME.format(index=4)
    with tarfile.open(victim) as tar:
        boundary = [m.offset for m in tar.getmembers()][4]  # keep the first two samples only
    with open(victim, "r+b") as fh:
        fh.truncate(boundary)
    with caplog.at_level(logging.WARNING, logger="gd_train.data.reader"):
        reader = make_reader(f"{folder}/shard-{{000000..000006}}.tar", world_size=1)
    assert "shard-000004.tar" in caplog.text and "end-of-archive" in caplog.text
    assert len(caplog.records) == 1 and "\n" not in caplog.records[0].getMessage()
    assert reader.stats["corrupt_shards"] == 1 and reader.samples_per_epoch == 28
    assert sum(len(b) for b in epoch_keys(reader, 0)) == 28
    assert make_reader(f"{folder}/shard-*.tar", world_size=1).samples_per_epoch == 28  # a glob works alike


def garble(folder: Path, shard: int, samples: list[int]) -> None:
    """Rewrite a shard with some samples' tensors garbled, and a manifest that agrees with the new
    file: the damage only shows when those samples are decoded."""
    name = SHARD_NAME.format(index=shard)
    raw = list(wds.tarfile_samples([{"url": str(folder / name)}]))
    for index in samples:
        raw[index]["safetensors"] = b"not a safetensors payload"
    with wds.TarWriter(str(folder / name), encoder=False, mtime=0) as writer:
        for sample in raw:
            writer.write({k: v for k, v in sample.items() if k != "__url__"})
    manifest = Manifest.load(folder)
    record = manifest.shards[name]
    manifest.shards[name] = type(record)(samples=len(raw), bytes=(folder / name).stat().st_size,
                                         sha256=file_sha256(folder / name), keys_sha256=record.keys_sha256)
    manifest.save(folder)


def assert_resumes_exactly(folder, batches, counters, stops=None, **reader_kw):
    """Stopping after any batch (or those in `stops`) and resuming gives the same batches and counters."""
    for stop_after in stops or range(1, len(batches)):
        first = make_reader(folder, **reader_kw)
        head = [b.keys for _, b in zip(range(stop_after), first.epoch(0))]
        resumed = make_reader(folder, **reader_kw)
        resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
        assert head + epoch_keys(resumed, 0) == batches, stop_after
        assert (resumed.stats["corrupt_samples"], resumed.stats["repeated_samples"]) == counters, stop_after


def test_undecodable_sample_is_counted_and_its_slot_refilled(shard_dir, caplog):
    folder, keys = shard_dir
    garble(folder, shard=1, samples=[2])

    reader = make_reader(folder, world_size=1, num_workers=2)
    with caplog.at_level(logging.WARNING, logger="gd_train.data.reader"):
        batches = epoch_keys(reader, 0)
    assert len(batches) == reader.steps_per_epoch() == 16 and all(len(b) == 2 for b in batches)
    assert reader.stats["corrupt_samples"] == 1 and reader.stats["repeated_samples"] == 1
    assert sample_key(1, 2) in caplog.text and "unreadable" in caplog.text
    seen = Counter(k for b in batches for k in b)
    assert sample_key(1, 2) not in seen
    assert sorted(seen.values()).count(2) == 1  # exactly one readable sample stood in for it
    # Resuming anywhere (before, inside or after the damaged window) gives the same batches and the
    # same counters: the counters are part of the position and no event is counted twice.
    assert_resumes_exactly(folder, batches, (1, 1), world_size=1, num_workers=2)


def test_a_wholly_unreadable_window_borrows_a_fixed_sample(shard_dir, monkeypatch):
    folder, _ = shard_dir
    garble(folder, shard=3, samples=[0, 1, 2, 3, 4])
    kw = dict(world_size=1, num_workers=0, shuffle_buffer=0)  # windows of one batch: some hold only damage
    borrowed = []
    original = _EpochDataset._any_readable_sample
    monkeypatch.setattr(_EpochDataset, "_any_readable_sample", lambda self, frames: borrowed.append(1) or original(self, frames))
    reader = make_reader(folder, **kw)
    batches = epoch_keys(reader, 0)
    assert borrowed  # the case under test did happen (in-process loader, so the spy sees it)
    assert len(batches) == 16 and all(len(b) == 2 for b in batches)
    (stream,) = reader.plan(0).streams.values()
    in_tail = int(stream[-1].path.endswith("shard-000003.tar"))  # the 33rd sample is the dropped tail
    assert reader.stats["corrupt_samples"] == reader.stats["repeated_samples"] == 5 - in_tail
    assert not any(k.startswith("s003-") for b in batches for k in b)
    assert_resumes_exactly(folder, batches, (5 - in_tail, 5 - in_tail), **kw)


def test_from_config_uses_the_data_section(shard_dir):
    folder, _ = shard_dir
    cfg = load_config("configs/model/tiny.yaml", [f"data.shards={folder}", "data.num_workers=0",
                                                   "data.shuffle_buffer=0", "train.micro_batch_size=3",
                                                   "video.num_frames=5", "video.height=16", "video.width=16"])
    reader = ShardReader.from_config(cfg, rank=1, world_size=2)
    assert reader.steps_per_epoch() == 33 // 6 and reader.micro_batch_size == 3 and reader.num_workers == 0
    assert next(reader.epoch(0)).prompt_embeds.shape[1] == cfg.model.max_text_tokens

    mismatched = load_config("configs/model/tiny.yaml", [f"data.shards={folder}"])
    with pytest.raises(ConfigError, match=r"hold latents \(16, 2, 2, 2\).*give \(16, F, 8, 12\)"):
        ShardReader.from_config(mismatched, rank=0, world_size=1)


def test_no_shards_or_too_few_samples_fail_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match="names no shard-") as err:
        make_reader(tmp_path)
    assert "\n" not in str(err.value)
    make_shards(tmp_path / "one", [3])
    with pytest.raises(ConfigError, match="no length with one step's 4 samples: not one step is possible"):
        make_reader(tmp_path / "one")


def test_position_saved_under_another_layout_resumes_at_the_same_fraction(shard_dir, caplog):
    folder, _ = shard_dir
    reader = make_reader(folder, world_size=2, micro_batch_size=2)
    for i, _ in enumerate(reader.epoch(0)):
        if i == 3:
            break
    state = reader.state_dict()
    wider = make_reader(folder, world_size=4, micro_batch_size=2)
    with caplog.at_level(logging.WARNING, logger="gd_train.data.reader"):
        wider.load_state_dict(state)
    # Without a trainer's global batch a step is one micro-batch per rank: 4 samples, then 8.
    assert "samples_per_step" in caplog.text and "approximate" in caplog.text
    assert wider.state_dict()["steps_consumed"] == 2  # 4 steps of 4 samples = 2 steps of 8
    assert len(epoch_keys(wider, 0)) == wider.steps_per_epoch() - 2


def test_manifest_records_what_write_shard_wrote(shard_dir):
    folder, keys = shard_dir
    manifest = Manifest.load(folder)
    assert manifest.total_samples == sum(COUNTS) and manifest.total_shards == len(COUNTS)
    record = manifest.shards[SHARD_NAME.format(index=0)]
    assert record.sha256 == file_sha256(folder / SHARD_NAME.format(index=0))
    assert record.keys_sha256 == keys_digest(keys[:5])
    assert not list(folder.glob("*.partial"))


def test_unreadable_manifest_falls_back_to_the_tars_and_an_unfinished_one_is_reported(shard_dir, caplog):
    folder, keys = shard_dir
    manifest = Manifest.load(folder)
    manifest.total_shards = 9  # two planned shards never finished
    manifest.save(folder)
    with caplog.at_level(logging.WARNING, logger="gd_train.data.reader"):
        assert make_reader(folder).samples_per_epoch == 33
    assert "7 of 9 planned shards are finished" in caplog.text
    caplog.clear()
    (folder / "manifest.json").write_text("{ truncated")
    with caplog.at_level(logging.WARNING, logger="gd_train.data.reader"):
        reader = make_reader(folder)
    assert "not a shard manifest" in caplog.text and "counting samples from the tar headers" in caplog.text
    assert reader.samples_per_epoch == 33 and reader.stats["corrupt_shards"] == 0


# --------------------------------------------------------------------------------------------------
# Integrity (issue 11): verified against the manifest while reading, no extra pass over the data
# --------------------------------------------------------------------------------------------------
def flip_tensor_byte(folder: Path, shard: int, sample: int) -> str:
    """Flip one byte of a sample's tensor data in place (same size: the manifest's size check passes,
    and the sample still decodes). Returns its key."""
    path = folder / SHARD_NAME.format(index=shard)
    with tarfile.open(path) as tar:
        member = [m for m in tar.getmembers() if m.name.endswith(".safetensors")][sample]
    with open(path, "r+b") as fh:
        fh.seek(member.offset_data + member.size - 3)
        byte = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([byte[0] ^ 0xFF]))
    return member.name.split(".")[0]


def test_a_damaged_sample_is_dropped_alone_by_its_digest(shard_dir, caplog):
    folder, keys = shard_dir
    assert len(Manifest.load(folder).shards[SHARD_NAME.format(index=1)].sample_sha256) == 5
    bad = flip_tensor_byte(folder, shard=1, sample=2)
    reader = make_reader(folder, world_size=1, num_workers=2)
    with caplog.at_level(logging.WARNING, logger="gd_train.data.reader"):
        batches = epoch_keys(reader, 0)
    seen = Counter(k for b in batches for k in b)
    unseen = set(keys) - set(seen)  # the bad sample and the dropped tail: the rest of its shard is used
    assert bad in unseen and len(unseen) == 1 + reader.stats["dropped_tail_samples"] == 2
    assert reader.stats["corrupt_samples"] == reader.stats["repeated_samples"] == 1
    damage = [r.getMessage() for r in caplog.records if bad in r.getMessage()]
    assert len(damage) == 1 and "differs from the manifest's digest" in damage[0]
    window = next(i for i, b in enumerate(batches) if sample_key(1, 3) in b or sample_key(1, 4) in b)
    assert_resumes_exactly(folder, batches, (1, 1), stops=[1, window, window + 1], world_size=1, num_workers=2)


def test_a_manifest_without_sample_digests_verifies_whole_shards(shard_dir, caplog):
    folder, keys = shard_dir
    manifest = Manifest.load(folder)  # as written before per-sample digests existed
    manifest.shards = {n: type(r)(r.samples, r.bytes, r.sha256, r.keys_sha256) for n, r in manifest.shards.items()}
    manifest.save(folder)
    assert '"sample_sha256": null' in (folder / "manifest.json").read_text()
    flip_tensor_byte(folder, shard=1, sample=2)
    reader = make_reader(folder, world_size=1, num_workers=2, shuffle_buffer=0)
    with caplog.at_level(logging.WARNING, logger="gd_train.data.reader"):
        batches = epoch_keys(reader, 0)
    seen = {k for b in batches for k in b}
    assert not {k for k in seen if k.startswith("s001-")}  # nothing of the shard leaves before its sha256 agrees
    shard_1 = {sample_key(1, i) for i in range(5)}
    tail_elsewhere = len(set(keys) - seen - shard_1)
    assert tail_elsewhere <= reader.stats["dropped_tail_samples"] == 1  # all the rest (but the tail) is read
    lines = [r.getMessage() for r in caplog.records if "differ from the manifest's sha256" in r.getMessage()]
    assert lines and all("shard-000001.tar" in line for line in lines)  # one line per piece read of the shard
    assert reader.stats["corrupt_samples"] == 5 - (1 - tail_elsewhere) and reader.stats["broken_shards"] == 1


def test_a_folder_that_disagrees_with_its_manifest_is_reported_per_shard(shard_dir, tmp_path, caplog):
    folder, keys = shard_dir
    (folder / SHARD_NAME.format(index=3)).unlink()
    make_shards(tmp_path / "other", [4])
    (tmp_path / "other" / SHARD_NAME.format(index=0)).rename(folder / SHARD_NAME.format(index=9))  # never recorded
    with caplog.at_level(logging.WARNING, logger="gd_train.data.reader"):
        reader = make_reader(folder)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and all("\n" not in line for line in lines)
    assert "shard-000003.tar: listed in manifest.json but missing from the folder" in lines[0]
    assert "shard-000009.tar: not in" in lines[1] and "never recorded as finished" in lines[1]
    assert reader.samples_per_epoch == 28 and reader.stats["skipped_shards"] == 2
    with pytest.raises(ConfigError, match=r"data.on_damage': refuse, and data.shards has 2 damaged or missing"):
        make_reader(folder, on_damage="refuse")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gd_train.data.reader"):
        make_reader(f"{folder}/shard-{{000000..000004}}.tar")  # a pattern naming a shard that is gone
    assert [r.getMessage() for r in caplog.records] == [
        f"skipping shard: {folder}/shard-000003.tar: named by data.shards but missing"]
    assert make_reader(folder, rank=1).stats["skipped_shards"] == 2  # counted on every rank, logged by rank 0


def test_strict_mode_plans_from_the_readable_samples_only(shard_dir, caplog):
    folder, keys = shard_dir
    garble(folder, shard=1, samples=[2])  # decodes badly (the shard's digest agrees: only decoding fails)
    bad = flip_tensor_byte(folder, shard=4, sample=0)  # the shard's bytes differ: no longer its sha256
    kw = dict(world_size=1, num_workers=2, strict=True)
    with caplog.at_level(logging.WARNING, logger="gd_train.data.reader"):
        reader = make_reader(folder, **kw)
    scan = [r.getMessage() for r in caplog.records if r.getMessage().startswith("strict: ")]
    assert len(scan) == 2 and sample_key(1, 2) in scan[0] and bad in scan[1], scan
    assert reader.samples_per_epoch == 31 and reader.stats["excluded_samples"] == 2
    batches = epoch_keys(reader, 0)
    seen = Counter(k for b in batches for k in b)
    assert len(batches) == 15 and set(seen.values()) == {1}  # 31 // 2 batches, no sample twice
    assert not {sample_key(1, 2), bad} & set(seen)
    assert reader.stats["repeated_samples"] == reader.stats["corrupt_samples"] == 0
    assert_resumes_exactly(folder, batches, (0, 0), stops=[3, 8], **kw)
