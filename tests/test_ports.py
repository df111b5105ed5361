"""Two runs side by side on one machine never clash (issue 10, item 5): two real Ray heads at once, each
running a `ray job submit` job, every port they open (read with `ss -ltnp`) inside their own reserved
block; and two local 2-rank torchrun launches at once, each on its own rendezvous port."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from launch import ports
from launch.ray_head import PORTS_PER_HEAD, LocalRayHead, RayHeadError, ray_env, session_tree

REPO_ROOT = Path(__file__).resolve().parent.parent
JOB = ["python", "-c", "import ray, time; ray.init(); print('answer', ray.get(ray.remote(lambda: 6 * 7).remote())); "
                       "time.sleep(3)"]


def process_tree(session: int) -> set[int]:
    """Every process of a session and every descendant of one (a job's driver may start its own session)."""
    return set(session_tree(session))


def listening_ports(pids: set[int]) -> set[int]:
    """TCP ports that any of `pids` listens on, as `ss -ltnp` shows them."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    found = set()
    for line in out.splitlines():
        owners = {int(p) for p in re.findall(r"pid=(\d+)", line)}
        if owners & pids:
            found.add(int(line.split()[3].rsplit(":", 1)[1]))
    return found


@pytest.mark.slow
def test_two_ray_heads_side_by_side_each_run_a_job_within_their_own_ports(tmp_path):
    free_base = ports.reserve(PORTS_PER_HEAD, purpose="test")  # a base known free, handed to head b
    free_base.release()
    b = LocalRayHead(num_cpus=1, port_base=free_base.base)  # exactly the block asked for
    a = LocalRayHead(num_cpus=1)  # a free block picked for it: not b's, though this process searched there first
    try:
        assert not a.all_ports() & b.all_ports()
        assert b.ports["gcs"] == free_base.base and max(b.all_ports()) == free_base.base + PORTS_PER_HEAD - 1
        with ThreadPoolExecutor(2) as pool:  # both come up at the same time
            list(pool.map(LocalRayHead.start, (a, b)))
        job_dir = tmp_path / "job"  # nothing to upload
        job_dir.mkdir()
        jobs = [subprocess.Popen(h.submit_command(JOB, working_dir=job_dir), env=ray_env(), cwd=job_dir,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for h in (a, b)]
        seen = {id(a): set(), id(b): set()}
        while any(j.poll() is None for j in jobs):  # the ports while the jobs' drivers and workers run
            for head in (a, b):
                seen[id(head)] |= listening_ports(process_tree(head.proc.pid))
            time.sleep(0.5)
        outputs = [j.communicate(timeout=30)[0] for j in jobs]
        for job, output in zip(jobs, outputs):
            assert job.returncode == 0 and "answer 42" in output, output[-3000:]
        for head in (a, b):
            opened = seen[id(head)]
            assert opened <= head.all_ports(), f"outside its block: {sorted(opened - head.all_ports())}"
            # The metrics ports Ray reads from the environment only are the block's, not 44217 / 44227.
            assert {head.ports["autoscaler_metric"], head.ports["dashboard_metric"], head.ports["gcs"]} <= opened
            assert opened & set(range(*head.worker_ports)), "no worker port in use: was a job running?"
    finally:
        a.stop()
        b.stop()
    again = ports.reserve(PORTS_PER_HEAD, base=free_base.base, purpose="test")  # stopped heads release theirs
    again.release()


def test_a_taken_port_base_is_refused_in_one_line():
    block = ports.reserve(PORTS_PER_HEAD, purpose="test")
    block.release()
    with socket.socket() as busy:
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # the block may hold TIME_WAIT sockets of an earlier test
        busy.bind(("127.0.0.1", block.base + 5))
        busy.listen()
        with pytest.raises(RayHeadError, match=rf"^port base {block.base} .*: port {block.base + 5} is in use; "):
            LocalRayHead(port_base=block.base)
    held = ports.reserve(3, purpose="test")
    try:
        with pytest.raises(ports.PortError, match="reserved by another run of this project"):
            ports.reserve(2, base=held.base + 1)
        other = ports.reserve(3)  # this process searches from the same slot first: the registry moves it on
        other.release()
        assert not set(other.ports) & set(held.ports)
    finally:
        held.release()
    with pytest.raises(ports.PortError, match=r"GD_TRAIN_PORT_RANGE='40000': expected LO-HI"):
        ports.search_range({"GD_TRAIN_PORT_RANGE": "40000"})


WORKER = textwrap.dedent("""
    import os, time, torch, torch.distributed as dist
    dist.init_process_group("gloo")
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    time.sleep(3)  # both launches are up at the same time
    print(f"rank {dist.get_rank()} of {dist.get_world_size()} sum {t.item():g} master_port {os.environ['MASTER_PORT']}",
          flush=True)
    dist.destroy_process_group()
""")


@pytest.mark.slow
def test_two_local_launches_side_by_side_on_their_own_rendezvous_ports(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    chosen = ports.reserve(1, purpose="test")
    chosen.release()
    launches = []
    for port in (None, chosen.base):  # a port picked by the launcher; one given as --rdzv-port would be
        code = ("import sys; from launch.local import run_node; from launch.rendezvous import local_node; "
                f"sys.exit(run_node(local_node(2, rdzv_port={port}), [{str(script)!r}]))")
        launches.append(subprocess.Popen([sys.executable, "-c", code], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, text=True, start_new_session=True))
    opened = [set(), set()]
    deadline = time.monotonic() + 240
    while any(p.poll() is None for p in launches) and time.monotonic() < deadline:
        for i, proc in enumerate(launches):
            opened[i] |= listening_ports(process_tree(proc.pid))
        time.sleep(0.3)
    outputs = [p.communicate(timeout=30)[0] for p in launches]
    master_ports = []
    for proc, output in zip(launches, outputs):
        assert proc.returncode == 0, output[-3000:]
        lines = sorted(re.findall(r"rank \d of 2 sum 3 master_port (\d+)", output))
        assert len(lines) == 2 and len(set(lines)) == 1, output[-3000:]
        master_ports.append(int(lines[0]))
    assert master_ports[1] == chosen.base and master_ports[0] != master_ports[1]
    assert ports.AUTO_RANGE[0] <= master_ports[0] < ports.AUTO_RANGE[1]
    # Besides its rendezvous port a launch listens only on ports the kernel hands out as it binds them
    # (gloo's connections: the ephemeral range, 32768+), which no two processes can be given at once.
    for port, seen in zip(master_ports, opened):
        assert port in seen and all(p >= 32768 for p in seen - {port}), sorted(seen)


def test_the_rendezvous_port_is_a_launch_option(tmp_path, capsys):
    from gd_train.cli import main

    args = ["stage1", "--config", "configs/tiny/stage1.yaml", "--nproc", "2", "--local", "--dry-run",
            f"output_dir={tmp_path / 'run'}"]
    assert main([*args, "--rdzv-port", "12345"]) == 0
    assert "--rdzv-backend=static --master-addr=127.0.0.1 --master-port=12345 " in capsys.readouterr().out
    assert main([*args, "--master-port", "80"]) == 2
    assert "--rdzv-port: expected a port in 1024-65535, got 80" in capsys.readouterr().err
