"""README's "Public interface" and "Python API" sections, run exactly as written: every import, the
gd-generate command (in a scratch folder holding the repo's configs/ and assets/), the Python example
(the tiny model, nothing downloaded), whose mp4 is written by diffusers' own `export_to_video`."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

from gd_train.media import read_mp4

REPO = Path(__file__).resolve().parent.parent


def _section(title: str) -> str:
    text = (REPO / "README.md").read_text()
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else None]


def _blocks(section: str, lang: str) -> list[str]:
    """Fenced code blocks opened by ```lang (``` alone for lang="")."""
    blocks, current = [], None
    for line in section.splitlines():
        if line.startswith("```"):
            if current is None:
                current = [] if line[3:].strip() == lang else False
            else:
                if current is not False:
                    blocks.append("\n".join(current) + "\n")
                current = None
        elif isinstance(current, list):
            current.append(line)
    return blocks


def _scratch(tmp_path: Path) -> Path:
    for name in ("configs", "assets"):
        (tmp_path / name).symlink_to(REPO / name)
    return tmp_path


def test_public_interface_imports_and_command_as_written(tmp_path):
    section = _section("Public interface")
    (imports,) = _blocks(section, "python")
    exec(compile(imports, "README.md#public-interface", "exec"), {})
    for name in re.findall(r"`(gd_train(?:\.\w+)+)`", section):  # dotted names in the prose resolve too
        module, _, attr = name.rpartition(".")
        __import__(module)
        assert hasattr(sys.modules[module], attr) or f"{module}.{attr}" in sys.modules, name

    (commands,) = _blocks(section, "")
    cwd = _scratch(tmp_path)
    bin_dir = Path(sys.executable).parent
    for line in commands.strip().splitlines():
        argv = shlex.split(line)
        assert argv[0] == "gd-generate"
        proc = subprocess.run([str(bin_dir / argv[0]), *argv[1:]], cwd=cwd, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    latents = load_file(str(cwd / "runs/readme/clip.safetensors"))["latents"]
    assert latents.shape == (1, 16, 4, 8, 12)
    assert read_mp4(cwd / "runs/readme/clip.mp4").shape == (13, 64, 96, 3)


def test_python_api_example_as_written(tmp_path, monkeypatch):
    (example,) = _blocks(_section("Python API"), "python")
    assert len(example.strip().splitlines()) <= 12
    monkeypatch.chdir(_scratch(tmp_path))
    scope: dict = {}
    exec(compile(example, "README.md#python-api", "exec"), scope)
    assert scope["video"].shape == (13, 64, 96, 3) and scope["i"] == 19
    assert read_mp4(tmp_path / "fox.mp4").shape == (13, 64, 96, 3)  # export_to_video wrote a playable file
