"""Bad input found before any process starts, in one line through the public commands (issue 11,
items 6-9): adapters of another LoRA rank for `train.init_from`, shards whose latents do not fit the
config's video settings, a `--prompt-embeds` file that is not safetensors or has the wrong width, a
`--steps` list that is not integers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from train_utils import TINY_STAGE1, TINY_STAGE2, write_tiny_shards

def _refused(capsys, *args: str) -> str:
    """`gd-train ARGS` through its entry point, in-process: one line on stderr, nothing launched."""
    from gd_train.cli import main

    code = main(list(args))
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("gd-train: error:"), err
    assert "Traceback" not in err and "rank" not in out
    return lines[0]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("shards")  # no manifest: the shape is read from the first sample
    write_tiny_shards(folder, 8, samples_per_shard=4)
    return folder


def test_init_from_adapters_of_another_rank_is_refused_before_any_rank(shards, tmp_path, capsys):
    from peft import LoraConfig

    from gd_train.config import load_config

    lora = load_config(TINY_STAGE2).student.etm_lora
    for name in ("etm", "sdd"):  # adapter configs as PEFT writes them, of the tiny config's rank 4
        config = LoraConfig(r=4, lora_alpha=4, target_modules=list(lora.target_modules))
        config.save_pretrained(str(tmp_path / "a" / name))
    line = _refused(capsys, "stage2", "--config", TINY_STAGE2, "--nproc", "2", f"output_dir={tmp_path / 'run'}",
                    f"data.shards={shards}", f"train.init_from={tmp_path / 'a'}", "student.etm_lora.rank=8")
    assert "etm has rank 4" in line and "the config asks rank 8" in line and "student.etm_lora" in line
    assert not (tmp_path / "run").exists()


def test_latent_shape_mismatch_is_refused_before_any_rank(shards, tmp_path, capsys):
    line = _refused(capsys, "stage1", "--config", TINY_STAGE1, "--nproc", "2", f"output_dir={tmp_path / 'run'}",
                    f"data.shards={shards}", "video.height=128")
    assert "shard-000000.tar holds latents (16, 6, 8, 12)" in line and "give (16, F, 16, 12)" in line, line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("make, args, message", [
    (lambda p: p.write_bytes(b"\xff" * 64), [], "unreadable (SafetensorError"),
    (lambda p: save_file({"prompt_embeds": torch.zeros(5, 7)}, str(p)), [],
     "`prompt_embeds` has shape (5, 7), expected (tokens, 32)"),
    (lambda p: save_file({"text": torch.zeros(5, 32)}, str(p)), [], "no `prompt_embeds` tensor inside (has ['text'])"),
    (None, ["--steps", "1000,abc"], "--steps '1000,abc': expected comma-separated integer timesteps"),
])
def test_gd_generate_bad_input_is_one_line(tmp_path, capsys, make, args, message):
    from gd_train.generate import main  # the console script's entry point, in-process: no model is built

    extra = []
    if make is not None:
        make(tmp_path / "p.safetensors")
        extra = ["--prompt-embeds", str(tmp_path / "p.safetensors")]
    code = main(["--config", "configs/model/tiny.yaml", "--out", str(tmp_path / "x.safetensors"), *extra, *args])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("gd-generate: error:"), err
    assert message in err, err
    if make is not None:
        assert str(tmp_path / "p.safetensors") in err
    assert not (tmp_path / "x.safetensors").exists()


def test_a_length_whose_global_batch_cannot_divide_is_refused_before_any_rank(tmp_path, capsys):
    folder = tmp_path / "mixed"
    write_tiny_shards(folder, 16, samples_per_shard=4, lengths=(4, 6))
    common = ["stage1", "--config", TINY_STAGE1, "--nproc", "2", f"output_dir={tmp_path / 'run'}",
              f"data.shards={folder}", "train.global_batch_size=4"]
    line = _refused(capsys, *common, "train.micro_batch_table.6=3")
    assert ("key 'train.global_batch_size': 4 samples per step cannot be split into micro-batches of 3 (at 6 latent "
            "frames") in line
    line = _refused(capsys, *common, "data.min_frames=29")  # 8 latent frames and more: none of the data
    assert "outside the run's lengths" in line and "not one step is possible" in line
    assert not (tmp_path / "run").exists()
