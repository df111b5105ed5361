"""Checkpoints of a ZeRO-3 run (parameters sharded over 2 ranks, activation checkpointing on, a sample
video at step 2): the exported adapters are the trained weights (not the empty shards ZeRO-3 holds),
load with plain `peft` on a plain `diffusers.WanTransformer3DModel` and reproduce the student's
full-mask outputs; the checkpoint CLI lists, shows and exports; a checkpoint folder is complete or
ignored."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from train_utils import TINY_STAGE1, latest, run_cli, write_tiny_shards


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("zero3")
    write_tiny_shards(root / "shards", 16, samples_per_shard=4, seed=2)
    run_dir = root / "run"
    run_cli("stage1", "--config", TINY_STAGE1, "--nproc", "2", f"output_dir={run_dir}", f"data.shards={root / 'shards'}",
            "train.zero_stage=3", "train.zero3_param_persistence_threshold=0", "student.gradient_checkpointing=true",
            "train.max_steps=3", "train.checkpoint_every=2", "train.keep_last=1", "train.video_every=2")
    return run_dir


def test_zero3_run_keeps_only_the_last_complete_checkpoint(zero3_run):
    folders = sorted(p.name for p in (zero3_run / "checkpoints").iterdir() if p.is_dir())
    assert folders == ["step-00000003"] and latest(zero3_run) == "step-00000003"
    manifest = json.loads((zero3_run / "checkpoints" / "step-00000003" / "checkpoint.json").read_text())
    assert (manifest["zero_stage"], manifest["world_size"], manifest["reason"]) == (3, 2, "final")
    assert manifest["samples_seen"] == 12
    # A sample video streamed with the parameters sharded (gathered for it) reached TensorBoard.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(zero3_run / "tb"), size_guidance={"images": 0})
    acc.Reload()
    assert [e.step for e in acc.Images("samples/stream")] == [2]
    # The frozen base is not in the checkpoint: a few hundred kB of LoRA + optimizer state.
    assert sum(f.stat().st_size for f in (zero3_run / "checkpoints").rglob("*.pt")) < 5 * 2**20


def test_exported_adapters_load_with_plain_peft_and_reproduce_the_student(zero3_run, tmp_path):
    from diffusers import WanTransformer3DModel
    from peft import PeftModel

    from gd_train.config import load_config
    from gd_train.model.backbone import load_transformer
    from gd_train.model.student import GreedyDistillStudent

    out = tmp_path / "export"
    proc = run_cli("ckpt", "export", str(zero3_run), "--out", str(out))
    assert "exported step-00000003" in proc.stdout

    # The ZeRO-3 shards were gathered: every LoRA weight has its full shape and B is no longer zero.
    sdd = load_file(str(out / "sdd" / "adapter_model.safetensors"))
    assert sdd and all(v.numel() > 0 for v in sdd.values())
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in sdd.items())

    cfg = load_config(TINY_STAGE1)
    student = GreedyDistillStudent.from_config(cfg)
    student.load_adapters(out)
    plain = load_transformer(cfg)  # the tiny teacher: a plain WanTransformer3DModel, weights from model.init_seed
    assert type(plain) is WanTransformer3DModel
    model = PeftModel.from_pretrained(plain, str(out / "sdd"), adapter_name="sdd")
    model.load_adapter(str(out / "etm"), adapter_name="etm")

    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 16, 3, 8, 12, generator=gen)
    text = torch.randn(1, 9, 32, generator=gen)
    timestep = torch.tensor([620.0])
    for adapter in ("etm", "sdd"):
        model.set_adapter(adapter)
        with torch.no_grad():
            expected = model(hidden_states=latents, timestep=timestep, encoder_hidden_states=text).sample
            ours = student.runner(latents, timestep, [0, 1, 2], text, adapter=adapter).velocity
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad(), model.disable_adapter():  # and the trained adapter does change the output
        assert not torch.allclose(model(hidden_states=latents, timestep=timestep, encoder_hidden_states=text).sample,
                                  expected, atol=1e-4)

    # The c_f projection: plain safetensors into a plain LayerNorm + Linear.
    dim = student.dim
    proj = torch.nn.Sequential(torch.nn.LayerNorm(dim, elementwise_affine=False), torch.nn.Linear(dim, dim))
    proj.load_state_dict(load_file(str(out / "cf_proj.safetensors")))
    hidden = torch.randn(2, 24, dim, generator=gen)
    torch.testing.assert_close(proj(hidden), student.project_cond(hidden))
    assert proj[1].weight.abs().sum() > 0  # trained away from its zero initialisation


def test_ckpt_ls_and_show(zero3_run):
    listing = run_cli("ckpt", "ls", str(zero3_run)).stdout
    assert "* step-00000003" in listing and "final" in listing
    shown = run_cli("ckpt", "show", str(zero3_run)).stdout
    assert '"step": 3' in shown and "adapter sdd: rank 4" in shown and "trainer/rank-00001.json" in shown


def test_checkpoint_folder_resolution_is_strict(zero3_run, tmp_path):
    from gd_train.checkpoint import CheckpointError, resolve

    assert resolve(zero3_run).name == "step-00000003"
    assert resolve(zero3_run / "checkpoints" / "step-00000003").name == "step-00000003"
    run = tmp_path / "run"
    (run / "checkpoints" / ".partial-step-00000005").mkdir(parents=True)
    (run / "config.yaml").write_text("seed: 0\n")
    with pytest.raises(CheckpointError, match="no complete checkpoint yet"):
        resolve(run)
    with pytest.raises(CheckpointError, match="half-written"):
        resolve(run / "checkpoints" / ".partial-step-00000005")
    (run / "checkpoints" / "step-00000004").mkdir()
    (run / "checkpoints" / "latest").write_text("step-00000004\n")
    with pytest.raises(CheckpointError, match=r"step-00000004 is incomplete \(no checkpoint.json .*no earlier complete"):
        resolve(run)
    proc = run_cli("ckpt", "export", str(run), check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "no checkpoint.json" in proc.stderr


def test_deepspeed_zero_to_fp32_safetensors_holds_each_trained_weight_once(zero3_run, tmp_path):
    """DeepSpeed's own recovery script (copied into checkpoints/ by DeepSpeed) on the 2-rank ZeRO-3
    checkpoint, with --safe_serialization: safetensors refuses shared tensors, so this fails if any
    weight is recorded under two names."""
    import subprocess
    import sys

    root = zero3_run / "checkpoints"
    out = tmp_path / "fp32"
    proc = subprocess.run([sys.executable, str(root / "zero_to_fp32.py"), str(root), str(out), "-t", "step-00000003",
                           "--safe_serialization"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    weights = load_file(str(out / "model.safetensors"))
    adapters = root / "step-00000003" / "adapters"
    expected = {f"student.cf_proj.{k}": v for k, v in load_file(str(adapters / "cf_proj.safetensors")).items()}
    for name in ("etm", "sdd"):  # PEFT's file drops the adapter name from the key
        for key, value in load_file(str(adapters / name / "adapter_model.safetensors")).items():
            expected["student.peft." + key.replace(".weight", f".{name}.weight")] = value
    assert sorted(weights) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(weights[key], value), key
