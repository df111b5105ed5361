"""slurm/gen_teacher.sh (issue 3, "must show" 4): `bash -n`, and a dry run under a fake SLURM
allocation prints the head / worker / submit commands it would run, and runs none of them."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from datagen_utils import REPO_ROOT

SCRIPT = REPO_ROOT / "slurm" / "gen_teacher.sh"


def shim(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)


@pytest.fixture
def fake_bin(tmp_path):
    """`srun` and `ray` that only record being called (a dry run must call neither), and a fake
    `scontrol show hostnames`."""
    folder = tmp_path / "bin"
    folder.mkdir()
    calls = tmp_path / "calls.log"
    for name in ("srun", "ray", "sbatch"):
        shim(folder, name, f'echo "{name} $*" >> {calls}; exit 1\n')
    shim(folder, "scontrol", '[[ "$1 $2" == "show hostnames" ]] || exit 1\n'
                             'case "$3" in\n'
                             '  "dgx-a[07-09]") printf "dgx-a07\\ndgx-a08\\ndgx-a09\\n" ;;\n'
                             '  *"["*) exit 1 ;;\n'
                             '  *) echo "$3" ;;\n'
                             'esac\n')
    return folder, calls


def run_script(args, env_extra, path_dirs, cwd=REPO_ROOT):
    env = {"PATH": os.pathsep.join([*map(str, path_dirs), "/usr/bin", "/bin"]), "HOME": os.environ.get("HOME", "/tmp"),
           "PYTHON": sys.executable, **env_extra}
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=60)


def printed(stdout: str) -> dict[str, list[str]]:
    """The dry run's `label: command` lines, commands split as the shell would."""
    out = {}
    for line in stdout.splitlines():
        label, _, command = line.partition(": ")
        if label in ("head", "workers", "submit", "head address"):
            out[label] = shlex.split(command)
    return out


SLURM_ENV = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "dgx-a[07-09]", "SLURM_GPUS_ON_NODE": "8",
             "SLURM_CPUS_ON_NODE": "112", "SLURM_SUBMIT_DIR": str(REPO_ROOT)}


def test_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0


@pytest.mark.parametrize("with_scontrol", [True, False])
def test_dry_run_prints_head_worker_and_submit_commands(fake_bin, tmp_path, with_scontrol):
    folder, calls = fake_bin
    if not with_scontrol:  # an unusable scontrol (absent, or no SLURM config): launch/rendezvous.py expands
        shim(folder, "scontrol", 'echo "scontrol: error: fetch_config: DNS SRV lookup failed" >&2; exit 1\n')
    result = run_script(["--dry-run", "prompts_csv=/data/OpenVidHD.csv", "output_dir=/shared/teacher shards"],
                        SLURM_ENV, [folder])
    assert result.returncode == 0, result.stderr
    assert not calls.exists(), calls.read_text()  # nothing was started
    commands = printed(result.stdout)

    head = commands["head"]
    assert head[:head.index("ray")] == ["srun", "--nodes=1", "--ntasks=1", "-w", "dgx-a07", "--cpus-per-task=112",
                                        "--gpus-per-task=8"]
    ray_head = head[head.index("ray"):]
    assert ray_head[:4] == ["ray", "start", "--head", "--block"]
    assert {"--port=6379", "--num-gpus=8", "--num-cpus=112", "--dashboard-host=127.0.0.1",
            "--dashboard-port=8265"} <= set(ray_head)

    workers = commands["workers"]
    assert workers[:5] == ["srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--exclude=dgx-a07"]
    assert workers[workers.index("ray"):][:3] == ["ray", "start", "--block"]
    assert "--address=dgx-a07:6379" in workers

    submit = commands["submit"]
    assert submit[:6] == ["ray", "job", "submit", "--address", "http://127.0.0.1:8265", "--working-dir"]
    entry = submit[submit.index("--") + 1:]
    assert entry == [sys.executable, "data_pipeline/gen_teacher.py", "--config", "configs/datagen-wan1.3b.yaml",
                     "datagen.num_workers=0", "datagen.num_gpus_per_worker=1",
                     "prompts_csv=/data/OpenVidHD.csv", "output_dir=/shared/teacher shards"]
    assert commands["head address"] == ["srun", "--nodes=1", "--ntasks=1", "-w", "dgx-a07", "hostname", "--ip-address"]
    assert "teardown:" in result.stdout and "3 node(s): head dgx-a07, workers: dgx-a08 dgx-a09" in result.stderr


def test_dry_run_by_environment_on_one_cpu_node(fake_bin):
    folder, calls = fake_bin
    env = {"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "cpu001", "SLURM_CPUS_ON_NODE": "4",
           "GEN_TEACHER_DRY_RUN": "1", "RAY_HEAD_PORT": "7000", "RAY_DASHBOARD_PORT": "9000",
           "GEN_TEACHER_CONFIG": "configs/my_datagen.yaml"}
    result = run_script(["output_dir=/scratch/out"], env, [folder])
    assert result.returncode == 0, result.stderr
    commands = printed(result.stdout)
    assert "workers" not in commands  # a one-node allocation is the head alone
    assert "--gpus-per-task" not in " ".join(commands["head"]) and "--port=7000" in commands["head"]
    entry = commands["submit"][commands["submit"].index("--") + 1:]
    assert entry[1:] == ["data_pipeline/gen_teacher.py", "--config", "configs/my_datagen.yaml", "output_dir=/scratch/out"]
    assert commands["submit"][4] == "http://127.0.0.1:9000"
    assert not calls.exists()


def test_outside_an_allocation_or_on_an_unreadable_one_it_fails_in_one_line(fake_bin):
    folder, calls = fake_bin
    result = run_script(["--dry-run"], {}, [folder])
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "SLURM_JOB_NODELIST is not set" in result.stderr
    result = run_script(["--dry-run"], {"SLURM_JOB_NODELIST": "gpu[01-0x]"}, [folder])
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0
    assert "cannot expand SLURM_JOB_NODELIST='gpu[01-0x]'" in result.stderr
    assert not calls.exists()
