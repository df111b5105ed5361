"""Blocks of TCP ports for what this project starts on one machine: a local Ray head (every port it
opens, its workers' included) and a local torchrun rendezvous.

A block is a run of consecutive ports, free when reserved and recorded in a machine-wide registry
(`<tmp>/gd-train-ports.json`, changed under `flock`) until released or until its process ends, so two
concurrent runs never get the same block: neither two `make demo`s nor two tests in parallel. Blocks
come from below Linux's ephemeral range (32768+), where the kernel never hands out ports by itself,
by default from `AUTO_RANGE`; `GD_TRAIN_PORT_RANGE=LO-HI` moves the search (e.g. to ports a firewall
opens), and a caller can ask for an exact `base` instead.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

# Below the SLURM rendezvous ports (launch.rendezvous: 15000-29999), above the well-known services.
AUTO_RANGE = (10000, 15000)
RANGE_ENV = "GD_TRAIN_PORT_RANGE"
REGISTRY = Path(tempfile.gettempdir()) / "gd-train-ports.json"


class PortError(RuntimeError):
    """No block could be reserved (one line: which ports, and what to do)."""


def port_free(port: int) -> bool:
    """Nothing listens on `port` on any address (a bind on the wildcard address succeeds).
    SO_REUSEADDR: connections in TIME_WAIT from an earlier run do not count."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def search_range(env=os.environ) -> tuple[int, int]:
    text = env.get(RANGE_ENV)
    if not text:
        return AUTO_RANGE
    lo, sep, hi = text.partition("-")
    if not (sep and lo.strip().isdigit() and hi.strip().isdigit() and 1024 <= int(lo) < int(hi) <= 65536):
        raise PortError(f"{RANGE_ENV}={text!r}: expected LO-HI, two port numbers 1024 <= LO < HI <= 65536 "
                        f"(e.g. {AUTO_RANGE[0]}-{AUTO_RANGE[1]})")
    return int(lo), int(hi)


def _process_start(pid: int) -> Optional[str]:
    """The process's start time (clock ticks since boot): a pid with another start time is another process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()[19]


@dataclass
class PortBlock:
    base: int
    count: int
    _released: bool = False

    @property
    def ports(self) -> range:
        return range(self.base, self.base + self.count)

    def release(self) -> None:
        if not self._released:
            self._released = True
            with _Registry() as entries:
                entries[:] = [e for e in entries if not (e["pid"] == os.getpid() and e["base"] == self.base)]


class _Registry:
    """The reservations of live processes, read and rewritten under an exclusive lock."""

    def __enter__(self) -> list[dict]:
        lock_path = REGISTRY.with_name(REGISTRY.name + ".lock")
        self.lock = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            os.fchmod(self.lock, 0o666)  # other users' runs share it (a umask would narrow it)
        except OSError:
            pass  # someone else's file: already shared
        fcntl.flock(self.lock, fcntl.LOCK_EX)
        try:
            entries = json.loads(REGISTRY.read_text()) if REGISTRY.is_file() else []
        except (OSError, ValueError):
            entries = []  # a damaged registry only loses what it protects; the bind test still runs
        self.entries = [e for e in entries if _process_start(e.get("pid", -1)) == e.get("start")]
        return self.entries

    def __exit__(self, *exc) -> None:
        try:
            if exc[0] is None:
                tmp = REGISTRY.with_name(f"{REGISTRY.name}.{os.getpid()}.tmp")
                tmp.write_text(json.dumps(self.entries))
                os.chmod(tmp, 0o666)  # other users' runs share it
                os.replace(tmp, REGISTRY)
        finally:
            fcntl.flock(self.lock, fcntl.LOCK_UN)
            os.close(self.lock)


def reserve(count: int, base: Optional[int] = None, purpose: str = "") -> PortBlock:
    """`count` consecutive free ports, recorded for this process until `release()` (or its end).
    With `base`: exactly base .. base+count-1, or PortError naming the port that is taken."""
    with _Registry() as entries:
        taken = [(e["base"], e["base"] + e["count"]) for e in entries]

        def clash(lo: int) -> Optional[str]:
            for b, e in taken:
                if lo < e and b < lo + count:
                    return f"ports {b}-{e - 1} are reserved by another run of this project on this machine"
            busy = next((p for p in range(lo, lo + count) if not port_free(p)), None)
            return None if busy is None else f"port {busy} is in use"

        if base is not None:
            if not 1024 <= base <= 65536 - count:
                raise PortError(f"port base {base}: expected 1024 .. {65536 - count} ({count} ports from it)")
            why = clash(base)
            if why:
                raise PortError(f"port base {base} ({purpose or 'this run'} needs {base}-{base + count - 1}): {why}; "
                                f"choose another base, or leave it unset to have a free block picked")
            chosen = base
        else:
            lo, hi = search_range()
            slots = list(range(lo, hi - count + 1, count))
            if not slots:
                raise PortError(f"{RANGE_ENV} / range {lo}-{hi}: too small for {count} ports")
            start = os.getpid() % len(slots)  # concurrent searches start apart; the registry decides
            chosen = next((s for s in slots[start:] + slots[:start] if clash(s) is None), None)
            if chosen is None:
                raise PortError(f"no {count} consecutive free ports in {lo}-{hi} for {purpose or 'this run'}; "
                                f"set {RANGE_ENV}=LO-HI to search elsewhere")
        entries.append({"pid": os.getpid(), "start": _process_start(os.getpid()), "base": chosen, "count": count,
                        "purpose": purpose})
    return PortBlock(chosen, count)
