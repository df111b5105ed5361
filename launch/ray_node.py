"""A further Ray node on this machine, joined to a running local head (`ray start --address`): a
multi-node Ray cluster on one machine, for the data job's multi-node paths (work spread over nodes,
a node lost mid-shard).

The node is a cluster member of its own: its own session (it leads it), temp dir, resources and ports
(a block from `launch.ports`, as the head's), so it can be killed as a whole — `kill()` SIGKILLs every
process of the node at once (its session, and the workers its raylet forks, which leave it), which is
what a lost machine looks like to the head — without touching the head or anything else. Never `ray stop` (it kills Ray processes by name, machine-wide).
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Optional

from launch.ports import PortError, reserve
from launch.ray_head import (LocalRayHead, RayHeadError, LocalRayProcess, die_with_parent, node_ip_flags, node_port_flags, port_in_use,
                             ray_env, session_tree)

# "client" and "dashboard" are head-only and never opened here, but `ray start` checks every port it
# is given against the defaults of those two (10001, 8265) and refuses a node whose block overlaps them:
# flags from the block keep them apart.
NODE_PORTS = ("node_manager", "object_manager", "agent_grpc", "agent_listen", "metrics_export", "runtime_env_agent",
              "client", "dashboard")
WORKER_PORTS = 50


def alive_nodes(head: LocalRayHead) -> list[dict]:
    """The cluster's ALIVE nodes, from the head's state API (node_id, resources_total, ...)."""
    url = f"{head.dashboard}/api/v0/nodes?limit=1000&detail=true"
    with urllib.request.urlopen(url, timeout=10) as response:
        nodes = json.loads(response.read())["data"]["result"]["result"]
    return [n for n in nodes if n.get("state") == "ALIVE"]


class LocalRayNode(LocalRayProcess):
    """`ray start --address <head> --block` with `num_cpus` CPUs, `num_gpus` GPUs and custom `resources`.
    `head`: a `LocalRayHead` of this machine (the node is up once the head lists it), or None with
    `address` ("HOST:PORT" of the head's GCS, e.g. on another machine: up once its raylet listens)."""

    def __init__(self, head: Optional[LocalRayHead], num_cpus: int = 1, resources: Optional[dict[str, float]] = None,
                 *, address: Optional[str] = None, num_gpus: int = 0, node_ip: Optional[str] = None,
                 tied: bool = False):
        if (head is None) == (address is None):
            raise ValueError("LocalRayNode: give the head or its address, not both")
        self.head, self.num_cpus, self.resources = head, num_cpus, dict(resources or {})
        self.address = address or f"127.0.0.1:{head.gcs_port}"
        self.num_gpus, self.node_ip, self.tied = num_gpus, node_ip, tied  # tied: as LocalRayHead's
        try:
            self.block = reserve(len(NODE_PORTS) + WORKER_PORTS, purpose="a local Ray node")
        except PortError as exc:
            raise RayHeadError(str(exc)) from None
        self.ports = dict(zip(NODE_PORTS, self.block.ports))
        first_worker = self.block.base + len(NODE_PORTS)
        self.worker_ports = (first_worker, first_worker + WORKER_PORTS - 1)
        self.temp_dir = Path(tempfile.mkdtemp(prefix="gdraynode", dir="/tmp"))  # short: Unix sockets under it
        self.log_path = self.temp_dir / "node.log"
        self.proc: Optional[subprocess.Popen] = None
        self.node_id: Optional[str] = None

    def command(self) -> list[str]:
        return ["ray", "start", "--address", self.address, "--block", "--disable-usage-stats",
                "--num-cpus", str(self.num_cpus), "--num-gpus", str(self.num_gpus),
                "--resources", json.dumps(self.resources),
                "--ray-client-server-port", str(self.ports["client"]), "--dashboard-port", str(self.ports["dashboard"]),
                *node_port_flags(self.ports, self.worker_ports), *node_ip_flags(self.node_ip),
                "--temp-dir", str(self.temp_dir)]

    def start(self, timeout_s: float = 90.0) -> "LocalRayNode":
        before = {n["node_id"] for n in alive_nodes(self.head)} if self.head else set()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.command(), env=ray_env(), stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True, preexec_fn=die_with_parent if self.tied else None)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code, self.proc = self.proc.returncode, None
                tail = self.log_path.read_text(errors="replace")[-2000:].replace("\n", " | ")
                self._cleanup()
                raise RayHeadError(f"ray node exited with status {code}; its log ends: {tail}")
            if self.head is None:
                if port_in_use(self.ports["node_manager"], self.node_ip or "127.0.0.1"):  # its raylet is up
                    return self
            else:
                new = [n["node_id"] for n in alive_nodes(self.head)
                       if n["node_id"] not in before and "node:__internal_head__" not in n.get("resources_total", {})]
                if new:
                    self.node_id = new[0]
                    return self
            time.sleep(0.5)
        self.stop()
        raise RayHeadError(f"ray node: not alive in the cluster of {self.address} after {timeout_s:.0f} s")

    def pids(self) -> list[int]:
        """Every process of the node: its session (`ray start`, raylet, agents) and everything those
        started, the workers and actors its raylet forks included (they leave the session)."""
        return [] if self.proc is None else session_tree(self.proc.pid)

    def stop(self) -> None:
        if self.proc is None:
            self._cleanup()
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
        self.kill()

