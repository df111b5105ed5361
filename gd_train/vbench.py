"""Video file names VBench finds (vbench 0.1.5, read from its `vbench/__init__.py`, `build_full_info_json`).

Standard mode (`--mode vbench_standard`, the 946-entry `VBench_full_info.json`) looks, for i in 0..4,
for exactly `f"{prompt}-{i}{postfix}"` in `os.listdir(videos_path)` — the whole prompt, no truncation,
no sanitising; `postfix` is the suffix of the *first* file listed, so the folder must hold only the
videos. A missing file is only a warning, and the prompt's score silently leaves it out. VBench's
longest prompt is 210 bytes, so all of its names fit the usual 255-byte limit.

A custom prompt list can hold prompts no file name can carry (longer than the file system's NAME_MAX —
bytes, not characters — or with '/'). For those, VBench's `--mode custom_input --prompt_file MAP.json`
reads the prompt of each video from a JSON map `{video file name: prompt}` (keys are joined to
`--videos_path`; every video in the folder needs an entry), which `--vbench-mode custom_input` writes
as `<dir>/vbench_prompts.json`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

STANDARD, CUSTOM = "standard", "custom_input"
PROMPT_MAP = "vbench_prompts.json"
VIDEO_SUFFIX = ".mp4"


@dataclass(frozen=True)
class Prompt:
    line: int  # 1-based line number in the prompt file
    text: str


def read_prompt_file(path: str) -> list[Prompt]:
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--prompt-file {path}: not found (expected a text file, one prompt per line)")
    prompts = [Prompt(number, line.strip())
               for number, line in enumerate(file.read_text(encoding="utf-8", errors="replace").splitlines(), start=1)
               if line.strip()]
    if not prompts:
        raise ValueError(f"--prompt-file {path}: no prompts (expected one per line)")
    return prompts


def name_max(folder: Path) -> int:
    """The longest file name `folder`'s file system takes, in bytes (POSIX NAME_MAX; 255 if unknown)."""
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):
        return 255


def standard_name(prompt: str, index: int) -> str:
    return f"{prompt}-{index}{VIDEO_SUFFIX}"


def _fits(name: str, limit: int) -> bool:
    return "/" not in name and "\0" not in name and len(os.fsencode(name)) <= limit


def _short_name(prompt: str, index: int, limit: int) -> str:
    """Prompt cut to fit (on a character boundary), plus a digest of the whole prompt: unique per prompt."""
    tag = "~" + hashlib.sha256(prompt.encode()).hexdigest()[:10]
    tail = f"{tag}-{index}{VIDEO_SUFFIX}"
    head = prompt.replace("/", "_").replace("\0", "_")
    budget = limit - len(os.fsencode(tail))
    while len(os.fsencode(head)) > budget:
        head = head[:-1]
    return head + tail


class Naming:
    """File names for K samples of every prompt in `folder` under one VBench mode. Standard mode refuses
    (one line, naming the prompt's line) a name that cannot exist; custom_input mode gives such prompts a
    short name and records every video's prompt in the map."""

    def __init__(self, folder: Path, mode: str, prompts: list[Prompt], samples: int, prompt_file: str):
        if mode not in (STANDARD, CUSTOM):
            raise ValueError(f"--vbench-mode {mode}: expected {STANDARD} or {CUSTOM}")
        self.folder, self.mode, self.samples = folder, mode, samples
        self.limit = name_max(folder)
        self.names: dict[tuple[int, int], str] = {}
        for i, p in enumerate(prompts):
            for k in range(samples):
                name = standard_name(p.text, k)
                if not _fits(name, self.limit):
                    if mode == STANDARD:
                        why = ("holds '/'" if "/" in p.text else
                               f"gives a {len(os.fsencode(name))}-byte file name '{name[:40]}…', longer than the "
                               f"{self.limit} bytes a file name may have in {folder}")
                        raise ValueError(f"--prompt-file {prompt_file}: line {p.line} {why}; VBench's standard mode "
                                         f"cannot find such a video (use --vbench-mode {CUSTOM} for a custom list)")
                    name = _short_name(p.text, k, self.limit)
                self.names[i, k] = name
        self.prompts = prompts

    def path(self, i: int, k: int) -> Path:
        return self.folder / self.names[i, k]

    def write_prompt_map(self) -> Path | None:
        """custom_input mode: `{file name: prompt}` for every video of the list (written whole each time)."""
        if self.mode != CUSTOM:
            return None
        mapping = {name: self.prompts[i].text for (i, _), name in sorted(self.names.items())}
        path = self.folder / PROMPT_MAP
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(mapping, indent=1, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, path)
        return path

    def evaluate_hint(self) -> str:
        if self.mode == STANDARD:
            return f"vbench evaluate --videos_path {self.folder} --dimension ..."
        return (f"vbench evaluate --videos_path {self.folder} --mode custom_input "
                f"--prompt_file {self.folder / PROMPT_MAP} --dimension ...")
