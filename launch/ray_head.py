"""A real Ray head on this machine, for the demo and the tests: started, used through `ray job
submit`, and stopped by PID.

`ray start --head --block` runs in its own session. Every port it opens — the metrics ports Ray takes
from the environment included — comes from one block reserved for it (`launch.ports`): a base port
of the caller's choice, or a free block no other run of this project holds, so parallel heads never
clash. Stopping kills the head, then its process group, then every process still in its
session (Ray's workers leave the group but not the session). Never `ray stop`: it kills Ray processes
by name, machine-wide (STACK_NOTES).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Optional, Sequence

from launch.ports import PortError, reserve

REPO_ROOT = Path(__file__).resolve().parent.parent


class RayHeadError(RuntimeError):
    """The head could not be started (the message says why and what to do)."""


def free_ports(count: int) -> list[int]:
    """Ports the kernel hands out now (held open together so that they differ)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def session_members(session_id: int) -> list[int]:
    """PIDs of every process in a session."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # state ppid pgrp session ...
        if int(fields[3]) == session_id:
            pids.append(int(entry.name))
    return pids


def session_tree(session_id: int) -> list[int]:
    """PIDs of every process in a session and of everything those started: Ray's workers, forked by a
    raylet, leave its session (and its process group)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat[stat.rindex(")") + 2:].split()[1])
    mine = set(session_members(session_id))
    grew = True
    while grew:
        before = len(mine)
        mine |= {pid for pid, ppid in parents.items() if ppid in mine}
        grew = len(mine) > before
    return sorted(mine)


def kill_tree(session_id: int) -> None:
    """SIGKILL `session_tree(session_id)`, three rounds (a process forked while we signal escapes one)."""
    for _ in range(3):
        for pid in session_tree(session_id):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


