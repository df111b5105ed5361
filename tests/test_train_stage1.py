"""Stage 1 as a user runs it: `gd-train stage1 --nproc 2` (DeepSpeed ZeRO-2, 2 CPU ranks over gloo) on
real tiny shards. Loss goes down, TensorBoard holds the scalars and a sample video, a run killed with
SIGKILL resumes to bit-identical losses with every sample seen once, SIGUSR1 checkpoints and exits
cleanly, and resume ignores half-written checkpoint folders."""

from __future__ import annotations

import json
import shutil
import signal
from collections import Counter
from pathlib import Path

import pytest

from train_utils import (TINY_STAGE1, kill_group, latest, metrics, run_cli, start_cli, trace, wait_for,
                         write_tiny_shards)

NUM_SAMPLES = 48  # 12 optimizer steps of 4 samples per epoch (2 ranks x 2 accumulation x micro 1)
STEPS = 24  # = 2 epochs
KILL_AT = 9  # the exact-resume point: a checkpoint in the middle of epoch 0
LENGTHS = (4, 6)  # latent frames, alternating by shard: every run here trains on mixed lengths


def _common(run_dir: Path, shards: Path, *extra: str) -> list[str]:
    return ["--config", TINY_STAGE1, "--nproc", "2", f"output_dir={run_dir}", f"data.shards={shards}",
            "train.epochs=2", "train.trace=true", "data.num_workers=2", *extra]  # 2 ranks x 2 loader workers


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[Path, list[str]]:
    folder = tmp_path_factory.mktemp("shards")
    return folder, write_tiny_shards(folder, NUM_SAMPLES, samples_per_shard=4, lengths=LENGTHS)


@pytest.fixture(scope="module")
def run_a(shards, tmp_path_factory) -> Path:
    """The uninterrupted reference run: 24 steps, checkpoints at 12 and 24, a sample video at 12."""
    run_dir = tmp_path_factory.mktemp("run") / "a"
    run_cli("stage1", *_common(run_dir, shards[0], "train.checkpoint_every=12", "train.video_every=12"))
    return run_dir


def test_loss_goes_down_and_tensorboard_holds_the_scalars(run_a):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from gd_train.metrics import read_layout, read_scalars, tags_outside_layout

    records = metrics(run_a)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    losses = [r["loss"] for r in records]
    first, last = sum(losses[:6]) / 6, sum(losses[-6:]) / 6
    assert last < first - 0.1, f"loss did not go down: first steps {first:.4f}, last steps {last:.4f}"

    scalars = read_scalars(run_a / "tb")
    for tag in ("loss/stage1_next_chunk", "optimisation/lr", "optimisation/grad_norm", "throughput/samples_per_s",
                "throughput/tokens_per_s", "throughput/step_time_s", "throughput/data_wait_fraction",
                "system/peak_rss_memory_gib"):
        assert [step for step, _ in scalars[tag]] == list(range(1, STEPS + 1)), tag
    assert [v for _, v in scalars["loss/stage1_next_chunk"]] == pytest.approx(losses, rel=1e-6)
    assert not any(tag.startswith("loss/") and tag != "loss/stage1_next_chunk" for tag in scalars)
    assert all(0 <= v <= 1 for _, v in scalars["throughput/data_wait_fraction"])
    assert all(v > 0 for _, v in scalars["optimisation/grad_norm"])

    acc = EventAccumulator(str(run_a / "tb"), size_guidance={"images": 0})
    acc.Reload()
    gif = acc.Images("samples/stream")
    assert [e.step for e in gif] == [12, 24] and gif[0].encoded_image_string[:6] == b"GIF89a"
    assert (gif[0].height, gif[0].width) == (64, 96)
    # Every logged scalar has a chart in the custom layout the event files hold (read back).
    layout = read_layout(run_a / "tb")
    assert list(layout)[:2] == ["loss", "optimisation"] and "RL" in layout
    assert tags_outside_layout(run_a / "tb") == []


