"""`gd-generate --vbench-dir` writes names VBench finds, checked against VBench's own matching rule.

vbench 0.1.5 does not import here (its `vbench/utils.py` imports decord and torchvision; PyPI's
torchvision does not import on this torch), so the two rules below are its code, copied from
`vbench/__init__.py` (`VBench.build_full_info_json`, tag v0.1.5) and `vbench/utils.py`
(`get_prompt_from_filename`), minus the logging. The prompts are VBench's own: its longest (210 bytes)
and its only non-ASCII one, from `vbench/VBench_full_info.json`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from itertools import chain
from pathlib import Path

VBENCH_LONGEST = ("Snow rocky mountains peaks canyon. snow blanketed rocky mountains surround and shadow deep "
                  "canyons. the canyons twist and bend through the high elevated mountain peaks, featuring a "
                  "steady and smooth perspective")
VBENCH_NON_ASCII = ("A tranquil tableau of at the edge of the Arabian Desert, the ancient city of Petra beckoned "
                    "with its enigmatic rock-carved façades")


def vbench_standard_videos(videos_path: str, prompt: str, special_str: str = "") -> list[str]:
    """vbench 0.1.5, standard mode: the videos of one prompt of `VBench_full_info.json`."""
    video_names = os.listdir(videos_path)
    postfix = Path(video_names[0]).suffix
    found = []
    for i in range(5):  # video index for the same prompt
        intended_video_name = f'{prompt}{special_str}-{str(i)}{postfix}'
        if intended_video_name in video_names:
            found.append(os.path.join(videos_path, intended_video_name))
    return found


def get_prompt_from_filename(path: str):
    prompt = Path(path).stem
    number_ending = r'-\d+$'
    if re.search(number_ending, prompt):
        return re.sub(number_ending, '', prompt)
    return prompt


def vbench_custom_input(videos_path: str, prompt_file: str) -> dict[str, str]:
    """vbench 0.1.5, `--mode custom_input --prompt_file`: video path -> the prompt it is scored against."""
    with open(prompt_file, 'r') as f:
        prompt_list = json.load(f)
    assert type(prompt_list) == dict
    cur_full_info_list = []
    for filename in os.listdir(videos_path):
        postfix = Path(os.path.join(videos_path, filename)).suffix
        if postfix.lower() not in ['.mp4', '.gif', '.jpg', '.png']:
            continue
        cur_full_info_list.append({"prompt_en": get_prompt_from_filename(filename),
                                   "video_list": [os.path.join(videos_path, filename)]})
    prompt_list = {os.path.join(videos_path, path): prompt_list[path] for path in prompt_list}
    assert len(prompt_list) >= len(cur_full_info_list)
    all_video_path = [os.path.abspath(file) for file in list(chain.from_iterable(vid["video_list"] for vid in cur_full_info_list))]
    assert len(set(all_video_path) - set([os.path.abspath(path_key) for path_key in prompt_list])) == 0
    video_map = {os.path.abspath(k): v for k, v in prompt_list.items()}
    for video_info in cur_full_info_list:
        video_info["prompt_en"] = video_map[os.path.abspath(video_info["video_list"][0])]
    return {v["video_list"][0]: v["prompt_en"] for v in cur_full_info_list}


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
        assert [Path(p).name for p in vbench_standard_videos(str(videos), prompt)] == [f"{prompt}-0.mp4", f"{prompt}-1.mp4"]
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
    scored = vbench_custom_input(str(videos), str(videos / "vbench_prompts.json"))
    assert sorted(scored.values()) == sorted(["a short prompt", too_long, "an AC/DC concert"])
    assert os.path.join(str(videos), "a short prompt-0.mp4") in scored  # names that fit stay standard
