"""slurm/gen_teacher.sh (issue 3, "must show" 4): `bash -n`, and a dry run under a fake SLURM
allocation prints the head / worker / submit commands it would run, and runs none of them. The real
`sbatch --nodes=2` run on the local two-node SLURM cluster (tests/slurm/local_cluster.sh with
SLURM_LOCAL_NODES=2): the Ray head on node1, a worker on node2, the job's shards written on both."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import webdataset as wds

from datagen_utils import REPO_ROOT, write_prompts_csv
from gd_train.data.shards import decode_sample

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
    python = head.index(sys.executable)
    assert head[:python] == ["srun", "--nodes=1", "--ntasks=1", "-w", "dgx-a07", "--cpus-per-task=112",
                             "--gpus-per-task=8", f"--chdir={REPO_ROOT}"]
    ports_file = f"--ports-file={REPO_ROOT}/slurm/logs/gen_teacher-4242.ray.json"
    # Every port from a block of launch/ports.py on the node (none pinned): the head writes them to the file.
    assert head[python + 1:] == ["-m", "launch.ray_start", "head", "--node-ip-address=dgx-a07", "--num-cpus=112",
                                 "--num-gpus=8", ports_file]
    assert "read from " + ports_file.split("=", 1)[1] in result.stdout

    workers = commands["workers"]
    assert workers[:5] == ["srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--exclude=dgx-a07"]
    assert workers[workers.index(sys.executable) + 1:] == ["-m", "launch.ray_start", "node",
                                                          "--address=dgx-a07:GCS_PORT", "--num-cpus=112", "--num-gpus=8"]

    submit = commands["submit"]
    assert submit[:6] == ["ray", "job", "submit", "--address", "http://127.0.0.1:DASHBOARD_PORT", "--working-dir"]
    entry = submit[submit.index("--") + 1:]
    assert entry == [sys.executable, "data_pipeline/gen_teacher.py", "--config", "configs/datagen-wan1.3b.yaml",
                     "datagen.num_workers=0", "datagen.num_gpus_per_worker=1",
                     "prompts_csv=/data/OpenVidHD.csv", "output_dir=/shared/teacher shards"]
    assert commands["head address"] == ["srun", "--nodes=1", "--ntasks=1", "-w", "dgx-a07", "hostname", "--ip-address"]
    assert "teardown: scancel --signal=TERM 4242" in result.stdout
    assert "3 node(s): head dgx-a07, workers: dgx-a08 dgx-a09" in result.stderr


def test_dry_run_by_environment_on_one_cpu_node(fake_bin):
    folder, calls = fake_bin
    env = {"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "cpu001", "SLURM_CPUS_ON_NODE": "4",
           "GEN_TEACHER_DRY_RUN": "1", "RAY_HEAD_PORT": "7000", "RAY_DASHBOARD_PORT": "9000",
           "GEN_TEACHER_CONFIG": "configs/my_datagen.yaml"}
    result = run_script(["output_dir=/scratch/out"], env, [folder])
    assert result.returncode == 0, result.stderr
    commands = printed(result.stdout)
    assert "workers" not in commands  # a one-node allocation is the head alone
    assert "--gpus-per-task" not in " ".join(commands["head"])
    assert {"--port=7000", "--dashboard-port=9000"} <= set(commands["head"])  # pinned: outside the block
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


# --------------------------------------------------------------------------------------------------
# For real: sbatch --nodes=2 on the local two-node SLURM cluster
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster():
    from slurm_utils import cluster_for_module

    yield from cluster_for_module(nodes=2)


def _job_processes(job_id: str) -> list[int]:
    """Processes of the job still alive on this machine: Ray's own inherit SLURM_JOB_ID from their srun task,
    and sit in sessions of their own, where SLURM's process-group tracking does not reach them."""
    from ray_utils import running
    from slurm_utils import process_environ

    return [int(e.name) for e in Path("/proc").iterdir()
            if e.name.isdigit() and process_environ(int(e.name)).get("SLURM_JOB_ID") == job_id and running(int(e.name))]