def test_checkpoints_hold_what_trains_and_nothing_of_the_frozen_base(run_a):
    from gd_train.checkpoint import trainable_state
    from gd_train.config import load_config
    from gd_train.model.student import GreedyDistillStudent

    folder = run_a / "checkpoints" / "step-00000024"
    tensors, meta = trainable_state(folder)  # per-parameter state (safetensors + JSON)
    student = GreedyDistillStudent.from_config(load_config(TINY_STAGE1))
    trained = {n for n, p in student.named_parameters() if p.requires_grad}
    assert set(meta["params"]) == trained  # both adapters and c_f, each once, under one name
    assert {k.split("/", 1)[1] for k in tensors} == trained
    assert all(".lora_" in k or k.startswith("cf_proj.") for k in trained)
    assert not list(folder.rglob("*.pt"))  # no DeepSpeed pickles


def _epoch_keys(per_rank: dict[int, list[dict]], epoch: int) -> Counter:
    return Counter(k for records in per_rank.values() for r in records if r["epoch"] == epoch for k in r["keys"])


def test_sigkill_after_checkpoint_then_resume_is_exact(shards, run_a, tmp_path):
    folder, keys = shards
    run_b = tmp_path / "b"
    log = tmp_path / "b.log"
    tag = f"step-{KILL_AT:08d}"
    proc = start_cli("stage1", *_common(run_b, folder, f"train.checkpoint_every={KILL_AT}"), log=log)
    wait_for(lambda: latest(run_b) == tag, 300, f"the checkpoint at step {KILL_AT}", proc, log)
    kill_group(proc, signal.SIGKILL)
    proc.wait(timeout=60)
    assert latest(run_b) == tag, "the run went past its next checkpoint before it could be killed"
    shown = run_cli("ckpt", "show", str(run_b)).stdout  # the reader's global position, with its buckets
    next_frames = next(x["frames"] for x in trace(run_a)[0] if x["step"] == KILL_AT + 1)
    assert (f"data position: epoch 0, {KILL_AT} of 12 steps consumed (saved by 2 rank(s)), next step: {next_frames} "
            f"latent frames; steps per epoch by length (latent frames): F=4: 6, F=6: 6") in shown, shown

    run_cli("resume", str(run_b), "--nproc", "2")

    a, b = metrics(run_a), metrics(run_b)
    assert [r["step"] for r in b] == list(range(1, STEPS + 1)), "metrics.jsonl forked or has gaps"
    # fp32 on CPU, deterministic: the resumed losses are those of the uninterrupted run, bit for bit.
    assert [r["loss"] for r in b[KILL_AT:]] == [r["loss"] for r in a[KILL_AT:]]
    assert [r["optimisation/grad_norm"] for r in b[KILL_AT:]] == [r["optimisation/grad_norm"] for r in a[KILL_AT:]]

    # Same samples in the same order on every rank; each sample exactly once per epoch.
    trace_a, trace_b = trace(run_a), trace(run_b)
    assert {r: [x["keys"] for x in t] for r, t in trace_b.items()} == {r: [x["keys"] for x in t] for r, t in trace_a.items()}
    # Mixed lengths: at every step both ranks read the same length, and the resumed run the same sequence.
    frames = {r: [(x["step"], x["frames"]) for x in t] for r, t in trace_b.items()}
    assert frames[0] == frames[1] == [(x["step"], x["frames"]) for x in trace_a[0]]
    assert {f for _, f in frames[0]} == set(LENGTHS)
    for epoch in (0, 1):
        seen = _epoch_keys(trace_b, epoch)
        assert set(seen) == set(keys) and set(seen.values()) == {1}, f"epoch {epoch}: duplicated or missing samples"

    # The TensorBoard curve has one point per step (events past the checkpoint from before the kill were purged).
    from gd_train.metrics import read_scalars

    assert [s for s, _ in read_scalars(run_b / "tb")["loss/stage1_next_chunk"]] == list(range(1, STEPS + 1))


