"""A two-node Ray cluster on this machine, no SLURM: a head (`LocalRayHead`) and a second node joined with
`ray start --address` (`launch.ray_node.LocalRayNode`: its own session, ports and resources). Work
submitted with `ray job submit` lands on both nodes; the second node killed as a whole (every process of
the node, SIGKILL) is reported DEAD by the head, and the next job runs on the survivor."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from launch.ray_head import LocalRayHead, ray_env
from launch.ray_node import LocalRayNode, alive_nodes

pytestmark = pytest.mark.slow

# Ray's defaults take ~16 s to call a silent node dead (5 missed health checks, 3 s apart).
FAST_NODE_DEATH = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3",
                   "RAY_health_check_timeout_ms": "1000"}
PROBE = """
import os, pathlib, ray, sys, time
ray.init(address="auto")

@ray.remote(num_cpus=1)
class Where:
    def __init__(self):
        time.sleep(1)  # both actors exist at once: one per node (1 CPU each)
    def node(self):
        return ray.get_runtime_context().get_node_id(), os.getpid()

actors = [Where.remote() for _ in range({n})]
for node, pid in ray.get([a.node.remote() for a in actors], timeout=120):
    print(f"ACTOR node={{node}} pid={{pid}}", flush=True)
release = pathlib.Path({release!r})
while not release.exists():  # the actors live until the test says so
    time.sleep(0.1)
"""


@pytest.fixture(scope="module")
def head():
    saved = {k: os.environ.get(k) for k in FAST_NODE_DEATH}
    os.environ.update(FAST_NODE_DEATH)  # the head's GCS reads them at start (ray_env copies os.environ)
    try:
        head = LocalRayHead(num_cpus=1).start()
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    yield head
    head.stop()


def _start_probe(head: LocalRayHead, tmp_path: Path, n: int) -> tuple[subprocess.Popen, Path, Path]:
    """A job holding `n` 1-CPU actors until its release file appears; (job, its log, the release file)."""
    script, log, release = tmp_path / f"probe{n}.py", tmp_path / f"probe{n}.log", tmp_path / f"release{n}"
    script.write_text(PROBE.format(n=n, release=str(release)))
    with open(log, "w") as fh:
        job = subprocess.Popen(head.submit_command(["python", script.name], working_dir=tmp_path), env=ray_env(),
                               stdout=fh, stderr=subprocess.STDOUT, cwd=tmp_path)
    return job, log, release


def _placed(job: subprocess.Popen, log: Path, n: int) -> list[tuple[str, int]]:
    deadline = time.monotonic() + 240
    while len(found := re.findall(r"ACTOR node=(\w+) pid=(\d+)", log.read_text())) < n:
        assert job.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)
    return [(node, int(pid)) for node, pid in found]


def _actors(head: LocalRayHead, tmp_path: Path, n: int) -> list[tuple[str, int]]:
    job, log, release = _start_probe(head, tmp_path, n)
    placed = _placed(job, log, n)
    release.touch()
    assert job.wait(timeout=120) == 0, log.read_text()[-3000:]
    return placed


def test_work_lands_on_both_nodes_and_a_lost_node_leaves_the_survivor_working(head, tmp_path):
    node = LocalRayNode(head, num_cpus=1, resources={"gd_second_node": 1}).start()
    job, log, release = _start_probe(head, tmp_path, 2)
    try:
        ids = {n["node_id"]: n for n in alive_nodes(head)}
        assert len(ids) == 2 and ids[node.node_id]["resources_total"].get("gd_second_node") == 1
        placed = _placed(job, log, 2)
        assert {n for n, _ in placed} == set(ids), placed
        on_node = set(node.pids())  # what kill() ends: the actor on the node, not the one on the head
        assert [pid in on_node for n, pid in sorted(placed)] == [n == node.node_id for n, _ in sorted(placed)]
        killed_at = time.monotonic()
        node.kill()
        while any(n["node_id"] == node.node_id for n in alive_nodes(head)):
            assert time.monotonic() - killed_at < 60, "the head still counts the killed node alive after 60 s"
            time.sleep(0.2)
        print(f"\nkilled Ray node reported dead after {time.monotonic() - killed_at:.1f} s")
        assert not any(Path(f"/proc/{pid}").exists() for pid in on_node)
    finally:
        release.touch()
        node.stop()
    assert job.wait(timeout=120) == 0, log.read_text()[-3000:]
    survivor = next(iter(set(ids) - {node.node_id}))
    assert [n for n, _ in _actors(head, tmp_path, 1)] == [survivor]
