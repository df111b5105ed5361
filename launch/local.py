"""The per-node launcher: torchrun, run in this process, over the node's share of the processes.

The same function serves a laptop (`gd-train stage1 --nproc 2`: one local node) and every node of a
SLURM job (one launcher task per node under `srun`). torchrun is called in-process rather than as a
child so that the signals SLURM sends to the task (SIGUSR1 before the time limit, SIGTERM) reach its
agent directly; the agent forwards them to the workers (`--signals-to-handle`), waits for them to
checkpoint and exit, and only then gives up (`--shutdown-timeout`).

Exit code: 0 when every worker finished, or when a forwarded signal ended the run *and* the workers
recorded a complete pre-emption checkpoint (`<run_dir>/preempted.json`); else the first failing
worker's code (e.g. 2 for a configuration error) or 128 + the signal number.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

from launch.rendezvous import NodePlan, reachable

FORWARDED_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
# How long the agent waits for workers to checkpoint after a forwarded signal. SLURM's USR1 comes
# 120 s before the time limit (slurm/*.sh), so a worker has that long at most anyway.
DEFAULT_SHUTDOWN_TIMEOUT_S = 110
TORCH_EXTENSIONS_CACHE = Path.home() / ".cache" / "gd-train" / "torch_extensions"


def torchrun_argv(plan: NodePlan, worker_argv: Sequence[str], shutdown_timeout_s: int = DEFAULT_SHUTDOWN_TIMEOUT_S) -> list[str]:
    """The exact torchrun command line of this node (what `--dry-run` prints)."""
    return ["torchrun", *plan.torchrun_args(), f"--signals-to-handle={FORWARDED_SIGNALS}",
            f"--shutdown-timeout={shutdown_timeout_s}", "--max-restarts=0", *worker_argv]


def worker_environment(plan: NodePlan) -> dict[str, str]:
    """Variables the workers need that torchrun does not set."""
    env: dict[str, str] = {}
    import torch

    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed would otherwise probe for (and warn about) GPUs
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        env["OMP_NUM_THREADS"] = str(max(1, cpus // plan.nproc_per_node))
    # DeepSpeed compiles a communication op on its first CPU run (~50 s); keep it between runs.
    env["TORCH_EXTENSIONS_DIR"] = str(TORCH_EXTENSIONS_CACHE)
    env["TOKENIZERS_PARALLELISM"] = "false"
    return env


def describe(plan: NodePlan, worker_argv: Sequence[str], shutdown_timeout_s: int = DEFAULT_SHUTDOWN_TIMEOUT_S) -> str:
    env = worker_environment(plan)
    env_text = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(env.items()) if k not in os.environ)
    command = shlex.join(torchrun_argv(plan, worker_argv, shutdown_timeout_s))
    return (f"node {plan.node_rank}/{plan.nnodes} ({plan.source}, master {plan.master_addr}:{plan.master_port or 'auto: a free port reserved at start'}): "
            f"{env_text + ' ' if env_text else ''}{command}")


def prebuild_cpu_comm_op() -> None:
    """DeepSpeed's CPU backend JIT-compiles a shared-memory communication op on first use (~50 s).
    Build (or just load) it here, once per node, before any rank starts: ranks do not race to compile
    it, and a signal sent to a starting rank's process group cannot kill the compiler halfway (that
    fails the rank instead of letting it checkpoint)."""
    from deepspeed.comm.torch import build_shm_op

    build_shm_op()


def run_node(plan: NodePlan, worker_argv: Sequence[str], *, preempt_marker: Optional[Path] = None,
             shutdown_timeout_s: int = DEFAULT_SHUTDOWN_TIMEOUT_S) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    for key, value in worker_environment(plan).items():
        os.environ.setdefault(key, value)
    TORCH_EXTENSIONS_CACHE.mkdir(parents=True, exist_ok=True)
    if os.environ.get("DS_ACCELERATOR") == "cpu":
        prebuild_cpu_comm_op()
    plan = reachable(plan)
    block = None
    if plan.source == "local":  # the rendezvous port: the one asked for, or a free one no other run holds
        from launch.ports import PortError, reserve

        try:
            block = reserve(1, base=plan.master_port, purpose="the local torchrun rendezvous")
        except PortError as exc:
            print(f"launch: error: {exc}", file=sys.stderr, flush=True)
            return 2
        plan = replace(plan, master_port=block.base)
    args = get_args_parser().parse_args(torchrun_argv(plan, worker_argv, shutdown_timeout_s)[1:])
    started = time.time()
    try:
        run(args)
        return 0
    except ChildFailedError as exc:
        # The root cause: a worker that exited on its own (code > 0) before one torchrun then signalled.
        deliberate = {r: f for r, f in exc.failures.items() if f.exitcode > 0} or exc.failures
        rank, failure = min(deliberate.items(), key=lambda item: (item[1].timestamp, item[0]))
        code = failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode
        print(f"launch: worker rank {rank} exited with {failure.exitcode} ({len(exc.failures)} failed on this node)",
              file=sys.stderr, flush=True)
        return code
    except SignalException as exc:
        if preempt_marker is not None and preempt_marker.is_file() and preempt_marker.stat().st_mtime >= started - 1:
            print(f"launch: {exc.sigval.name}: workers checkpointed and stopped ({preempt_marker})", flush=True)
            return 0
        print(f"launch: {exc.sigval.name}: workers stopped without a pre-emption checkpoint", file=sys.stderr, flush=True)
        return 128 + int(exc.sigval)
    finally:
        if block is not None:
            block.release()