def test_sigusr1_checkpoints_at_the_next_step_and_resume_ignores_half_written_folders(shards, run_a, tmp_path):
    folder, _ = shards
    run_c = tmp_path / "c"
    log = tmp_path / "c.log"
    proc = start_cli("stage1", *_common(run_c, folder, "train.checkpoint_every=100"), log=log)
    wait_for(lambda: (run_c / "metrics.jsonl").is_file() and len(metrics(run_c)) >= 3, 300, "step 3", proc, log)
    proc.send_signal(signal.SIGUSR1)  # to the launcher, as SLURM signals the task of each node
    assert proc.wait(timeout=120) == 0, log.read_text()[-4000:]

    stopped_at = json.loads((run_c / "preempted.json").read_text())["step"]
    assert 3 <= stopped_at < STEPS
    assert latest(run_c) == f"step-{stopped_at:08d}"
    assert metrics(run_c)[-1]["step"] == stopped_at  # checkpointed right at the step boundary it reached
    manifest = json.loads((run_c / "checkpoints" / latest(run_c) / "checkpoint.json").read_text())
    assert manifest["reason"] == "preempted" and manifest["step"] == stopped_at

    # Half-written folders (a save that crashed): one under the partial name, one that lost its manifest.
    ckpts = run_c / "checkpoints"
    shutil.copytree(ckpts / latest(run_c), ckpts / ".partial-step-00000099")
    shutil.copytree(ckpts / latest(run_c), ckpts / "step-00000098")
    (ckpts / "step-00000098" / "checkpoint.json").unlink()
    listing = run_cli("ckpt", "ls", str(run_c)).stdout
    assert "incomplete: ignored" in listing and f"* step-{stopped_at:08d}" in listing

    run_cli("resume", str(run_c), "--nproc", "2")
    c = metrics(run_c)
    assert [r["step"] for r in c] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in c] == [r["loss"] for r in metrics(run_a)]
    assert not (run_c / "preempted.json").exists()
    assert not (ckpts / ".partial-step-00000099").exists()  # stale partial saves are cleared


def test_resume_refuses_what_it_cannot_continue(shards, run_a, tmp_path):
    # Another world size resumes (tests/test_checkpoint.py), unless the global batch cannot divide over
    # it: refused before any process starts.
    proc = run_cli("resume", str(run_a), "--nproc", "3", check=False)
    assert proc.returncode == 2
    line = proc.stderr.strip().splitlines()[-1]
    assert ("the run's global batch of 4 samples cannot be kept on 3 rank(s) (micro-batch 1); resume on a number of "
            "ranks that divides 4 (1, 2, 4)") in line and line.startswith("gd-train: error:")
    assert run_cli("resume", str(run_a), "--nproc", "1", "--dry-run").returncode == 0

    # What the checkpoint's state is made of cannot change on resume (train.init_from starts a new run).
    for override, said in (("student.sdd_lora.rank=8", "key 'student.sdd_lora': run "),
                           ("train.adapters=[sdd]", "key 'train.adapters': run ")):
        proc = run_cli("resume", str(run_a), "--nproc", "2", override, check=False)
        line = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode == 2 and line.startswith("gd-train: error: " + said), proc.stderr
        assert "this resume sets" in line and f"train.init_from={run_a}" in line

    # `latest` naming a folder that is not complete.
    broken = tmp_path / "broken"
    shutil.copytree(run_a, broken)
    (broken / "checkpoints" / "latest").write_text("step-00000077\n")
    proc = run_cli("resume", str(broken), "--nproc", "2", check=False)
    assert proc.returncode == 2 and "names 'step-00000077'" in proc.stderr and "does not exist" in proc.stderr

    missing = tmp_path / "nothing-here"
    proc = run_cli("resume", str(missing), check=False)
    assert proc.returncode == 2 and "no such folder" in proc.stderr

    # A fresh start into a folder that already holds a run.
    proc = run_cli("stage1", *_common(run_a, shards[0]), check=False)
    assert proc.returncode == 2 and "already holds a run" in proc.stderr and "gd-train resume" in proc.stderr
