"""`sbatch slurm/stage1.sh` for real, on a one-node SLURM cluster started on this machine
(tests/slurm/local_cluster.sh: slurm-wlm + munge from Debian). Tiny config, 2 CPU processes on the
node; SLURM's pre-emption signal (SIGUSR1 to the job's steps, what --signal=USR1@120 sends) makes the
trainer checkpoint and the script requeue the job; the requeued job resumes from `latest` and finishes.
Skipped, with the reason, only where the cluster cannot be installed or started."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from train_utils import REPO_ROOT, TINY_STAGE1, cli_env, metrics, write_tiny_shards

CLUSTER = REPO_ROOT / "tests" / "slurm" / "local_cluster.sh"
BASE = Path("/tmp/gd-train-slurm")
STEPS = 40  # 16 samples, 4 per step, 10 epochs


def _slurm_env() -> dict[str, str]:
    env = cli_env()
    env["SLURM_CONF"] = str(BASE / "etc" / "slurm.conf")
    env["SLURM_LOCAL_BASE"] = str(BASE)
    return env


@pytest.fixture(scope="module")
def cluster():
    if os.geteuid() != 0:
        pytest.skip("a local SLURM cluster needs root here (daemons run as root, munge key ownership)")
    env = _slurm_env()
    was_running = subprocess.run(["bash", str(CLUSTER), "status"], capture_output=True, text=True, env=env)
    started_here = "slurmctld: running" not in was_running.stdout
    proc = subprocess.run(["bash", str(CLUSTER), "start"], capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0:
        pytest.skip(f"SLURM could not be installed or started: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
    yield env
    if started_here:
        subprocess.run(["bash", str(CLUSTER), "stop"], capture_output=True, env=env, timeout=120)


def _job(job_id: str, env: dict[str, str]) -> dict[str, str]:
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, env=env).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def test_sbatch_stage1_is_preempted_requeued_and_finishes_from_its_checkpoint(cluster, tmp_path):
    env = dict(cluster)
    write_tiny_shards(tmp_path / "shards", 16, samples_per_shard=4)
    run_dir = tmp_path / "run"
    env.update({"RUN_DIR": str(run_dir), "CONFIG": TINY_STAGE1, "NPROC_PER_NODE": "2", "PYTHON": sys.executable})
    submit = subprocess.run(
        ["sbatch", "--parsable", "--nodes=1", "--gpus-per-node=0", "--cpus-per-task=2",
         f"--output={tmp_path}/job-%j.log", "slurm/stage1.sh",
         f"data.shards={tmp_path / 'shards'}", "train.epochs=10", "train.checkpoint_every=100"],
        capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=60)
    assert submit.returncode == 0, submit.stderr
    job_id = submit.stdout.strip().split(";")[0]
    log = tmp_path / f"job-{job_id}.log"
    try:
        deadline = time.monotonic() + 400
        while not ((run_dir / "metrics.jsonl").is_file() and len(metrics(run_dir)) >= 3):
            assert _job(job_id, env).get("JobState") in ("PENDING", "RUNNING"), log.read_text()[-4000:]
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.2)
        # What `--signal=USR1@120` does before the time limit: USR1 to every step of the job.
        subprocess.run(["scancel", "--signal=USR1", job_id], check=True, env=env, timeout=30)

        deadline = time.monotonic() + 400
        while (state := _job(job_id, env)).get("JobState") not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
            assert time.monotonic() < deadline, f"job {job_id} still {state.get('JobState')}:\n{log.read_text()[-4000:]}"
            time.sleep(1)
    finally:
        subprocess.run(["scancel", job_id], capture_output=True, env=env)

    text = log.read_text()
    assert (state["JobState"], state["Restarts"], state["ExitCode"]) == ("COMPLETED", "1", "0:0"), text[-4000:]
    preempted = re.search(r"checkpoint step-(\d+) saved, exiting", text)
    assert preempted, text[-4000:]
    stopped_at = int(preempted.group(1))
    assert "pre-empted after a complete checkpoint" in text and f"requeueing job {job_id}" in text
    assert f"job {job_id} (restart 1)" in text and f"gd-train resume {run_dir}" in text
    assert f"resuming after step {stopped_at}" in text and f"finished {STEPS} steps" in text
    assert text.index("(restart 0)") < text.index("requeueing") < text.index("(restart 1)")  # one log, appended
    assert [r["step"] for r in metrics(run_dir)] == list(range(1, STEPS + 1))
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step-{STEPS:08d}"
    assert not (run_dir / "preempted.json").exists()
    assert json.loads((run_dir / "checkpoints" / f"step-{STEPS:08d}" / "checkpoint.json").read_text())["reason"] == "final"


def test_job_scripts_parse_and_ask_for_the_paper_allocation():
    for name in ("stage1.sh", "stage2.sh"):
        script = REPO_ROOT / "slurm" / name
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
        header = script.read_text()
        for line in ("#SBATCH --nodes=8", "#SBATCH --gpus-per-node=8", "#SBATCH --signal=USR1@120",
                     "#SBATCH --requeue", "#SBATCH --open-mode=append", "#SBATCH --ntasks-per-node=1"):
            assert line in header, f"{name}: missing {line}"
