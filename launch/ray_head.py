"""A real Ray head on this machine, for the demo and the tests: started, used through `ray job
submit`, and stopped by PID.

`ray start --head --block` runs in its own session; every other port is chosen free, so parallel runs
never clash. Stopping kills the head, then its process group, then every process still in its
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


def ray_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["RAY_AUTH_MODE"] = "disabled"  # no token written into ~/.ray (STACK_NOTES)
    env.pop("RAY_ADDRESS", None)
    return env


def _worker_port_range(taken: set[int], size: int = 200) -> tuple[int, int]:
    """A range for Ray's worker processes below the kernel's ephemeral ports (32768+ on Linux), where
    `free_ports` picks the others — so the two never overlap — and clear of `taken` all the same."""
    base = 10000 + (os.getpid() * 97) % (32768 - 10000 - size)
    while any(base <= p < base + size for p in taken):
        base = 10000 + (base - 10000 + size) % (32768 - 10000 - size)
    return base, base + size - 1


class LocalRayHead:
    def __init__(self, num_cpus: int = 2, dashboard_port: Optional[int] = None):
        self.num_cpus = num_cpus
        # Short: Ray puts Unix sockets under it (107-byte limit).
        self.temp_dir = Path(tempfile.mkdtemp(prefix="gdray", dir="/tmp"))
        ports = free_ports(9)
        (self.gcs_port, self.dashboard_port, self.client_port, self.node_manager_port, self.object_manager_port,
         self.agent_grpc_port, self.agent_listen_port, self.metrics_port, self.runtime_env_port) = ports
        if dashboard_port is not None:
            self.dashboard_port = dashboard_port
        self.worker_ports = _worker_port_range(set(ports) | {self.dashboard_port})
        self.proc: Optional[subprocess.Popen] = None
        self.log_path = self.temp_dir / "head.log"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def command(self) -> list[str]:
        return ["ray", "start", "--head", "--block", "--disable-usage-stats", "--num-cpus", str(self.num_cpus),
                "--num-gpus", "0", "--port", str(self.gcs_port),
                "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
                "--dashboard-port", str(self.dashboard_port), "--ray-client-server-port", str(self.client_port),
                "--node-manager-port", str(self.node_manager_port),
                "--object-manager-port", str(self.object_manager_port),
                "--dashboard-agent-grpc-port", str(self.agent_grpc_port),
                "--dashboard-agent-listen-port", str(self.agent_listen_port),
                "--metrics-export-port", str(self.metrics_port),
                "--runtime-env-agent-port", str(self.runtime_env_port),
                "--min-worker-port", str(self.worker_ports[0]), "--max-worker-port", str(self.worker_ports[1]),
                "--temp-dir", str(self.temp_dir)]

    def start(self, timeout_s: float = 90.0) -> "LocalRayHead":
        if port_in_use(self.dashboard_port):
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            raise RayHeadError(
                f"port {self.dashboard_port} on 127.0.0.1 is taken (a Ray head already running?); stop that "
                f"head, or pick another port (e.g. RAY_DASHBOARD_PORT={self.dashboard_port + 1})")
        with open(self.log_path, "wb") as log:
            # start_new_session: setsid() in the child, so the head leads its own session and group.
            self.proc = subprocess.Popen(self.command(), env=ray_env(), stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code, self.proc = self.proc.returncode, None
                tail = self.log_path.read_text(errors="replace")[-2000:].replace("\n", " | ")
                raise RayHeadError(f"ray head exited with status {code}; its log ends: {tail}")
            try:
                with urllib.request.urlopen(f"{self.dashboard}/api/jobs/", timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RayHeadError(f"ray head: job API not up on {self.dashboard} after {timeout_s:.0f} s")

    def submit_command(self, entrypoint: Sequence[str], working_dir: Path = REPO_ROOT) -> list[str]:
        return ["ray", "job", "submit", "--address", self.dashboard, "--working-dir", str(working_dir), "--",
                *entrypoint]

    def submit(self, entrypoint: Sequence[str], timeout_s: float = 300.0, capture: bool = True,
               working_dir: Path = REPO_ROOT) -> subprocess.CompletedProcess:
        """`ray job submit` (blocking: its exit status is the job's)."""
        return subprocess.run(self.submit_command(entrypoint, working_dir), env=ray_env(), capture_output=capture,
                              text=True, timeout=timeout_s, cwd=working_dir)

    def stop(self) -> None:
        if self.proc is None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
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
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> "LocalRayHead":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
