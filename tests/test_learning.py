"""The recipe learns: a short stage 1, through the real trainer (torchrun + DeepSpeed, one CPU rank), on
clips of the synthetic world makes the student's next-frame position error on held-out samples clearly
lower than the untrained student's — read back from the evaluation hook's TensorBoard scalars.

The data comes straight from the world (ground-truth clips written as teacher shards, prompts through
the tiny text encoder), not from a trained teacher: a fresh CI machine has no cached teacher, and the
base is the tiny random model. The untrained student (zero-initialised adapters) puts its blob
nowhere in particular (~4 px from the truth on an 8 x 12 grid); the margin below was chosen from
measured runs (docs/experiment.md)."""

import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gd_train.config import load_config
from gd_train.eval.world_shards import write_world_shards
from gd_train.metrics import read_scalars
from train_utils import run_cli

STEPS = 80
MARGIN = 0.8  # trained error < MARGIN x untrained error (measured: see docs/experiment.md)


def test_short_stage1_lowers_next_frame_error_on_held_out_samples(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # one rank of tiny matmuls: a second thread only contends
    cfg = load_config("configs/toy/stage1.yaml")
    write_world_shards(tmp_path / "train", cfg, count=64, frames=8, seed=1, key_prefix="train")
    write_world_shards(tmp_path / "heldout", cfg, count=4, frames=8, seed=2, key_prefix="heldout")
    run = tmp_path / "run"
    run_cli("stage1", "--config", "configs/toy/stage1.yaml", "--nproc", "1", f"output_dir={run}",
            f"data.shards={tmp_path / 'train'}", f"data.eval_shards={tmp_path / 'heldout'}",
            f"train.max_steps={STEPS}", f"train.eval_every={STEPS}", f"train.checkpoint_every={STEPS}",
            "train.eval_samples=4", "train.lr=5e-3", timeout=580)

    scalars = read_scalars(run / "tb")
    error = dict(scalars["eval/world/next_frame_error"])
    val_loss = dict(scalars["eval/val_loss"])
    assert sorted(error) == sorted(val_loss) == [0, STEPS]  # before the first step, and at the end
    assert error[STEPS] < MARGIN * error[0], error
    assert val_loss[STEPS] < val_loss[0], val_loss
    for tag in ("position_error", "direction_cosine", "shape_error", "identity"):
        assert [s for s, _ in scalars[f"eval/world/{tag}"]] == [0, STEPS]

    # metrics.jsonl carries the same numbers; the sample video is in TensorBoard's image dashboard
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    by_step = {r["step"]: r["eval/world/next_frame_error"] for r in rows if "eval/world/next_frame_error" in r}
    assert by_step == pytest.approx(error)
    events = EventAccumulator(str(run / "tb"), size_guidance={"images": 0})
    events.Reload()
    assert [e.step for e in events.Images("eval/sample")] == [0, STEPS]


def test_evaluation_needs_held_out_shards_that_are_not_training_data():
    from gd_train.config import ConfigError

    with pytest.raises(ConfigError, match="data.eval_shards.*no held-out shards"):
        load_config("configs/toy/stage1.yaml", ["data.eval_shards=null"])
    with pytest.raises(ConfigError, match="is also data.shards"):
        load_config("configs/toy/stage1.yaml", ["data.shards=/x/shards", "data.eval_shards=/x/shards/"])
    with pytest.raises(ConfigError, match="eval_evaluator"):
        load_config("configs/toy/stage1.yaml", ["train.eval_evaluator=fid"])
