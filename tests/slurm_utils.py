"""Helpers of the tests (and the benchmark) that run the project's job scripts on a real SLURM cluster
started on this machine by tests/slurm/local_cluster.sh: one node, or several `slurmd -N nodeK` on it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable, Optional

from train_utils import REPO_ROOT, cli_env

CLUSTER = REPO_ROOT / "tests" / "slurm" / "local_cluster.sh"
FINISHED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


def cluster_base(nodes: int) -> Path:
    return Path("/tmp/gd-train-slurm" if nodes == 1 else f"/tmp/gd-train-slurm-{nodes}")


def slurm_env(nodes: int = 1) -> dict[str, str]:
    base = cluster_base(nodes)
    env = cli_env()
    env.update({"SLURM_CONF": str(base / "etc" / "slurm.conf"), "SLURM_LOCAL_BASE": str(base),
                "SLURM_LOCAL_NODES": str(nodes)})
    return env


class ClusterUnavailable(RuntimeError):
    """Why the cluster cannot be had here (the tests skip with it)."""


def start_cluster(nodes: int = 1) -> tuple[dict[str, str], bool]:
    """(the clients' environment, whether this call started the cluster — then the caller stops it)."""
    if os.geteuid() != 0:
        raise ClusterUnavailable("a local SLURM cluster needs root here (daemons run as root, munge key ownership)")
    env = slurm_env(nodes)
    was_running = subprocess.run(["bash", str(CLUSTER), "status"], capture_output=True, text=True, env=env)
    started_here = "slurmctld: running" not in was_running.stdout
    proc = subprocess.run(["bash", str(CLUSTER), "start"], capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0:
        raise ClusterUnavailable(f"SLURM could not be installed or started: "
                                 f"{(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
    return env, started_here


def stop_cluster(env: dict[str, str]) -> None:
    subprocess.run(["bash", str(CLUSTER), "stop"], capture_output=True, env=env, timeout=180)


LOCK_WAIT_S = 1800


def cluster_for_module(nodes: int):
    """The body of a module-scoped `cluster` fixture: the local cluster's client environment (the test
    skips where no cluster can start), stopped afterwards if this call started it.

    One module at a time uses a cluster on this machine (`<base>.lock`, held for the module): the one
    that started it stops it, cancelling every job on it, and a job of these tests takes every node. So
    tests/test_slurm_two_nodes.py and tests/test_slurm_gen_teacher.py on two pytest-xdist workers, or in
    two test runs, take turns instead of stopping the cluster under each other."""
    import fcntl

    import pytest

    lock_path = f"{cluster_base(nodes)}.lock"
    lock = os.open(lock_path, os.O_RDONLY | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    pytest.fail(f"the local {nodes}-node SLURM cluster is still in use by another test after "
                                f"{LOCK_WAIT_S} s ({lock_path})")
                time.sleep(1)
        try:
            env, started_here = start_cluster(nodes=nodes)
        except ClusterUnavailable as exc:
            pytest.skip(str(exc))
        yield env
        if started_here:
            stop_cluster(env)
    finally:
        os.close(lock)  # releases it


def job(job_id: str, env: dict[str, str]) -> dict[str, str]:
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, env=env).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def sbatch(args: list[str], env: dict[str, str]) -> str:
    proc = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True, cwd=REPO_ROOT, env=env,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def wait_until(predicate: Callable[[], object], timeout: float, what: Callable[[], str], poll_s: float = 0.1):
    """predicate's first truthy value; fails with what() after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting: {what()}"
        time.sleep(poll_s)


def process_environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def job_processes(job_id: str, node_id: int, module: str) -> list[int]:
    """PIDs of `python -m MODULE` running in job JOB_ID's step tasks on node SLURM_NODEID=node_id (not the
    batch script's own dry run)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        cmd = _cmdline(pid)
        if module not in cmd or "--dry-run" in cmd:
            continue
        env = process_environ(pid)
        if env.get("SLURM_JOB_ID") == job_id and env.get("SLURM_NODEID") == str(node_id) \
                and env.get("SLURM_STEP_ID", "batch") not in ("batch", "extern"):
            pids.append(pid)
    return sorted(pids)


def launcher_pid(job_id: str, node_id: int) -> Optional[int]:
    """The `gd-train` launcher task of a node (it leads its process group: slurmstepd made it so)."""
    pids = [p for p in job_processes(job_id, node_id, "gd_train.cli") if os.getpgid(p) == p]
    return pids[0] if pids else None


def kill_process_group(pid: int, sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(os.getpgid(pid), sig)
    except ProcessLookupError:
        pass
