"""A run continued on another number of ranks (issue 13, "Resuming on another world size"), end to end
with the real trainer: 2 ranks -> 1 under ZeRO-2 and 1 rank -> 2 under ZeRO-3, from a checkpoint in
the middle of an epoch of mixed clip lengths. Every sample of the epoch is trained on exactly once
across the two segments, the lengths follow the same plan, and the first step after the resume has
the loss the uninterrupted run had at that step (the same samples and noise; fp32 up to the order of
the sums). The per-parameter optimizer state itself is compared in tests/test_checkpoint.py."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pytest

from train_utils import TINY_STAGE1, metrics, run_cli, trace, write_tiny_shards

SAMPLES = 24  # 6 shards of 4, lengths 4 and 6 alternating: 3 steps of 4 samples per length, 6 per epoch
CUT = 3  # the step whose checkpoint the second segment continues from


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[Path, list[str]]:
    folder = tmp_path_factory.mktemp("shards")
    return folder, write_tiny_shards(folder, SAMPLES, samples_per_shard=4, lengths=(4, 6))


def _lost_after(run_dir: Path, copy: Path, step: int) -> None:
    """The run as a node loss after checkpoint `step` leaves it: later checkpoints never finished."""
    shutil.copytree(run_dir, copy)
    for folder in (copy / "checkpoints").glob("step-*"):
        if int(folder.name.split("-")[1]) > step:
            shutil.rmtree(folder)
    (copy / "checkpoints" / "latest").write_text(f"step-{step:08d}\n")


@pytest.mark.parametrize("before,after,zero", [(2, 1, 2), (1, 2, 3)])
def test_a_run_continues_on_another_number_of_ranks(shards, tmp_path, before, after, zero):
    folder, keys = shards
    first = tmp_path / "first"
    run_cli("stage1", "--config", TINY_STAGE1, "--nproc", str(before), f"output_dir={first}", f"data.shards={folder}",
            "train.epochs=1", f"train.zero_stage={zero}", f"train.checkpoint_every={CUT}", "train.trace=true")
    resumed = tmp_path / "resumed"
    _lost_after(first, resumed, CUT)
    proc = run_cli("resume", str(resumed), "--nproc", str(after))
    assert f"of {before} rank(s) continued on {after}" in proc.stderr + proc.stdout

    # Every sample of the epoch exactly once across the two segments, the same lengths step by step.
    old, new = trace(first), trace(resumed)
    segment_1 = [r for rank in range(before) for r in old[rank] if r["step"] <= CUT]
    segment_2 = [r for rank in range(after) for r in new[rank] if r["step"] > CUT]
    seen = Counter(k for r in segment_1 + segment_2 for k in r["keys"])
    assert set(seen) == set(keys) and set(seen.values()) == {1}
    frames = lambda records: sorted({(r["step"], r["frames"]) for r in records})  # noqa: E731
    assert frames(segment_1 + segment_2) == frames(old[0])
    steps_per_rank = Counter(r["step"] for r in segment_2 if r["micro"] == 0)
    assert set(steps_per_rank.values()) == {after}  # every new rank ran every remaining step

    # The loss curve continues: the step after the cut has the uninterrupted run's loss.
    a, b = metrics(first), metrics(resumed)
    assert [r["step"] for r in b] == list(range(1, 7))
    assert b[CUT]["loss"] == pytest.approx(a[CUT]["loss"], rel=1e-5)
    assert [r["loss"] for r in b[CUT + 1:]] == pytest.approx([r["loss"] for r in a[CUT + 1:]], rel=1e-3)
