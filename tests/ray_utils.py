"""Helpers of the multi-node Ray tests (tests/test_ray_two_nodes.py, tests/test_slurm_gen_teacher.py): which
process writes which shard attempt, pausing a teacher actor, telling a live process from a dead one.

Why the tests pause actors: a teacher actor is PENDING_CREATION until its constructor returns, and that
imports torch and diffusers (~6 s of CPU, 20-40 s on this loaded 2-core machine; py-spy on a "stuck" one
shows it inside `import diffusers`, and it has a pid, so it has its resources). With two actors starting at
once, whichever comes up first can write every shard of a job as small as a test's. So a test that needs
shards on both nodes SIGSTOPs the actor that got ahead, mid-shard, until the other node's actor has
started its shards (a slow node, as far as the driver can tell), then SIGCONTs it.
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

PARTIAL = re.compile(r"^(shard-\d+\.tar)\.attempt(\d+)-.*-(\d+)\.partial$")


def attempts_seen(out: Path, seen: dict[tuple[str, int], int]) -> None:
    """Record (shard, attempt) -> pid for every attempt whose partial file is there now (its name says who)."""
    try:
        names = os.listdir(out)
    except FileNotFoundError:
        return
    for name in names:
        if m := PARTIAL.match(name):
            seen.setdefault((m[1], int(m[2])), int(m[3]))


class Paused:
    """Actor processes stopped with SIGSTOP; `resume_all()` (also on exit) sends them SIGCONT."""

    def __init__(self) -> None:
        self.pids: set[int] = set()

    def pause(self, pid: int) -> None:
        if pid not in self.pids:
            try:
                os.kill(pid, signal.SIGSTOP)
                self.pids.add(pid)
            except ProcessLookupError:
                pass

    def resume_all(self) -> None:
        for pid in self.pids:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        self.pids.clear()

    def __enter__(self) -> "Paused":
        return self

    def __exit__(self, *exc) -> None:
        self.resume_all()


def running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"  # a zombie is dead, only not yet reaped
