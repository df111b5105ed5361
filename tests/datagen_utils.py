"""Shared helpers of the data tests: small real shard folders, prompt CSVs, a real local Ray head."""

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
from typing import Sequence

import torch

from gd_train.data.shards import SHARD_NAME, Manifest, TeacherSample, write_shard

REPO_ROOT = Path(__file__).resolve().parent.parent
SMALL_LATENTS = (16, 2, 2, 2)
SMALL_TEXT_DIM = 8


def sample_key(shard: int, index: int) -> str:
    return f"s{shard:03d}-{index:03d}"


def make_sample(key: str, tokens: int, seed: int) -> TeacherSample:
    gen = torch.Generator().manual_seed(seed)
    return TeacherSample(key=key, latents=torch.randn(SMALL_LATENTS, generator=gen),
                         prompt_embeds=torch.randn(tokens, SMALL_TEXT_DIM, generator=gen),
                         meta={"caption": f"caption of {key}", "seed": seed})


def make_shards(folder: Path, counts: Sequence[int], *, manifest: bool = True) -> list[str]:
    """Shards shard-000000.tar ... holding `counts[i]` samples each; returns every key in write order."""
    folder.mkdir(parents=True, exist_ok=True)
    keys, records = [], {}
    for shard, count in enumerate(counts):
        samples = [make_sample(sample_key(shard, i), tokens=1 + (shard + i) % 5, seed=shard * 1000 + i)
                   for i in range(count)]
        name = SHARD_NAME.format(index=shard)
        records[name] = write_shard(folder / name, samples, attempt_tag="test")
        keys += [s.key for s in samples]
    if manifest:
        Manifest(settings={"latent_shape": list(SMALL_LATENTS)}, total_shards=len(counts), shards=records).save(folder)
    return keys


def truncate(path: Path, keep_fraction: float = 0.5) -> None:
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.truncate(int(size * keep_fraction))


# --------------------------------------------------------------------------------------------------
# Prompt CSVs
# --------------------------------------------------------------------------------------------------
OPENVID_HEADER = b"video,caption,aesthetic score,motion score,temporal consistency score,camera motion,frame,fps,seconds\n"


def write_prompts_csv(path: Path, valid: int = 36) -> tuple[dict[str, str], list[int]]:
    """An OpenVidHD-layout CSV: `valid` good rows (quoted captions with commas and newlines, one with
    cp1252 bytes) and 5 malformed ones in between. Returns {key: caption} of the good rows and the
    row numbers of the bad ones."""
    rows, expected, bad = [], {}, []
    for i in range(valid):
        caption = f"clip {i}: a red fox, running through snow"
        if i % 7 == 3:
            caption = f"clip {i}: a quoted caption, with a comma\nand a second line"
        raw = caption.encode()
        if i == 5:
            raw = f"clip {i}: caf".encode() + b"\xe9 at dusk"  # cp1252 e-acute: not UTF-8
            caption = f"clip {i}: café at dusk"
        rows.append(b'clip_%04d.mp4,"' % i + raw + b'",5.%d,3.0,0.9,static,81,16,5' % (i % 10))
        expected[f"clip_{i:04d}"] = " ".join(caption.split())
        if i in (4, 11, 19, 26, 33):  # a malformed row after these
            kind = len(bad)
            rows.append([b"bad_%d.mp4,,5.0,3.0,0.9,static,81,16,5" % kind,  # empty caption
                         b"bad_%d.mp4,only two fields" % kind,  # missing columns
                         b'bad_%d.mp4,"   ",5.0,3.0,0.9,static,81,16,5' % kind,  # blank caption
                         b"clip_0000.mp4,duplicate video name,5.0,3.0,0.9,static,81,16,5",
                         b"bad_%d.mp4,too,many,fields,1,2,3,4,5,6,7" % kind][kind])
            bad.append(len(rows))
    path.write_bytes(OPENVID_HEADER + b"\n".join(rows) + b"\n")
    return expected, bad


# --------------------------------------------------------------------------------------------------
# A real Ray head on this machine
# --------------------------------------------------------------------------------------------------
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


def session_members(session_id: int) -> list[int]:
    """PIDs of every process in a session (Ray's worker processes leave the head's process group but
    stay in its session)."""
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


class LocalRayHead:
    """`ray start --head --block` in its own session, every port chosen free (parallel runs never
    clash), stopped by PID: its process group, then every process left in its session. Never
    `ray stop`, which kills Ray processes by name, machine-wide."""

    def __init__(self, num_cpus: int = 2):
        self.num_cpus = num_cpus
        # Short: Ray puts Unix sockets under it (107-byte limit).
        self.temp_dir = Path(tempfile.mkdtemp(prefix="gdray", dir="/tmp"))
        (self.gcs_port, self.dashboard_port, self.client_port, self.node_manager_port, self.object_manager_port,
         self.agent_grpc_port, self.agent_listen_port, self.metrics_port, self.runtime_env_port) = free_ports(9)
        worker_base = 20000 + (os.getpid() * 97) % 30000
        self.worker_ports = (worker_base, worker_base + 199)
        self.proc: subprocess.Popen | None = None
        self.log_path = self.temp_dir / "head.log"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def command(self) -> list[str]:
        return ["ray", "start", "--head", "--block", "--disable-usage-stats", "--num-cpus", str(self.num_cpus), "--num-gpus", "0", "--port", str(self.gcs_port),
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
        with open(self.log_path, "wb") as log:
            # start_new_session: setsid() in the child, so the head leads its own session and group.
            self.proc = subprocess.Popen(self.command(), env=ray_env(), stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray head exited with {self.proc.returncode}: {self.log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.dashboard}/api/jobs/", timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"ray head: job API not up after {timeout_s:.0f} s")

    def submit(self, entrypoint: list[str], timeout_s: float = 300.0) -> subprocess.CompletedProcess:
        """`ray job submit` (blocking: its exit status is the job's) with the repo as working dir."""
        command = ["ray", "job", "submit", "--address", self.dashboard, "--working-dir", str(REPO_ROOT), "--",
                   *entrypoint]
        return subprocess.run(command, env=ray_env(), capture_output=True, text=True, timeout=timeout_s,
                              cwd=REPO_ROOT)

    def stop(self) -> None:
        if self.proc is None:
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
