"""Where the processes of a run meet: from a SLURM allocation, or on this machine.

Under SLURM every node runs one launcher task (`srun --ntasks-per-node=1`). All of them derive the same
rendezvous without talking to each other: MASTER_ADDR = the first host of the allocation, the port a
function of the job id (a requeued job keeps its id, so it meets on the same port), the node rank read
inside the task from SLURM_NODEID. torchrun's static rendezvous then needs nothing else.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
from dataclasses import dataclass, replace
from typing import Mapping, Optional

PORT_BASE, PORT_SPAN = 15000, 15000  # 15000-29999: below Linux's ephemeral range (32768+)


class RendezvousError(ValueError):
    """An allocation the launcher cannot read (one line: which variable, what was expected)."""


@dataclass(frozen=True)
class NodePlan:
    nnodes: int
    node_rank: int
    nproc_per_node: int
    master_addr: str
    master_port: Optional[int]  # None: a local node reserves a free one when it starts (launch.ports)
    source: str  # "slurm" | "local"
    job_id: Optional[str] = None

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node

    def torchrun_args(self) -> list[str]:
        # Static rendezvous locally too (not --standalone, whose port cannot be chosen, nor c10d, whose
        # workers meet on a second port torch picks): the agent's store on master_port is the workers'.
        return [f"--nnodes={self.nnodes}", f"--node-rank={self.node_rank}", f"--nproc-per-node={self.nproc_per_node}",
                "--rdzv-backend=static", f"--master-addr={self.master_addr}",
                f"--master-port={'auto' if self.master_port is None else self.master_port}"]


def port_for_job(job_id: str | int) -> int:
    digits = re.sub(r"\D", "", str(job_id))
    if not digits:
        raise RendezvousError(f"SLURM_JOB_ID={job_id!r}: expected a numeric job id")
    return PORT_BASE + int(digits) % PORT_SPAN


def expand_hostlist(nodelist: str) -> list[str]:
    """SLURM's compressed host list ('gpu[01-03,07],login1') in order, as `scontrol show hostnames`
    prints it. Parsed here so that planning works where `scontrol` is absent (a dry run on a laptop,
    a container without SLURM clients); `tests/test_launch.py` compares it with scontrol when present."""
    hosts: list[str] = []
    for item in re.findall(r"[^,\[]+(?:\[[^\]]*\][^,\[]*)*", nodelist):
        hosts += _expand_one(item)
    if not hosts:
        raise RendezvousError(f"SLURM_JOB_NODELIST={nodelist!r}: no hosts in it")
    return hosts


def _expand_one(item: str) -> list[str]:
    match = re.match(r"^([^\[]*)\[([^\]]*)\](.*)$", item)
    if not match:
        return [item]
    prefix, ranges, rest = match.groups()
    out = []
    for part in ranges.split(","):
        lo, _, hi = part.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise RendezvousError(f"SLURM_JOB_NODELIST: cannot read range '{part}' in '{item}'")
        for n in range(int(lo), int(hi or lo) + 1):
            out += [prefix + str(n).zfill(len(lo)) + suffix for suffix in _expand_one(rest)]
    return out


def in_slurm(env: Mapping[str, str] = os.environ) -> bool:
    return "SLURM_JOB_ID" in env and "SLURM_JOB_NODELIST" in env


def default_nproc(env: Mapping[str, str] = os.environ) -> int:
    """GPUs of this node (SLURM's count when it allocated them, else what CUDA sees), or 1 on CPU."""
    for key in ("SLURM_GPUS_ON_NODE",):
        value = env.get(key, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    import torch

    return torch.cuda.device_count() or 1


def slurm_nodes(env: Mapping[str, str], nproc_per_node: int) -> list[NodePlan]:
    """The plan of every node of the allocation (node rank = position in the host list)."""
    hosts = expand_hostlist(env["SLURM_JOB_NODELIST"])
    declared = env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES")
    if declared and int(declared) != len(hosts):
        raise RendezvousError(f"SLURM_JOB_NUM_NODES={declared} but SLURM_JOB_NODELIST names {len(hosts)} host(s)")
    port = port_for_job(env["SLURM_JOB_ID"])
    return [NodePlan(nnodes=len(hosts), node_rank=i, nproc_per_node=nproc_per_node, master_addr=hosts[0],
                     master_port=port, source="slurm", job_id=env["SLURM_JOB_ID"]) for i in range(len(hosts))]


def node_address(host: str) -> str:
    """An address other nodes can reach `host` at: the name itself when it resolves (a real cluster),
    else SLURM's NodeAddr for it (several slurmd on one machine: node names are not host names)."""
    try:
        socket.getaddrinfo(host, None)
        return host
    except socket.gaierror:
        pass
    try:
        shown = subprocess.run(["scontrol", "-o", "show", "node", host], capture_output=True, text=True,
                               timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        shown = ""
    match = re.search(r"\bNodeAddr=(\S+)", shown)
    if not match:
        raise RendezvousError(f"the allocation's first host {host!r} does not resolve, and `scontrol show node {host}` "
                              f"gives no NodeAddr for it: the other nodes cannot reach the rendezvous")
    return match.group(1)


def this_slurm_node(env: Mapping[str, str], nproc_per_node: int) -> NodePlan:
    """This task's node (SLURM_NODEID, set by srun inside the task)."""
    nodes = slurm_nodes(env, nproc_per_node)
    node_id = env.get("SLURM_NODEID")
    if node_id is None or not node_id.isdigit():
        raise RendezvousError("SLURM_NODEID is not set: run the launcher inside the allocation's tasks "
                              "(srun --ntasks-per-node=1 ...), or use --dry-run to see every node's command")
    if int(node_id) >= len(nodes):
        raise RendezvousError(f"SLURM_NODEID={node_id} outside the allocation's {len(nodes)} node(s)")
    return nodes[int(node_id)]


def reachable(plan: NodePlan) -> NodePlan:
    """The plan to launch with: its master at an address this node can connect to (`node_address`)."""
    return replace(plan, master_addr=node_address(plan.master_addr))


def local_node(nproc_per_node: int, rdzv_port: Optional[int] = None) -> NodePlan:
    """One node on this machine; its rendezvous on `rdzv_port` (`gd-train --rdzv-port`), or on a free
    port that `launch.local.run_node` reserves."""
    return NodePlan(nnodes=1, node_rank=0, nproc_per_node=nproc_per_node, master_addr="127.0.0.1",
                    master_port=rdzv_port, source="local")
