"""The newcomer's path, as a newcomer walks it: a fresh clone with no virtual environment, `make demo`,
then TensorBoard on what it wrote, then a rerun. Slow (it installs the stack into the clone's own
.venv and trains both stages), so it runs once per module.

The clone is of the committed HEAD: uncommitted changes in this checkout are not in it.
"""

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from gd_train.media import read_mp4
from launch import ports
from launch.ray_head import free_ports

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_LATENT_FRAMES = 12  # gd_train.demo's default


def _make_demo(clone: Path, port: int, timeout_s: int = 2400) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHONPATH"))}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if ".venv" not in p)
    env["RAY_DASHBOARD_PORT"] = str(port)
    return subprocess.run(["make", "demo"], cwd=clone, env=env, capture_output=True, text=True, timeout=timeout_s)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    if shutil.which("make") is None or shutil.which("git") is None:
        pytest.skip("needs make and git")
    clone = tmp_path_factory.mktemp("fresh") / "gd-train"
    subprocess.run(["git", "clone", "--quiet", str(REPO_ROOT), str(clone)], check=True)
    assert not (clone / ".venv").exists()
    # The demo's pinned dashboard port, used again by the rerun minutes later: held in the project's port
    # registry for the module (launch/ports.py), so that no other run of the project (the other pytest-xdist
    # worker's) takes it meanwhile, and below the ephemeral range, which the kernel hands to any connection.
    block = ports.reserve(1, purpose="tests/test_demo.py: the demo's RAY_DASHBOARD_PORT")
    try:
        proc = _make_demo(clone, block.base)
        assert proc.returncode == 0, f"make demo failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        yield {"clone": clone, "root": clone / "runs" / "demo", "log": proc.stdout, "port": block.base}
    finally:
        block.release()


def test_demo_from_a_fresh_clone_leaves_every_artefact(demo):
    root = demo["root"]
    shards = sorted((root / "data" / "shards").glob("shard-*.tar"))
    manifest = json.loads((root / "data" / "shards" / "manifest.json").read_text())
    assert shards and len(manifest["shards"]) == len(shards)
    for stage in ("stage1", "stage2"):
        latest = (root / stage / "checkpoints" / "latest").read_text().strip()
        assert (root / stage / "checkpoints" / latest).is_dir()
        assert list((root / stage / "tb").glob("events.out.tfevents.*"))
        assert (root / stage / "metrics.jsonl").read_text().strip()
    for adapter in ("etm", "sdd"):
        assert (root / "adapters" / adapter / "adapter_model.safetensors").is_file()
        assert (root / "adapters" / adapter / "adapter_config.json").is_file()
    frames = read_mp4(root / "video.mp4")  # decoded back with FFmpeg's H.264 decoder (PyAV)
    assert frames.shape[0] == 1 + 4 * (DEMO_LATENT_FRAMES - 1)
    log = demo["log"]
    for line in ("[1/5] teacher data", "[5/5] stream a video", "stopping the Ray head by PID", "--logdir"):
        assert line in log


def _get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


def test_tensorboard_serves_the_scalars_and_a_sample_video(demo):
    port = free_ports(1)[0]
    tensorboard = demo["clone"] / ".venv" / "bin" / "tensorboard"
    server = subprocess.Popen([str(tensorboard), "--logdir", str(demo["root"]), "--host", "127.0.0.1",
                               "--port", str(port), "--reload_interval", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        scalars = images = {}
        while time.monotonic() < deadline:
            try:
                scalars = json.loads(_get(f"{base}/data/plugin/scalars/tags"))
                images = json.loads(_get(f"{base}/data/plugin/images/tags"))
                if {"stage1/tb", "stage2/tb"} <= scalars.keys() and images:
                    break
            except OSError:
                pass
            time.sleep(1)
        expected = {"optimisation/lr", "optimisation/grad_norm", "throughput/samples_per_s",
                    "throughput/tokens_per_s", "throughput/step_time_s", "throughput/data_wait_fraction"}
        assert expected | {"loss/stage1_next_chunk"} <= scalars["stage1/tb"].keys(), scalars.get("stage1/tb")
        assert expected | {"loss/stage2_rl", "rl/f", "rl/t"} <= scalars["stage2/tb"].keys()
        series = json.loads(_get(f"{base}/data/plugin/scalars/scalars?run=stage1/tb&tag=loss/stage1_next_chunk"))
        assert len(series) >= 2
        videos = [(run, tag) for run, tags in images.items() for tag in tags if tag.startswith("samples/")]
        assert videos, images
        run, tag = videos[0]
        entries = json.loads(_get(f"{base}/data/plugin/images/images?run={run}&tag={tag}"))
        gif = _get(f"{base}/data/plugin/images/individualImage?{entries[0]['query']}")
        assert gif[:4] == b"GIF8"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=20)


def test_rerun_reuses_finished_steps_and_redoes_an_unfinished_one(demo):
    root = demo["root"]
    stage2_tag = (root / "stage2" / "checkpoints" / "latest").read_text()
    (root / ".done" / "5.json").unlink()  # as if the video step had been interrupted
    (root / "video.mp4").write_bytes(b"half-written")
    proc = _make_demo(demo["clone"], demo["port"], timeout_s=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("done in an earlier run, reused") == 4
    assert (root / "stage2" / "checkpoints" / "latest").read_text() == stage2_tag
    assert read_mp4(root / "video.mp4").shape[0] == 1 + 4 * (DEMO_LATENT_FRAMES - 1)
