"""Fault injection (issue 11): shards damaged in six ways under a real 2-rank `gd-train stage1` run.

One manifested folder (written by `write_shard`, so the manifest holds per-sample digests) gets:
a truncated shard, one with garbage appended, a byte flipped inside a sample's tensor data (it still
decodes: only the digest catches it), one inside a JSON member (still valid JSON), one in a tar header,
and a shard deleted. From the per-rank trace: no damaged sample's key is ever trained on; every damage
is one line of the run's output; TensorBoard and `gd-train ckpt show` count them; the run finishes.
The same run then serves the checkpoint-completeness checks (issue 11, item 5).
"""

from __future__ import annotations

import re
import shutil
import tarfile
from pathlib import Path

import pytest
import webdataset as wds

from gd_train.data.shards import SHARD_NAME, Manifest, decode_sample, write_shard
from gd_train.metrics import read_scalars
from train_utils import TINY_STAGE1, metrics, run_cli, trace, write_tiny_shards

SHARDS, PER_SHARD = 12, 4


def _member(path: Path, sample: int, ext: str) -> tarfile.TarInfo:
    with tarfile.open(path) as tar:
        return next(m for m in tar.getmembers() if m.name == f"{_keys(path)[sample]}.{ext}")


def _keys(path: Path) -> list[str]:
    with tarfile.open(path) as tar:
        return list(dict.fromkeys(m.name.split(".", 1)[0] for m in tar.getmembers()))


def _first_member(path: Path, sample: int) -> tarfile.TarInfo:
    with tarfile.open(path) as tar:
        return next(m for m in tar.getmembers() if m.name.startswith(_keys(path)[sample] + "."))


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0x5A]))