@pytest.mark.slow
def test_sbatch_on_two_nodes_runs_the_head_on_the_first_a_worker_on_the_second_and_shards_land_on_both(cluster,
                                                                                                      tmp_path):
    from launch.ray_head import ray_env
    from ray_utils import Paused, attempts_seen
    from slurm_utils import FINISHED, job, process_environ, sbatch, wait_until

    csv, out = tmp_path / "prompts.csv", tmp_path / "shards"
    expected, _ = write_prompts_csv(csv, valid=9)
    env = {**cluster, "PATH": ray_env()["PATH"], "RAY_AUTH_MODE": "disabled", "PYTHON": sys.executable,
           "GEN_TEACHER_CONFIG": "configs/datagen.yaml", "GEN_TEACHER_STATE_DIR": str(tmp_path),
           "GEN_TEACHER_NODE_TIMEOUT_S": "240"}
    started = time.monotonic()
    timeline: dict[str, float] = {}
    job_id = sbatch(["--nodes=2", f"--output={tmp_path}/job-%j.log", "slurm/gen_teacher.sh", f"prompts_csv={csv}",
                     f"output_dir={out}", "datagen.samples_per_shard=3", "datagen.num_workers=2",
                     "datagen.num_inference_steps=8"], env)
    log, ports_file = tmp_path / f"job-{job_id}.log", tmp_path / f"gen_teacher-{job_id}.ray.json"
    seen: dict[tuple[str, int], int] = {}
    nodes: dict[int, str] = {}
    deadline = time.monotonic() + 400
    try:
        # Until actors of both nodes have started a shard, the one that got ahead is paused mid-shard
        # (tests/ray_utils.py: else the first actor up may write all three).
        with Paused() as paused:
            while (state := job(job_id, cluster).get("JobState")) not in FINISHED:
                assert time.monotonic() < deadline, log.read_text()[-4000:] if log.is_file() else "no log"
                if ports_file.is_file():
                    timeline.setdefault("head up", time.monotonic() - started)
                attempts_seen(out, seen)
                for pid in seen.values():
                    if pid not in nodes:
                        nodes[pid] = process_environ(pid).get("SLURMD_NODENAME", "?")
                        timeline.setdefault(f"first shard on {nodes[pid]}", time.monotonic() - started)
                if len(set(nodes.values())) == 1:
                    for pid in nodes:
                        paused.pause(pid)
                else:
                    paused.resume_all()
                time.sleep(0.05)
        timeline["job ended"] = time.monotonic() - started
    finally:
        subprocess.run(["scancel", job_id], env=cluster, capture_output=True, timeout=30)
    print("\nsbatch --nodes=2 slurm/gen_teacher.sh, seconds from sbatch: "
          + ", ".join(f"{k} {v:.1f}" for k, v in sorted(timeline.items(), key=lambda kv: kv[1])))
    text = log.read_text()
    assert state == "COMPLETED", text[-4000:]
    assert "Ray head on node1" in text and "ray_start: head up" in text and "ray_start: node up" in text, text[-4000:]
    assert "all 2 node(s) alive" in text
    # Torn down by SIGTERM to the steps' tasks: both Rays killed by their launch.ray_start, temp dirs gone.
    assert "ray_start: head: SIGTERM: stopping" in text and "ray_start: node: SIGTERM: stopping" in text, text[-3000:]
    temp_dirs = re.findall(r"ray_start: \w+ up on ports .*, temp dir (\S+)", text)
    assert len(temp_dirs) == 2 and not any(Path(d).exists() for d in temp_dirs), temp_dirs
    # Shards written by actors on both nodes (SLURM's node name in each writer's environment; the report's
    # Ray node ids agree), each prompt exactly once; nothing left over, no Ray process outlives the job.
    assert sorted(set(nodes.values())) == ["node1", "node2"], (nodes, seen)
    report = json.loads((out / "gen_teacher_report.json").read_text())
    assert report["status"] == "complete" and report["failed_attempts"] == []
    assert len({w["node"] for w in report["written_shards"]}) == 2, report["written_shards"]
    tars = wds.tarfile_samples([{"url": str(p)} for p in sorted(out.glob("shard-*.tar"))])
    counts = Counter(decode_sample(raw).key for raw in tars)
    assert set(counts) == set(expected) and set(counts.values()) == {1}
    assert not ports_file.exists() and not list(out.glob("*.partial"))
    wait_until(lambda: not _job_processes(job_id), 30, lambda: f"left behind: {_job_processes(job_id)}", poll_s=0.5)