class LocalRayProcess:
    """What a local Ray head and a joined node share: `proc`, their `ray start` in a session of its own;
    `temp_dir`, Ray's session folder; `block`, their reserved ports. Subclasses start and stop it."""

    proc: Optional[subprocess.Popen]
    temp_dir: Path

    def kill(self) -> None:
        """Every process of it at once, SIGKILL (a teardown that cannot wait for a clean stop: no process
        of it gets to say goodbye to the head)."""
        if self.proc is None:
            return
        kill_tree(self.proc.pid)
        self.proc.wait(timeout=10)
        self.proc = None
        self._cleanup()

    def _cleanup(self) -> None:
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        self.block.release()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def die_with_parent() -> None:
    """preexec_fn: the kernel sends this child SIGTERM when the process that started it dies, however it
    dies (`ray start --block` then stops every process it started; their workers follow their raylet)."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def ray_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["RAY_AUTH_MODE"] = "disabled"  # no token written into ~/.ray (STACK_NOTES)
    env.pop("RAY_ADDRESS", None)
    return env


# Every port a head opens, in the order of its block (ss -ltnp on a running head lists exactly these
# plus the worker ports; tests/test_ports.py checks it): `ray start` flags, and the two metrics ports
# Ray takes from the environment only (fixed at 44217 / 44227 otherwise: two heads would clash).
NAMED_PORTS = ("gcs", "dashboard", "client", "node_manager", "object_manager", "agent_grpc", "agent_listen",
               "metrics_export", "runtime_env_agent", "autoscaler_metric", "dashboard_metric")
WORKER_PORTS = 100  # Ray's worker processes and drivers: one port each
PORTS_PER_HEAD = len(NAMED_PORTS) + WORKER_PORTS


def node_port_flags(ports: dict[str, int], worker_ports: tuple[int, int]) -> list[str]:
    """`ray start` flags for the ports every Ray node opens (head or not), from its reserved block."""
    return ["--node-manager-port", str(ports["node_manager"]), "--object-manager-port", str(ports["object_manager"]),
            "--dashboard-agent-grpc-port", str(ports["agent_grpc"]),
            "--dashboard-agent-listen-port", str(ports["agent_listen"]),
            "--metrics-export-port", str(ports["metrics_export"]),
            "--runtime-env-agent-port", str(ports["runtime_env_agent"]),
            "--min-worker-port", str(worker_ports[0]), "--max-worker-port", str(worker_ports[1])]


def node_ip_flags(node_ip: Optional[str]) -> list[str]:
    return [] if node_ip is None else ["--node-ip-address", node_ip]


class LocalRayHead(LocalRayProcess):
    """`port_base`: the head uses exactly port_base .. port_base + PORTS_PER_HEAD - 1 (refused in one
    line if any is taken); unset, a free block is reserved (`launch.ports`). `dashboard_port` /
    `gcs_port` move the dashboard (the job API) / the GCS (what other nodes join) out of the block to
    that port. `node_ip`: the address the head advertises to other nodes (Ray's guess otherwise).
    `tied`: Ray stops when this process dies, even by SIGKILL (`die_with_parent`)."""

    def __init__(self, num_cpus: int = 2, dashboard_port: Optional[int] = None, port_base: Optional[int] = None,
                 num_gpus: int = 0, gcs_port: Optional[int] = None, node_ip: Optional[str] = None, tied: bool = False):
        self.num_cpus, self.num_gpus, self.node_ip, self.tied = num_cpus, num_gpus, node_ip, tied
        try:
            self.block = reserve(PORTS_PER_HEAD, base=port_base, purpose="a local Ray head")
        except PortError as exc:
            raise RayHeadError(str(exc)) from None
        self.ports = dict(zip(NAMED_PORTS, self.block.ports))
        if dashboard_port is not None:
            self.ports["dashboard"] = dashboard_port
        if gcs_port is not None:
            self.ports["gcs"] = gcs_port
        first_worker = self.block.base + len(NAMED_PORTS)
        self.worker_ports = (first_worker, first_worker + WORKER_PORTS - 1)
        # Short: Ray puts Unix sockets under it (107-byte limit).
        self.temp_dir = Path(tempfile.mkdtemp(prefix="gdray", dir="/tmp"))
        self.proc: Optional[subprocess.Popen] = None
        self.log_path = self.temp_dir / "head.log"

    @property
    def dashboard_port(self) -> int:
        return self.ports["dashboard"]

    @property
    def gcs_port(self) -> int:
        return self.ports["gcs"]

    def all_ports(self) -> set[int]:
        """Every port this head may listen on."""
        return set(self.ports.values()) | set(range(self.worker_ports[0], self.worker_ports[1] + 1))

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def command(self) -> list[str]:
        return ["ray", "start", "--head", "--block", "--disable-usage-stats", "--num-cpus", str(self.num_cpus),
                "--num-gpus", str(self.num_gpus), "--port", str(self.ports["gcs"]),
                "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
                "--dashboard-port", str(self.ports["dashboard"]), "--ray-client-server-port", str(self.ports["client"]),
                *node_port_flags(self.ports, self.worker_ports), *node_ip_flags(self.node_ip),
                "--temp-dir", str(self.temp_dir)]

    def environment(self) -> dict[str, str]:
        """The head's environment: Ray reads these two ports from it only."""
        return {**ray_env(), "AUTOSCALER_METRIC_PORT": str(self.ports["autoscaler_metric"]),
                "DASHBOARD_METRIC_PORT": str(self.ports["dashboard_metric"])}

    def start(self, timeout_s: float = 90.0) -> "LocalRayHead":
        if port_in_use(self.dashboard_port):
            self._cleanup()
            raise RayHeadError(
                f"port {self.dashboard_port} on 127.0.0.1 is taken (a Ray head already running?); stop that "
                f"head, or pick another port (e.g. RAY_DASHBOARD_PORT={self.dashboard_port + 1}), or leave it unset")
        with open(self.log_path, "wb") as log:
            # start_new_session: setsid() in the child, so the head leads its own session and group.
            self.proc = subprocess.Popen(self.command(), env=self.environment(), stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         preexec_fn=die_with_parent if self.tied else None)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code, self.proc = self.proc.returncode, None
                tail = self.log_path.read_text(errors="replace")[-2000:].replace("\n", " | ")
                self._cleanup()
                raise RayHeadError(f"ray head exited with status {code}; its log ends: {tail}")
            try:
                with urllib.request.urlopen(f"{self.dashboard}/api/jobs/", timeout=2) as response:
                    # The job API hands each submission to the head's dashboard agent, giving up after
                    # 10 s ("No available agent to submit job"): on a loaded machine the agent comes
                    # up later than the API, so wait for it as well.
                    if response.status == 200 and port_in_use(self.ports["agent_listen"]):
                        return self
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RayHeadError(f"ray head: job API not up on {self.dashboard} after {timeout_s:.0f} s")

    def submit_command(self, entrypoint: Sequence[str], working_dir: Path = REPO_ROOT,
                       options: Sequence[str] = ()) -> list[str]:
        """`options`: more `ray job submit` flags (`--submission-id ID`, `--runtime-env-json ...`)."""
        return ["ray", "job", "submit", "--address", self.dashboard, "--working-dir", str(working_dir), *options,
                "--", *entrypoint]

    def submit(self, entrypoint: Sequence[str], timeout_s: float = 300.0, capture: bool = True,
               working_dir: Path = REPO_ROOT) -> subprocess.CompletedProcess:
        """`ray job submit` (blocking: its exit status is the job's)."""
        return subprocess.run(self.submit_command(entrypoint, working_dir), env=ray_env(), capture_output=capture,
                              text=True, timeout=timeout_s, cwd=working_dir)

    def stop(self) -> None:
        if self.proc is None:
            self._cleanup()
            return
        session = self.proc.pid
        # The head alone first: it shuts its children down in a few seconds (signalling the whole
        # group at once makes that take longer). Then its group, then whatever its session still holds.
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        try:
            os.killpg(session, signal.SIGTERM)
        except ProcessLookupError:
            pass
        for sig in (signal.SIGTERM, signal.SIGKILL):
            members = session_members(session)
            for pid in members:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 10
            while members and time.monotonic() < deadline:
                members = session_members(session)
                time.sleep(0.2)
            if not members:
                break
        self.proc = None
        self._cleanup()

