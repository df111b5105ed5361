"""The per-prompt length policy (`datagen.lengths`, data_pipeline/lengths.py): deterministic per key,
always 1 + 4k inside the range, weights respected, OpenVidHD duration columns read, rows without a
readable duration reported as bad rows (or given video.num_frames), and the single-length shard plan."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest

from datagen_utils import OPENVID_HEADER, REPO_ROOT, source_frames, write_prompts_csv
from gd_train.config import ConfigError, load_config
from gd_train.data.shards import MANIFEST_FORMAT, Manifest, ShardRecord

sys.path.insert(0, str(REPO_ROOT))
from data_pipeline.gen_teacher import check_datagen, estimated_sample_bytes, length_histogram, plan_shards  # noqa: E402
from data_pipeline.lengths import LengthPlanner, cost_units, is_valid_length, snap  # noqa: E402
from data_pipeline.prompts import PromptFileError, read_prompts  # noqa: E402

CONFIG = REPO_ROOT / "configs" / "datagen.yaml"
SOURCE = ["datagen.lengths.mode=source", "datagen.lengths.min_frames=9", "datagen.lengths.max_frames=25"]


def planner(*overrides: str) -> LengthPlanner:
    """The policy of `overrides` on top of mode fixed (the tiny config's own default mixes three lengths)."""
    return LengthPlanner.from_config(load_config(CONFIG, ["datagen.lengths.mode=fixed", *overrides]))


def choices(values, weights=None, seed=0) -> LengthPlanner:
    overrides = ["datagen.lengths.mode=choices", f"datagen.lengths.choices={list(values)}", f"seed={seed}"]
    return planner(*overrides, *([f"datagen.lengths.weights={list(weights)}"] if weights else []))


def test_choices_are_a_function_of_seed_and_key_and_follow_the_weights():
    policy = choices([81, 161, 301], [1, 2, 5])
    keys = [f"clip_{i:06d}" for i in range(8000)]
    drawn = [policy.choose(k)[0] for k in keys]
    again = choices([81, 161, 301], [1, 2, 5])  # as another worker, or a rerun, builds it
    assert drawn == [again.choose(k)[0] for k in keys]
    counts = Counter(drawn)
    for length, share in ((81, 1 / 8), (161, 2 / 8), (301, 5 / 8)):
        # binomial sd at n=8000 is <= 0.0056: 4 sd
        assert abs(counts[length] / len(keys) - share) < 0.023, (length, counts)
    other_seed, equal = choices([81, 161, 301], [1, 2, 5], seed=1), choices([9, 17])
    assert drawn[:200] != [other_seed.choose(k)[0] for k in keys[:200]]
    assert Counter(equal.choose(k)[0] for k in keys[:2000]).keys() == {9, 17}  # empty weights: equal
    assert planner().choose("any") == (21, False)  # mode fixed: video.num_frames


@pytest.mark.parametrize("frames, expected", [(8.0, 9), (10.9, 9), (11.0, 13), (80.6, 25), (1.0, 9), (500.0, 25),
                                              (23.2, 25), (17.0, 17)])
def test_durations_snap_to_the_nearest_1_plus_4k_inside_the_range(frames, expected):
    assert snap(frames, 9, 25) == expected and is_valid_length(expected)
    paper = {80.6: 81, 82.9: 81, 83.0: 85, 160.9: 161, 299.0: 301, 1000.0: 301, 12.0: 81}  # the paper's range
    assert {f: snap(f, 81, 301) for f in paper} == paper


def test_source_reads_seconds_else_frame_over_fps(tmp_path):
    policy = planner(*SOURCE)
    assert policy.choose("a", {"seconds": "1.5", "frame": "999", "fps": "1"}) == (25, False)  # seconds first
    assert policy.choose("a", {"seconds": "", "frame": "16", "fps": "16"}) == (17, False)
    assert policy.choose("a", {"seconds": "nan", "frame": "12", "fps": "24"}) == (9, False)
    # The CSV of the Ray tests, through the reader: every good row at its planned length.
    csv = tmp_path / "p.csv"
    expected, _ = write_prompts_csv(csv)
    prompts, report = read_prompts(csv, load_config(CONFIG).datagen.filters, policy)
    assert {p.key: p.num_frames for p in prompts} == {k: source_frames(int(k[5:])) for k in expected}
    assert not report.length_fallback_rows
    # The repository's demo CSV at the paper's range: 5.04 s at 16 fps -> 81 frames, 8 s -> 129.
    demo, _ = read_prompts(REPO_ROOT / "assets" / "demo_prompts.csv", load_config(CONFIG).datagen.filters,
                           planner("datagen.lengths.mode=source"))
    assert {"demo_0001": 81, "demo_0004": 129}.items() <= {p.key: p.num_frames for p in demo}.items()
    assert all(81 <= p.num_frames <= 301 and is_valid_length(p.num_frames) for p in demo)


def _csv(tmp_path: Path, *durations: str) -> Path:
    path = tmp_path / "d.csv"
    rows = [f'v{i}.mp4,"caption {i}",5,3,0.9,static,{d}' for i, d in enumerate(durations)]
    path.write_text(OPENVID_HEADER.decode() + "\n".join(rows) + "\n")
    return path


def test_rows_without_a_readable_duration_are_bad_rows_or_fall_back(tmp_path):
    path = _csv(tmp_path, "16,16,1", ",,", "x,16,abc", "16,0,-2", "24,16,1.5")
    filters = load_config(CONFIG).datagen.filters
    prompts, report = read_prompts(path, filters, planner(*SOURCE))
    assert [(p.key, p.num_frames) for p in prompts] == [("v0", 17), ("v4", 25)]
    assert [(b.row, b.line) for b in report.bad_rows] == [(2, 3), (3, 4), (4, 5)]
    assert report.bad_rows[1].reason.startswith("no readable duration ('seconds' 'abc', 'frame' 'x', 'fps' '16'")
    assert "datagen.lengths.mode=source" in report.bad_rows[0].reason

    prompts, report = read_prompts(path, filters, planner(*SOURCE, "datagen.lengths.on_missing=fixed"))
    assert [p.num_frames for p in prompts] == [17, 21, 21, 21, 25] and not report.bad_rows
    assert report.length_fallback_rows == [2, 3, 4]
    assert "given video.num_frames=21 (datagen.lengths.on_missing=fixed): 2, 3, 4" in report.summary_lines()[-1]

    no_columns = tmp_path / "n.csv"
    no_columns.write_text('video,caption\nv.mp4,"a caption"\n')
    with pytest.raises(PromptFileError, match="no 'seconds' column and no 'frame' and 'fps' columns"):
        read_prompts(no_columns, filters, planner(*SOURCE))
    assert read_prompts(no_columns, filters, planner())[0][0].num_frames == 21  # mode fixed needs no column


@pytest.mark.parametrize("overrides, message", [
    (["datagen.lengths.mode=random"], "key 'datagen.lengths.mode': expected fixed | choices | source"),
    (["datagen.lengths.mode=choices", "datagen.lengths.choices=[]"],
     "key 'datagen.lengths.choices': expected a non-empty list"),
    (["datagen.lengths.mode=choices", "datagen.lengths.choices=[81,80]"], "key 'datagen.lengths.choices'"),
    (["datagen.lengths.mode=choices", "datagen.lengths.choices=[81,161]", "datagen.lengths.weights=[1]"],
     "key 'datagen.lengths.weights': expected empty (equal) or 2 non-negative numbers"),
    (["datagen.lengths.mode=source", "datagen.lengths.min_frames=80"], "key 'datagen.lengths.min_frames'"),
    (["datagen.lengths.mode=source", "datagen.lengths.min_frames=85", "datagen.lengths.max_frames=81"],
     "key 'datagen.lengths.max_frames': expected >= datagen.lengths.min_frames=85"),
    (["datagen.lengths.mode=source", "datagen.lengths.on_missing=skip"], "key 'datagen.lengths.on_missing'"),
])
def test_a_bad_policy_is_refused_in_one_line_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        check_datagen(load_config(CONFIG, overrides))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_the_plan_holds_one_length_per_shard_in_a_stable_order(tmp_path):
    csv = tmp_path / "p.csv"
    write_prompts_csv(csv)
    cfg = load_config(CONFIG, SOURCE)
    prompts, _ = read_prompts(csv, cfg.datagen.filters, planner(*SOURCE))
    tasks = plan_shards(prompts, 5)
    assert [t.index for t in tasks] == list(range(len(tasks)))
    assert all(len({p.num_frames for p in t.prompts}) == 1 for t in tasks)
    assert [t.num_frames for t in tasks] == sorted(t.num_frames for t in tasks)  # shortest first
    for length in (9, 17, 25):  # CSV order inside a length, every prompt once
        assert [p.row for t in tasks if t.num_frames == length for p in t.prompts] == \
            [p.row for p in prompts if p.num_frames == length]
    assert length_histogram(cfg, tasks) == {3: 12, 5: 12, 7: 12}
    assert cost_units({3: 12, 5: 12, 7: 12}, 6) == 12 * (9 + 25 + 49) / 6
    assert [t.prompts for t in plan_shards(prompts, 5)] == [t.prompts for t in tasks]
    # mode fixed: CSV order, as folders written before per-sample lengths were cut
    fixed, _ = read_prompts(csv, cfg.datagen.filters, planner())
    assert [p for t in plan_shards(fixed, 5) for p in t.prompts] == fixed


def test_the_disk_estimate_is_per_sample_length():
    cfg = load_config(CONFIG, ["datagen.storage_dtype=float32"])  # latents (16, F, 8, 12) in float32
    assert estimated_sample_bytes(cfg, 7) - estimated_sample_bytes(cfg, 3) == 4 * 16 * 8 * 12 * 4
    assert estimated_sample_bytes(cfg) == estimated_sample_bytes(cfg, 6)  # default: video.num_frames=21


def test_manifests_keep_the_plan_lengths_and_old_ones_still_load(tmp_path):
    record = ShardRecord(samples=2, bytes=10, sha256="a", keys_sha256="b", sample_sha256=["c", "d"], latent_frames=7)
    Manifest(settings={"latent_shape": [16, None, 8, 12]}, total_shards=2, shards={"shard-000001.tar": record},
             shard_latent_frames={"shard-000000.tar": 3, "shard-000001.tar": 7}, length_histogram={3: 5, 7: 2}
             ).save(tmp_path)
    again = Manifest.load(tmp_path)
    assert again.shards["shard-000001.tar"] == record and again.length_histogram == {3: 5, 7: 2}
    assert again.shard_latent_frames == {"shard-000000.tar": 3, "shard-000001.tar": 7}
    # As written before per-sample lengths: no plan lengths, records without latent_frames.
    (tmp_path / "manifest.json").write_text(
        '{"format": "%s", "settings": {"latent_shape": [16, 6, 8, 12]}, "total_shards": 1, "total_samples": 2, '
        '"shards": {"shard-000000.tar": {"samples": 2, "bytes": 10, "sha256": "a", "keys_sha256": "b", '
        '"sample_sha256": null}}}' % MANIFEST_FORMAT)
    old = Manifest.load(tmp_path)
    assert old.shards["shard-000000.tar"].latent_frames is None
    assert old.shard_latent_frames == {} and old.length_histogram == {}
