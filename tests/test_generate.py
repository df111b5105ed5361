"""`gd-generate` as a user runs it: files, shapes, cache == no cache, mp4 decoded back, clear errors."""

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from gd_train.media import read_mp4

GEN = [sys.executable, "-m", "gd_train.generate"]


def run(*args, check=True):
    proc = subprocess.run(GEN + list(args), capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"gd-generate failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def test_generate_writes_latents_and_a_playable_mp4(tmp_path):
    out, mp4 = tmp_path / "a.safetensors", tmp_path / "a.mp4"
    proc = run("--config", "configs/model/tiny.yaml", "--latent-frames", "5", "--seed", "3",
               "--out", str(out), "--mp4", str(mp4), "--prompt", "a cat on a skateboard")
    latents = load_file(str(out))["latents"]
    assert latents.shape == (1, 16, 5, 8, 12)
    assert torch.isfinite(latents).all()
    frames = read_mp4(mp4)
    assert frames.shape == (1 + 4 * (5 - 1), 64, 96, 3)  # the Wan VAE: 4 video frames per latent frame
    assert "video frames/s" in proc.stdout


def test_no_kv_cache_gives_the_same_latents(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    run("--latent-frames", "4", "--seed", "7", "--out", str(a))
    run("--latent-frames", "4", "--seed", "7", "--out", str(b), "--no-kv-cache")
    torch.testing.assert_close(load_file(str(a))["latents"], load_file(str(b))["latents"], rtol=1e-5, atol=1e-5)


def test_prompt_embeds_file_and_adapters_folder(tmp_path):
    from gd_train.config import load_config
    from gd_train.model.student import GreedyDistillStudent

    from conftest import randomize_trainable

    student = GreedyDistillStudent.from_config(load_config("configs/model/tiny.yaml"))
    randomize_trainable(student)
    student.save_adapters(tmp_path / "adapters")
    save_file({"prompt_embeds": torch.randn(9, 32)}, str(tmp_path / "p.safetensors"))
    base, tuned = tmp_path / "base.safetensors", tmp_path / "tuned.safetensors"
    common = ["--latent-frames", "3", "--seed", "1", "--prompt-embeds", str(tmp_path / "p.safetensors")]
    run(*common, "--out", str(base))
    run(*common, "--out", str(tuned), "--adapters", str(tmp_path / "adapters"))
    assert not torch.allclose(load_file(str(base))["latents"], load_file(str(tuned))["latents"])


@pytest.mark.parametrize("args, message", [
    (["--latent-frames", "0"], "--latent-frames: expected >= 1"),
    (["student.etm_windw=2"], "unknown key 'student.etm_windw' (did you mean 'student.etm_window'?)"),
    (["--adapters", "/nonexistent/adapters"], "adapters folder /nonexistent/adapters: missing etm/"),
    (["pretrained_path=/nonexistent/wan"], "pretrained_path '/nonexistent/wan': no such folder"),
])
def test_bad_input_is_one_clear_line(tmp_path, args, message):
    proc = run("--out", str(tmp_path / "x.safetensors"), *args, check=False)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert message in last and last.startswith("gd-generate: error:")


def test_prompt_list_is_rendered_with_vbench_file_names(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a dog surfing a wave\n\nA 3D model of a 1800s victorian house.\n")
    out = tmp_path / "videos"
    proc = run("--prompt-file", str(prompts), "--vbench-dir", str(out), "--samples-per-prompt", "2",
               "--latent-frames", "2")
    names = sorted(p.name for p in out.iterdir())
    assert names == ["A 3D model of a 1800s victorian house.-0.mp4", "A 3D model of a 1800s victorian house.-1.mp4",
                     "a dog surfing a wave-0.mp4", "a dog surfing a wave-1.mp4"]
    assert read_mp4(out / names[0]).shape[0] == 5
    assert "wrote 4 videos" in proc.stdout
    again = run("--prompt-file", str(prompts), "--vbench-dir", str(out), "--samples-per-prompt", "2",
                "--latent-frames", "2")
    assert "wrote 0 videos" in again.stdout and "(4 already there)" in again.stdout


def test_prompt_list_with_a_slash_names_the_line(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("fine prompt\nan AC/DC concert\n")
    proc = run("--prompt-file", str(prompts), "--vbench-dir", str(tmp_path / "v"), check=False)
    assert proc.returncode == 2 and "line 2 holds '/'" in proc.stderr
