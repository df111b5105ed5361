"""Teacher-data generation as a Ray job (issue 3, "must show" 1 and 2), on a real local Ray head:
`ray start --head --block` (dashboard on 127.0.0.1), `ray job submit` of gen_teacher.py, the head
stopped by PID. Shards are read back with WebDataset and with the training reader."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import webdataset as wds

from datagen_utils import REPO_ROOT, source_frames, write_prompts_csv
from launch.ray_head import LocalRayHead, ray_env, session_members
from gd_train.config import load_config
from gd_train.data.reader import ShardReader
from gd_train.data.shards import Manifest, decode_sample, file_sha256

pytestmark = pytest.mark.slow

sys.path.insert(0, str(REPO_ROOT))
from data_pipeline import gen_teacher  # noqa: E402
from data_pipeline.lengths import cost_units, latent_frames  # noqa: E402
from data_pipeline.prompts import read_prompts  # noqa: E402
from data_pipeline.teacher import TeacherWorker, sample_seed, sampling_settings  # noqa: E402

CONFIG = "configs/datagen.yaml"


def command(csv: Path, out: Path, *overrides: str) -> list[str]:
    # One length (the config's default mixes three): this module's counts and shapes are fixed-length
    # ones; the mixed-length job is its own test below (overrides given later win).
    return ["python", "data_pipeline/gen_teacher.py", "--config", CONFIG, f"prompts_csv={csv}", f"output_dir={out}",
            "datagen.lengths.mode=fixed", *overrides]


def all_samples(folder: Path):
    """Every sample of every finished shard, straight from the tars (duplicates would show here)."""
    raw = wds.tarfile_samples([{"url": str(p)} for p in sorted(folder.glob("shard-*.tar"))])
    return [decode_sample(r) for r in raw]


def job_output(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout[-6000:]}\n--- stderr\n{result.stderr[-3000:]}"


@pytest.fixture(scope="module")
def ray_head():
    head = LocalRayHead(num_cpus=2).start()
    yield head
    head.stop()


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "openvid.csv"
    expected, bad_rows = write_prompts_csv(path)
    return path, expected, bad_rows


@pytest.fixture(scope="module")
def clean_run(ray_head, prompts, tmp_path_factory):
    csv, _, _ = prompts
    out = tmp_path_factory.mktemp("clean") / "shards"
    result = ray_head.submit(command(csv, out))
    assert result.returncode == 0, job_output(result)
    return out, result


def test_ray_job_writes_each_valid_prompt_exactly_once(clean_run, prompts):
    out, result = clean_run
    csv, expected, bad_rows = prompts
    samples = all_samples(out)
    counts = Counter(s.key for s in samples)
    assert set(counts) == set(expected) and set(counts.values()) == {1}
    assert {s.key: s.caption for s in samples} == expected  # incl. the multi-line and the cp1252 captions

    # Bad rows: counted and reported with their row numbers, in the log and in the report file.
    report = json.loads((out / gen_teacher.REPORT_NAME).read_text())
    assert [b["row"] for b in report["prompts"]["bad_rows"]] == bad_rows
    assert f"bad rows: {', '.join(map(str, bad_rows))}" in result.stdout
    assert report["shards"] == {"planned": 5, "already_done": 0, "written": 5, "failed": [], "finished": 5}
    assert re.search(r"shards \d/5 done \(0 failed, 0 retried\) \| samples \d+/36 \| [\d.]+ samples/s \| ETA ",
                     result.stdout)
    assert "joined the Ray cluster" in result.stdout

    # Manifest: every shard, its count and checksum; nothing half-written left behind.
    manifest = Manifest.load(out)
    assert manifest.total_samples == 36 and len(manifest.shards) == manifest.total_shards == 5
    for name, record in manifest.shards.items():
        assert record.sha256 == file_sha256(out / name) and record.bytes == (out / name).stat().st_size
        assert len(record.sample_sha256) == record.samples  # what the reader verifies each sample against
    assert not list(out.glob("*.partial"))

    # Each sample carries its seed (from its key), its source row and the sampling settings.
    cfg = load_config(CONFIG, [f"prompts_csv={csv}", "datagen.lengths.mode=fixed"])
    rows = {p.key: p.row for p in read_prompts(csv, cfg.datagen.filters)[0]}
    for s in samples:
        assert s.meta["seed"] == sample_seed(0, s.key) and s.meta["source_row"] == rows[s.key]
        assert s.meta["settings"] == sampling_settings(cfg) == {k: v for k, v in manifest.settings.items()
                                                               if k != "samples_per_shard"}
        assert s.latents.shape == (16, 6, 8, 12) and s.latents.dtype == torch.float32
        assert 0 < s.prompt_embeds.shape[0] < cfg.model.max_text_tokens  # stored unpadded

    # The training reader reads the job's output as it is.
    reader_cfg = load_config(CONFIG, [f"data.shards={out}", "data.num_workers=0", "data.shuffle_buffer=0",
                                      "train.micro_batch_size=1"])
    reader = ShardReader.from_config(reader_cfg, rank=0, world_size=1)
    assert sorted(k for b in reader.epoch(0) for k in b.keys) == sorted(expected)


def test_a_sample_is_reproduced_from_its_key(clean_run, prompts, tmp_path):
    out, _ = clean_run
    stored = all_samples(out)[9]
    cfg = load_config(CONFIG, ["datagen.lengths.mode=fixed"])
    worker = TeacherWorker(gen_teacher.as_container(cfg), str(tmp_path))
    prompt = next(p for p in read_prompts(prompts[0], cfg.datagen.filters)[0] if p.key == stored.key)
    again = worker.sample([prompt])[0]
    torch.testing.assert_close(again.latents, stored.latents, rtol=0, atol=1e-5)
    torch.testing.assert_close(again.prompt_embeds, stored.prompt_embeds, rtol=0, atol=1e-6)


def test_worker_killed_mid_shard_is_retried_and_a_rerun_writes_nothing(ray_head, prompts, clean_run, tmp_path):
    csv, expected, _ = prompts
    out = tmp_path / "shards"
    job = command(csv, out, "datagen.fault_kill_shard=1")
    result = ray_head.submit(job)
    assert result.returncode == 0, job_output(result)
    assert re.search(r"shard-000001\.tar attempt 1/3 failed \(worker \d died: ", result.stdout), job_output(result)

    report = json.loads((out / gen_teacher.REPORT_NAME).read_text())
    assert [(a["shard"], a["attempt"]) for a in report["failed_attempts"]] == [("shard-000001.tar", 1)]
    assert report["shards"]["written"] == 5 and report["shards"]["failed"] == []
    counts = Counter(s.key for s in all_samples(out))
    assert set(counts) == set(expected) and set(counts.values()) == {1}
    assert not list(out.glob("*.partial"))  # the dead attempt's file is gone
    # The retried shard is byte-identical to the one an undisturbed run wrote.
    clean = Manifest.load(clean_run[0])
    assert {n: r.sha256 for n, r in Manifest.load(out).shards.items()} == {n: r.sha256 for n, r in clean.shards.items()}

    before = {p.name: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest()) for p in out.glob("shard-*")}
    manifest_before = (out / "manifest.json").read_text()
    rerun = ray_head.submit(job)
    assert rerun.returncode == 0, job_output(rerun)
    assert "5 already finished, 0 to write" in rerun.stdout and "0 written" in rerun.stdout
    after = {p.name: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest()) for p in out.glob("shard-*")}
    assert after == before and (out / "manifest.json").read_text() == manifest_before


def test_direct_run_starts_its_own_ray_and_writes_previews(prompts, tmp_path):
    csv, expected, _ = prompts
    out = tmp_path / "shards"
    proc = subprocess.Popen(
        ["python", "data_pipeline/gen_teacher.py", "--config", CONFIG, f"prompts_csv={csv}", f"output_dir={out}",
         "datagen.num_workers=1", "datagen.filters.max_prompts=3", "datagen.samples_per_shard=2",
         "datagen.preview_fraction=1.0", "datagen.lengths.mode=fixed"],
        cwd=REPO_ROOT, env=ray_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=240)
    finally:
        for pid in session_members(proc.pid):  # nothing should be left; make sure of it
            subprocess.run(["kill", "-9", str(pid)], check=False)
    assert proc.returncode == 0, output
    assert "started a local Ray instance" in output
    assert sorted(s.key for s in all_samples(out)) == sorted(expected)[:3]
    from gd_train.media import read_mp4

    previews = sorted((out / "previews").glob("*.mp4"))
    assert [p.stem for p in previews] == sorted(expected)[:3]
    assert read_mp4(previews[0]).shape == (21, 64, 96, 3)


def test_bad_input_fails_at_start_in_one_line(tmp_path, capsys, monkeypatch):
    no_caption = tmp_path / "no_caption.csv"
    no_caption.write_text("video,text,aesthetic score\nv.mp4,hello,5\n")
    (tmp_path / "all_bad.csv").write_text("video,caption\nv.mp4,\nw.mp4,a,b\n")
    cases = [
        ([f"prompts_csv={no_caption}"], "no 'caption' column"),
        ([f"prompts_csv={tmp_path / 'missing.csv'}"], "no such file"),
        (["datagen.samples_per_shard=0", f"prompts_csv={no_caption}"], "datagen.samples_per_shard"),
        (["prompts_csv=null"], "key 'prompts_csv': not set"),
        ([f"prompts_csv={tmp_path / 'all_bad.csv'}"], "no usable prompt (2 rows, 2 bad, 0 filtered)"),
    ]
    for overrides, message in cases:
        assert gen_teacher.main(["--config", CONFIG, f"output_dir={tmp_path / 'out'}", *overrides]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "manifest.json").write_text("{not json")
    assert gen_teacher.main(["--config", CONFIG, f"output_dir={tmp_path / 'broken'}"]) == 2
    err = capsys.readouterr().err
    assert "manifest.json: not a shard manifest" in err and err.count("\n") == 1
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    assert gen_teacher.main(["--config", CONFIG, "output_dir=relative/out", f"prompts_csv={no_caption}"]) == 2
    assert "is relative; on a Ray cluster give an absolute path" in capsys.readouterr().err


def test_rerun_into_a_folder_of_other_settings_or_prompts_is_refused(clean_run, prompts, tmp_path, capsys):
    out, _ = clean_run
    csv, _, _ = prompts
    assert gen_teacher.main(["--config", CONFIG, f"prompts_csv={csv}", f"output_dir={out}", "datagen.lengths.mode=fixed",
                             "datagen.num_inference_steps=5"]) == 2
    assert "made with other settings (num_inference_steps=4); this run has (num_inference_steps=5)" in capsys.readouterr().err
    fewer = tmp_path / "fewer.csv"
    lines = csv.read_bytes().split(b"\n")
    fewer.write_bytes(b"\n".join(lines[:1] + lines[3:]))  # drop the first prompt: every shard shifts
    assert gen_teacher.main(["--config", CONFIG, f"prompts_csv={fewer}", f"output_dir={out}", "datagen.lengths.mode=fixed"]) == 2
    assert "holds other prompts than this run plans for it" in capsys.readouterr().err


# Mixed lengths: each prompt's length from its row's duration (0.5 / 1 / 1.5 s at 16 fps -> 9 / 17 / 25
# frames, 3 / 5 / 7 latent frames); 3 prompts per length in shards of 2 and 1, batches of 2. One worker:
# on 2 shared cores a second one only adds its start-up.
MIXED = ["datagen.lengths.mode=source", "datagen.lengths.min_frames=9", "datagen.lengths.max_frames=25",
         "datagen.filters.max_prompts=9", "datagen.samples_per_shard=2", "datagen.batch_size=2", "datagen.num_workers=1"]


def test_mixed_lengths_each_prompt_once_at_its_planned_length_one_length_per_shard(ray_head, prompts, tmp_path,
                                                                                  capsys):
    csv, expected, _ = prompts
    out = tmp_path / "shards"
    result = ray_head.submit(command(csv, out, *MIXED))
    assert result.returncode == 0, job_output(result)
    planned = {key: source_frames(int(key[5:])) for key in sorted(expected)[:9]}  # clip_NNNN: row order
    histogram = {3: 3, 5: 3, 7: 3}
    assert dict(Counter(latent_frames(f) for f in planned.values())) == histogram
    assert f"cost: {cost_units(histogram, 6):,.0f} teacher-frame-equivalents" in result.stdout
    assert "for 9 samples by latent frames {3: 3, 5: 3, 7: 3}" in result.stdout

    raw = wds.tarfile_samples([{"url": str(p)} for p in sorted(out.glob("shard-*.tar"))])
    by_shard: dict[str, list] = {}
    for r in raw:
        by_shard.setdefault(Path(r["__url__"]).name, []).append(decode_sample(r))
    samples = [s for shard in by_shard.values() for s in shard]
    assert Counter(s.key for s in samples) == Counter(planned.keys())  # every valid prompt, once
    for s in samples:
        frames = planned[s.key]
        assert s.latents.shape == (16, latent_frames(frames), 8, 12)
        assert (s.meta["num_frames"], s.meta["latent_frames"]) == (frames, latent_frames(frames))

    manifest = Manifest.load(out)
    assert manifest.length_histogram == histogram
    assert set(manifest.shards) == set(by_shard) == set(manifest.shard_latent_frames) and manifest.total_shards == 6
    for name, shard in by_shard.items():
        assert {s.latents.shape[1] for s in shard} == {manifest.shards[name].latent_frames}
        assert manifest.shard_latent_frames[name] == manifest.shards[name].latent_frames
    assert manifest.settings["latent_shape"] == [16, None, 8, 12]
    assert manifest.settings["lengths"] == {"mode": "source", "min_frames": 9, "max_frames": 25, "on_missing": "bad_row"}
    report = json.loads((out / gen_teacher.REPORT_NAME).read_text())
    assert report["length_histogram"] == {"3": 3, "5": 3, "7": 3}
    written = [manifest.shards[w["shard"]].latent_frames for w in report["written_shards"]]  # one worker: queue order
    assert written == sorted(written, reverse=True) == [7, 7, 5, 5, 3, 3]  # longest clips first

    # The training reader reads the mixed folder as it is: one length per batch, every prompt at its own.
    reader_cfg = load_config(CONFIG, [f"data.shards={out}", "data.num_workers=0", "data.shuffle_buffer=0",
                                      "train.micro_batch_size=1"])
    batches = list(ShardReader.from_config(reader_cfg, rank=0, world_size=1, global_batch_size=1).epoch(0))
    assert sorted(k for b in batches for k in b.keys) == sorted(planned)
    assert all(b.latents.shape[2] == latent_frames(planned[k]) for b in batches for k in b.keys)

    # Another policy into the same folder: refused, in one line.
    other = [o for o in MIXED if not o.startswith("datagen.lengths")] + \
        ["datagen.lengths.mode=choices", "datagen.lengths.choices=[9,17,25]"]
    assert gen_teacher.main(["--config", CONFIG, f"prompts_csv={csv}", f"output_dir={out}", *other]) == 2
    err = capsys.readouterr().err
    assert "made with other settings (lengths={" in err and "'mode': 'source'" in err
    assert "this run has (lengths={'mode': 'choices', 'choices': [9, 17, 25], 'weights': [0.333333333" in err
    assert err.count("\n") == 1