def gd_train(capsys, *args: str) -> tuple[int, str, str]:
    """`gd-train ARGS` through its entry point, in-process (for the commands that start no rank)."""
    from gd_train.cli import main

    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def damaged(tmp_path_factory) -> tuple[Path, dict[str, set[str]], list[str]]:
    """The folder, {kind of damage: keys it ruins}, and every key."""
    raw, folder = tmp_path_factory.mktemp("raw"), tmp_path_factory.mktemp("shards")
    keys = write_tiny_shards(raw, SHARDS * PER_SHARD, samples_per_shard=PER_SHARD)
    records = {}
    for index in range(SHARDS):
        name = SHARD_NAME.format(index=index)
        samples = [decode_sample(s) for s in wds.tarfile_samples([{"url": str(raw / name)}])]
        records[name] = write_shard(folder / name, samples, attempt_tag="test")
    shape = list(samples[0].latents.shape)
    Manifest(settings={"latent_shape": shape}, total_shards=SHARDS, shards=records).save(folder)
    shard = [folder / SHARD_NAME.format(index=i) for i in range(SHARDS)]
    of = [_keys(p) for p in shard]
    ruined: dict[str, set[str]] = {}

    with open(shard[0], "r+b") as fh:  # truncation
        fh.truncate(shard[0].stat().st_size // 2)
    ruined["truncated"] = set(of[0])
    with open(shard[1], "ab") as fh:  # appended garbage
        fh.write(b"\x00garbage" * 100)
    ruined["appended"] = set(of[1])

    member = _member(shard[2], 1, "safetensors")  # a byte of tensor data (the tail of the payload)
    _flip(shard[2], member.offset_data + member.size - 7)
    flipped = next(s for s in wds.tarfile_samples([{"url": str(shard[2])}]) if s["__key__"] == of[2][1])
    decode_sample(flipped)  # still decodes: without the digest this sample would train silently
    ruined["tensor byte"] = {of[2][1]}

    member = _member(shard[3], 2, "json")  # a caption letter: still valid JSON
    with open(shard[3], "rb") as fh:
        fh.seek(member.offset_data)
        data = fh.read(member.size)
    _flip(shard[3], member.offset_data + data.index(b"prompt") + 2)
    ruined["json byte"] = {of[3][2]}

    _flip(shard[4], _first_member(shard[4], 2).offset + 3)  # a tar header: the archive ends there
    ruined["tar header"] = set(of[4][2:])

    shard[5].unlink()  # deleted from a manifested folder
    ruined["deleted"] = set(of[5])
    return folder, ruined, keys


@pytest.fixture(scope="module")
def run(damaged, tmp_path_factory):
    folder, _, _ = damaged
    run_dir = tmp_path_factory.mktemp("run") / "r"
    proc = run_cli("stage1", "--config", TINY_STAGE1, "--nproc", "2", f"output_dir={run_dir}", f"data.shards={folder}",
                   "train.epochs=1", "train.trace=true", "train.checkpoint_every=4", timeout=400)
    return run_dir, proc.stdout + proc.stderr


def test_no_damaged_sample_is_trained_on_and_each_damage_is_one_line(damaged, run, capsys):
    folder, ruined, keys = damaged
    run_dir, output = run
    bad = set().union(*ruined.values())
    per_rank = trace(run_dir)
    trained = [k for records in per_rank.values() for r in records for k in r["keys"]]
    assert not set(trained) & bad, "a damaged sample was trained on"
    assert set(trained) == set(keys) - bad  # everything else was, in 9 equal steps on both ranks
    assert [len(t) for t in per_rank.values()] == [18, 18] and metrics(run_dir)[-1]["step"] == 9

    lines = output.splitlines()
    for shard in (0, 1, 5):  # left out at start: one line each, from one rank
        name = SHARD_NAME.format(index=shard)
        assert len([line for line in lines if f"skipping shard: {folder / name}" in line]) == 1, name
    for kind in ("tensor byte", "json byte"):
        (key,) = ruined[kind]
        hits = [line for line in lines if f"sample '{key}'" in line]
        assert len(hits) == 1 and "differs from the manifest's digest" in hits[0], (kind, hits)
    hits = [line for line in lines if f"{SHARD_NAME.format(index=4)}: sample #" in line]
    assert sorted(re.search(r"sample #(\d)", h).group(1) for h in hits) == ["2", "3"], hits
    assert "Traceback" not in output

    scalars = read_scalars(run_dir / "tb")
    last = {tag: values[-1][1] for tag, values in scalars.items() if tag.startswith("data/")}
    assert last["data/skipped_shards"] == 3
    assert last["data/corrupt_samples"] == last["data/repeated_samples"] == 4  # summed over both ranks
    assert last["data/broken_shards"] >= 1
    assert metrics(run_dir)[-1]["data/corrupt_samples"] == 4

    code, show, _ = gd_train(capsys, "ckpt", "show", str(run_dir))
    assert "data damage (all ranks): skipped_shards 3, broken_shards 1, corrupt_samples 4, repeated_samples 4" in show


def test_refuse_mode_lists_each_problem_and_starts_nothing(damaged, tmp_path, capsys):
    folder, _, _ = damaged
    code, _, err = gd_train(capsys, "stage1", "--config", TINY_STAGE1, "--nproc", "2", f"output_dir={tmp_path / 'r'}",
                            f"data.shards={folder}", "data.on_damage=refuse")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 4 and all(line.startswith("gd-train: damaged data: ") for line in lines[:3])
    assert "listed in manifest.json but missing" in err and "the manifest says" in err
    assert lines[3].startswith("gd-train: error: key 'data.on_damage': refuse, and 3 shard(s)")
    assert not (tmp_path / "r").exists()


def test_incomplete_latest_checkpoint_falls_back_or_is_refused(run, tmp_path, capsys):
    run_dir, _ = run
    ckpts = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == ["step-00000004", "step-00000008", "step-00000009"]
    hopeless = tmp_path / "hopeless"
    shutil.copytree(run_dir, hopeless)
    for folder in (hopeless / "checkpoints").glob("step-*"):
        (folder / "state" / "trainable.safetensors").unlink()  # the weights and optimizer moments
    code, _, err = gd_train(capsys, "resume", str(hopeless), "--nproc", "2")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "latest checkpoint step-00000009 is incomplete" in err and "state/trainable.safetensors missing" in err
    assert "no earlier complete checkpoint exists" in err

    losses = {r["step"]: r["loss"] for r in metrics(run_dir)}
    ckpts.joinpath("step-00000009", "state", "trainable.safetensors").unlink()
    listing = gd_train(capsys, "ckpt", "ls", str(run_dir))[1]
    assert re.search(r"step-00000009 +\(incomplete: ignored\)", listing), listing
    proc = run_cli("resume", str(run_dir), "--nproc", "2", timeout=300)
    warnings = [line for line in proc.stderr.splitlines() if "is incomplete" in line]
    assert len(warnings) == 1 and "resuming from step-00000008" in warnings[0], proc.stderr
    assert "Traceback" not in proc.stderr
    redone = metrics(run_dir)
    assert [r["step"] for r in redone] == list(range(1, 10))
    assert redone[-1]["loss"] == losses[9]  # step 9 trained again from step 8's state: the same loss
