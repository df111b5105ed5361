"""Rank, world and the few collectives the training loop needs, on top of `torch.distributed`.

Processes are started by torchrun (`launch/`), which sets RANK / WORLD_SIZE / LOCAL_RANK and the
rendezvous. DeepSpeed owns process-group creation (`deepspeed.init_distributed`); on CPU the backend
is gloo (DeepSpeed's CPU default, oneCCL, is not installed), on CUDA nccl. Every helper below works
unchanged in a single process that was started without torchrun (world size 1, no process group).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init() -> DistInfo:
    """Join the process group torchrun prepared (or stay single-process) and pick this rank's device."""
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if world_size > 1 or "MASTER_ADDR" in os.environ:
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend, rank=rank, world_size=world_size)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def barrier() -> None:
    if active():
        dist.barrier()


def _collective_device() -> torch.device:
    # nccl reduces CUDA tensors only; gloo CPU tensors only.
    if active() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_ints(values: Sequence[int], src: int = 0) -> list[int]:
    """Rank `src`'s values, on every rank."""
    tensor = torch.tensor(list(values), dtype=torch.int64, device=_collective_device())
    if active():
        dist.broadcast(tensor, src=src)
    return [int(v) for v in tensor.tolist()]


def all_reduce(values: Sequence[float], op: str = "sum") -> list[float]:
    """Element-wise sum or max of a short float vector over all ranks (float64: exact for counts)."""
    tensor = torch.tensor(list(values), dtype=torch.float64, device=_collective_device())
    if active():
        dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return tensor.tolist()


def all_gather_object(obj: Any) -> list[Any]:
    if not active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def shutdown() -> None:
    if active():
        dist.destroy_process_group()
