"""Bad first steps get one clear line saying what to do (the newcomer's path, issue 5): the cluster
scripts without a weights folder, a missing CSV, a Ray head already on the port, too little disk."""

import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
FAKE_ALLOCATION = {"SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "gpu-[01-08]", "SLURM_JOB_NUM_NODES": "8",
                   "SLURM_NNODES": "8", "SLURM_GPUS_ON_NODE": "8", "SLURM_SUBMIT_DIR": str(REPO_ROOT)}


def _env(extra=None, path_first=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["PYTHON"] = sys.executable
    if path_first:
        env["PATH"] = f"{path_first}{os.pathsep}{env['PATH']}"
    env.update(extra or {})
    return env


def _shims(folder: Path) -> Path:
    """`srun`, `ray` and `scontrol` that only record that they were called."""
    folder.mkdir()
    for tool in ("srun", "ray", "scontrol"):
        shim = folder / tool
        shim.write_text(f"#!/bin/sh\necho {tool} \"$@\" >> {folder}/calls\nexit 1\n")
        shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    return folder


def test_training_script_without_a_weights_folder_stops_before_any_node_starts(tmp_path):
    shims = _shims(tmp_path / "bin")
    proc = subprocess.run(["bash", "slurm/stage1.sh", "data.shards=/shared/shards"], cwd=REPO_ROOT,
                          env=_env({**FAKE_ALLOCATION, "RUN_DIR": str(tmp_path / "run")}, shims),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "gd-train: error: key 'pretrained_path': must be set for this config; add pretrained_path=" in proc.stderr
    assert not (shims / "calls").exists(), "srun ran although the config cannot"


def test_data_script_without_a_weights_folder_stops_before_any_node_starts(tmp_path):
    shims = _shims(tmp_path / "bin")
    proc = subprocess.run(["bash", "slurm/gen_teacher.sh", "prompts_csv=assets/demo_prompts.csv",
                           f"output_dir={tmp_path / 'shards'}", f"pretrained_path={tmp_path / 'no-weights'}"],
                          cwd=REPO_ROOT, env=_env(FAKE_ALLOCATION, shims), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert f"pretrained_path '{tmp_path / 'no-weights'}': no such folder; expected a Wan2.1-T2V-1.3B-Diffusers folder" \
        in proc.stderr
    calls = (shims / "calls").read_text() if (shims / "calls").exists() else ""
    assert "srun" not in calls and "ray " not in calls, calls


def _gen_teacher(*overrides):
    return subprocess.run([sys.executable, "data_pipeline/gen_teacher.py", "--config", "configs/datagen.yaml",
                           *overrides], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)


def test_missing_csv_is_one_line(tmp_path):
    proc = _gen_teacher(f"prompts_csv={tmp_path / 'nope.csv'}", f"output_dir={tmp_path / 'out'}")
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("gen_teacher: error:") and "nope.csv" in last


def test_too_little_disk_is_refused_before_any_work(tmp_path):
    proc = _gen_teacher(f"output_dir={tmp_path / 'out'}", "datagen.min_free_disk_gb=1e9")
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert "GiB free, but 36 samples need up to" in last and "datagen.min_free_disk_gb=1e+09" in last
    assert not list((tmp_path / "out").glob("shard-*"))


def test_a_ray_head_already_on_the_port_is_one_line(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "gd_train.demo", "--dir", str(tmp_path / "demo"),
                               "--dashboard-port", str(port)], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=120)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last == (f"demo: error: port {port} on 127.0.0.1 is taken (a Ray head already running?); stop that "
                    f"head, or pick another port (e.g. RAY_DASHBOARD_PORT={port + 1}), or leave it unset")
