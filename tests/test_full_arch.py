"""The real Wan2.1-T2V-1.3B architecture end to end (random weights in the Diffusers layout, bf16, a
tiny spatial size): a streamed clip through gd-generate; stage 1 on 2 ranks under ZeRO-2 and ZeRO-3
with activation checkpointing (losses agree), resumed from its checkpoint; stage 2 from it; the
exported adapters loaded by plain PEFT onto the plain diffusers transformer.

Every other test uses the tiny fp32 model, all of whose parameters are under ZeRO-3's persistence
threshold; this one partitions a real 2.8 GB base. It needs ~8-10 GiB per process and ~12 minutes on
2 idle CPU cores (BENCHMARKS.md), more than the `make test` budget leaves: it runs under `make test-full` (GD_FULL_ARCH=1) and is
skipped otherwise. The weights folder is built once per machine (tests/full_arch_utils.py).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys

import pytest
import torch

from full_arch_utils import TINY_SPACE, wan_random_folder, write_full_arch_shards
from train_utils import REPO_ROOT, cli_env, run_cli

full_arch = pytest.mark.skipif(os.environ.get("GD_FULL_ARCH") != "1", reason="full 1.3B architecture: run `make test-full`")

TRAIN = [*TINY_SPACE, "data.num_workers=0", "train.global_batch_size=2", "train.video_every=0",
         "train.checkpoint_every=1", "train.keep_last=2", "train.epochs=100", "student.gradient_checkpointing=true"]


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    folder = wan_random_folder()
    shards = tmp_path_factory.mktemp("full-arch-shards")
    write_full_arch_shards(shards, 8, [f"pretrained_path={folder}", *TINY_SPACE])
    return folder, shards


def _peak_child_rss_gib() -> float:
    """The largest child process waited for so far (this module's first test: gd-generate)."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20


def _losses(run_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@full_arch
def test_a_clip_streams_through_the_full_architecture(wan, tmp_path):
    folder, _ = wan
    out = tmp_path / "clip.safetensors"
    proc = subprocess.run([sys.executable, "-m", "gd_train.generate", "--config", "configs/model/wan2.1-t2v-1.3b.yaml",
                           f"pretrained_path={folder}", *TINY_SPACE, "--prompt", "a red fox in fresh snow",
                           "--latent-frames", "5", "--out", str(out), "--mp4", str(tmp_path / "clip.mp4")],
                          cwd=REPO_ROOT, env=cli_env(), capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from safetensors.torch import load_file

    latents = load_file(str(out))["latents"]
    assert latents.shape == (1, 16, 5, 4, 4) and torch.isfinite(latents.float()).all()
    assert (tmp_path / "clip.mp4").stat().st_size > 0
    print(f"gd-generate, full arch: peak RSS {_peak_child_rss_gib():.2f} GiB")


@pytest.mark.slow
@full_arch
def test_stage1_zero2_and_zero3_agree_resume_then_stage2_and_export_load_in_plain_peft(wan, tmp_path):
    folder, shards = wan
    runs = {}
    for stage in (2, 3):
        run_dir = tmp_path / f"s1-zero{stage}"
        run_cli("stage1", "--config", "configs/stage1.yaml", "--nproc", "2", f"pretrained_path={folder}",
                f"output_dir={run_dir}", f"data.shards={shards}", f"train.zero_stage={stage}", "train.max_steps=2",
                *TRAIN, timeout=3600)
        runs[stage] = run_dir
    z2, z3 = _losses(runs[2]), _losses(runs[3])
    assert len(z2) == len(z3) == 2
    for a, b in zip(z2, z3):
        assert abs(a - b) <= 2e-2 * max(abs(a), 1e-6), (z2, z3)  # same data and seeds; bf16 base

    # Resume the ZeRO-3 run from its step-2 checkpoint for one more step.
    run_cli("resume", str(runs[3]), "--nproc", "2", "train.max_steps=3", timeout=3600)
    assert len(_losses(runs[3])) == 3

    # Stage 2 from the ZeRO-3 run, on ZeRO-3.
    s2 = tmp_path / "s2"
    run_cli("stage2", "--config", "configs/stage2.yaml", "--nproc", "2", f"pretrained_path={folder}",
            f"output_dir={s2}", f"data.shards={shards}", f"train.init_from={runs[3]}", "train.zero_stage=3",
            "train.max_steps=1", *TRAIN, timeout=3600)
    assert len(_losses(s2)) == 1

    # Export; the adapters load with plain PEFT onto the plain diffusers transformer.
    export = tmp_path / "export"
    run_cli("ckpt", "export", str(s2), "--out", str(export))
    from diffusers import WanTransformer3DModel
    from peft import PeftModel

    base = WanTransformer3DModel.from_pretrained(folder / "transformer", torch_dtype=torch.bfloat16)
    model = PeftModel.from_pretrained(base, str(export / "etm"), adapter_name="etm")
    model.load_adapter(str(export / "sdd"), adapter_name="sdd")
    lora = [n for n, _ in model.named_parameters() if ".lora_" in n]
    assert len(lora) == 2 * 2 * 30 * 10  # A and B, two adapters, 30 blocks, 10 target linears
    for name, run_dir in (("stage 1 ZeRO-2", runs[2]), ("stage 1 ZeRO-3 + resume", runs[3]), ("stage 2 ZeRO-3", s2)):
        peaks = [json.loads(line)["system/peak_rss_memory_gib"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        print(f"{name}, full arch: rank 0's peak RSS per step {[round(p, 2) for p in peaks]} GiB")


def test_zero3_gathers_one_block_at_a_time_unless_told_otherwise():
    """DeepSpeed's own limits (1e9 elements) kept most of a frozen 1.3B base gathered (BENCHMARKS.md)."""
    from gd_train.config import load_config
    from gd_train.train.plan import BatchPlan
    from gd_train.train.trainer import deepspeed_config, zero3_block_numel

    cfg = load_config(REPO_ROOT / "configs/stage1.yaml", ["pretrained_path=null", "train.zero_stage=3"])
    block = zero3_block_numel(cfg)
    assert block == 8 * 1536 ** 2 + 2 * 1536 * 8960  # one Wan2.1-1.3B block's adapted linears
    zero = deepspeed_config(cfg, BatchPlan.from_config(cfg.train, 64))["zero_optimization"]
    assert zero["stage3_max_live_parameters"] == 2 * block and zero["stage3_max_reuse_distance"] == block
    assert zero["stage3_prefetch_bucket_size"] == block
    cfg = load_config(REPO_ROOT / "configs/stage1.yaml", ["pretrained_path=null", "train.zero_stage=3",
                                                          "train.zero3_max_live_parameters=1000000000",
                                                          "train.zero3_max_reuse_distance=7"])
    zero = deepspeed_config(cfg, BatchPlan.from_config(cfg.train, 64))["zero_optimization"]
    assert zero["stage3_max_live_parameters"] == 10**9 and zero["stage3_max_reuse_distance"] == 7
    assert "stage3_max_live_parameters" not in deepspeed_config(
        load_config(REPO_ROOT / "configs/stage1.yaml", ["pretrained_path=null"]), BatchPlan.from_config(cfg.train, 64))["zero_optimization"]


def test_zero3_on_a_frozen_base_warns_with_the_most_it_can_save(tiny_cfg):
    from gd_train.model.student import GreedyDistillStudent
    from gd_train.train.trainer import zero3_warning

    student = GreedyDistillStudent.from_config(tiny_cfg)
    base = sum(p.numel() * p.element_size() for p in student.base_parameters().values())
    text = zero3_warning(tiny_cfg, student, 4)
    assert f"at most {base * 3 / 4 / 2**30:.2f} GiB of base weights per rank on 4 rank(s)" in text
    assert "Prefer train.zero_stage=2" in text and "\n" not in text
