"""Bad input gets one clear line before any work (no process is started), and non-finite losses are
skipped on every rank together, counted, and abort the run after train.max_bad_steps in a row."""

from __future__ import annotations

from pathlib import Path

import pytest

from train_utils import TINY_STAGE1, TINY_STAGE2, metrics, run_cli, trace, write_tiny_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("shards")
    write_tiny_shards(folder, 8, samples_per_shard=4)
    return folder


def _refused(*args: str) -> str:
    proc = run_cli(*args, check=False, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gd-train: error:"), proc.stderr
    assert "step 1" not in proc.stdout  # nothing trained
    return lines[0]


@pytest.mark.parametrize("args, message", [
    (["--nproc", "3"], "'train.global_batch_size': 4 is not divisible by train.micro_batch_size 1 x world size 3 = 3"),
    (["--nproc", "2", "train.micro_batch_size=4"], "4 is not divisible by train.micro_batch_size 4 x world size 2 = 8"),
    (["train.schedule=linear"], "key 'train.schedule': expected one of constant|cosine, got 'linear'"),
    (["train.adapters=[etm,critic]"], "key 'train.adapters': expected a non-empty subset of ['etm', 'sdd']"),
    (["train.stage=stage2"], "the config says 'stage2' but the command is 'stage1'"),
    (["train.lr_warmup=3"], "unknown key 'train.lr_warmup' (did you mean 'train.warmup_steps'?)"),
    (["data.shards=/nonexistent/shards"], "'/nonexistent/shards' names no shard-*.tar files"),
])
def test_stage1_refusals(shards, tmp_path, args, message):
    line = _refused("stage1", "--config", TINY_STAGE1, f"output_dir={tmp_path / 'run'}", f"data.shards={shards}", *args)
    assert message in line
    assert not (tmp_path / "run").exists()


def test_stage2_needs_a_stage1_checkpoint(shards, tmp_path):
    line = _refused("stage2", "--config", TINY_STAGE2, f"output_dir={tmp_path / 'run'}", f"data.shards={shards}",
                    f"train.init_from={tmp_path / 'no-such-run'}")
    assert "no-such-run: no such folder" in line
    line = _refused("stage2", "--config", TINY_STAGE2, f"data.shards={shards}", "train.init_from=null")
    assert "key 'train.init_from': stage 2 starts from a stage-1 checkpoint" in line


def test_non_finite_losses_are_skipped_together_and_counted(tmp_path):
    nan_keys = ["sample-00003", "sample-00010"]
    keys = write_tiny_shards(tmp_path / "shards", 16, samples_per_shard=4, nan_keys=nan_keys)
    run_dir = tmp_path / "run"
    proc = run_cli("stage1", "--config", TINY_STAGE1, "--nproc", "2", f"output_dir={run_dir}",
                   f"data.shards={tmp_path / 'shards'}", "train.global_batch_size=2", "train.epochs=1",
                   "train.trace=true")
    per_rank = trace(run_dir)
    skipped = [(r["step"], r["micro"]) for r in per_rank[0] if r["skipped"]]
    assert skipped == [(r["step"], r["micro"]) for r in per_rank[1] if r["skipped"]], "ranks disagreed on a skip"
    nan_micro_steps = {(r["step"], r["micro"]) for records in per_rank.values() for r in records
                       if set(r["keys"]) & set(nan_keys)}
    assert set(skipped) == nan_micro_steps and len(skipped) >= 1
    records = metrics(run_dir)
    assert records[-1]["optimisation/skipped_micro_steps"] == len(skipped)
    # Every logged loss is finite; a step whose every micro-batch was skipped logs none.
    assert all(isinstance(r["loss"], float) for r in records if "loss" in r)
    assert sum("loss" not in r for r in records) == len({step for step, _ in skipped})  # one micro-batch per step
    # A skipped micro-batch keeps its place in the step (zero gradient): all 8 steps of the epoch run.
    assert records[-1]["step"] == 8 and (run_dir / "checkpoints" / "step-00000008" / "checkpoint.json").is_file()
    assert len(keys) == 16


def test_consecutive_non_finite_losses_abort_with_a_clear_message(tmp_path):
    keys = [f"sample-{i:05d}" for i in range(8)]
    write_tiny_shards(tmp_path / "shards", 8, samples_per_shard=4, nan_keys=keys)
    proc = run_cli("stage1", "--config", TINY_STAGE1, "--nproc", "2", f"output_dir={tmp_path / 'run'}",
                   f"data.shards={tmp_path / 'shards'}", "train.global_batch_size=2", "train.max_bad_steps=3",
                   check=False)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "aborted: step 3: 3 consecutive non-finite losses (train.max_bad_steps=3)" in proc.stderr
