"""`gd-generate --vbench-dir` writes names VBench finds, checked against VBench's matching rule.

vbench 0.1.5 does not import here (its `vbench/utils.py` imports decord and torchvision; PyPI's
torchvision does not import on this torch), so the two rules are restated below from its source
(`VBench.build_full_info_json` and `get_prompt_from_filename`, tag v0.1.5; see STACK_NOTES):
- standard mode lists the videos folder once (flat), takes the suffix of the first file listed, and
  for each prompt of `VBench_full_info.json` looks for exactly `f"{prompt}-{i}{suffix}"`, i in 0..4;
  no truncation or sanitising, a missing name is only a warning;
- custom_input mode with `--prompt_file` reads a JSON map {file name: prompt} relative to the videos
  folder; every video file (.mp4/.gif/.jpg/.png) must have an entry, and that entry is its prompt.
The prompts are VBench's own: its longest (210 bytes) and its only non-ASCII one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

VBENCH_LONGEST = ("Snow rocky mountains peaks canyon. snow blanketed rocky mountains surround and shadow deep "
                  "canyons. the canyons twist and bend through the high elevated mountain peaks, featuring a "
                  "steady and smooth perspective")
VBENCH_NON_ASCII = ("A tranquil tableau of at the edge of the Arabian Desert, the ancient city of Petra beckoned "
                    "with its enigmatic rock-carved façades")
VIDEO_SUFFIXES = {".mp4", ".gif", ".jpg", ".png"}


def vbench_standard_videos(videos_dir: Path, prompt: str) -> list[str]:
    """The file names VBench's standard mode scores for one prompt (up to 5 samples)."""
    listed = os.listdir(videos_dir)
    suffix = Path(listed[0]).suffix
    return [name for name in (f"{prompt}-{i}{suffix}" for i in range(5)) if name in listed]


def vbench_custom_input(videos_dir: Path, prompt_map: Path) -> dict[str, str]:
    """Video path -> the prompt VBench's custom_input mode scores it against; fails as VBench does
    (an assertion / KeyError) when a video has no entry in the map."""
    by_path = {os.path.abspath(videos_dir / name): prompt for name, prompt in json.loads(prompt_map.read_text()).items()}
    videos = [os.path.abspath(videos_dir / name) for name in os.listdir(videos_dir)
              if Path(name).suffix.lower() in VIDEO_SUFFIXES]
    assert set(videos) <= set(by_path), sorted(set(videos) - set(by_path))
    return {path: by_path[path] for path in videos}


def generate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gd_train.generate", "--latent-frames", "1", *args],
                          capture_output=True, text=True, timeout=300)


def test_vbench_standard_mode_finds_its_longest_and_its_non_ascii_prompt(tmp_path):
    assert len(VBENCH_LONGEST.encode()) == 210 and len(VBENCH_LONGEST) > 180
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{VBENCH_LONGEST}\n{VBENCH_NON_ASCII}\n", encoding="utf-8")
    videos = tmp_path / "videos"
    proc = generate("--prompt-file", str(prompts), "--vbench-dir", str(videos), "--samples-per-prompt", "2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    for prompt in (VBENCH_LONGEST, VBENCH_NON_ASCII):
        assert vbench_standard_videos(videos, prompt) == [f"{prompt}-0.mp4", f"{prompt}-1.mp4"]
    assert sorted(p.suffix for p in videos.iterdir()) == [".mp4"] * 4  # VBench takes the suffix of the first file


def test_names_the_file_system_cannot_hold_are_refused_or_mapped_for_custom_input(tmp_path):
    from gd_train.vbench import name_max

    limit = name_max(tmp_path)
    too_long = "é" * ((limit - 6) // 2 + 1)  # fewer characters than the limit, more bytes
    assert len(too_long) + 6 <= limit < len(too_long.encode()) + 6
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"a short prompt\n\n{too_long}\nan AC/DC concert\n", encoding="utf-8")
    videos = tmp_path / "videos"

    proc = generate("--prompt-file", str(prompts), "--vbench-dir", str(videos))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert f"line 3 gives a {len(too_long.encode()) + 6}-byte file name" in proc.stderr
    assert "--vbench-mode custom_input" in proc.stderr and not list(videos.iterdir())

    proc = generate("--prompt-file", str(prompts), "--vbench-dir", str(videos), "--vbench-mode", "custom_input",
                    "--samples-per-prompt", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--mode custom_input --prompt_file" in proc.stdout
    scored = vbench_custom_input(videos, videos / "vbench_prompts.json")
    assert sorted(scored.values()) == sorted(["a short prompt", too_long, "an AC/DC concert"])
    assert os.path.abspath(videos / "a short prompt-0.mp4") in scored  # names that fit stay standard
