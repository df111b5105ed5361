"""One Ray node of a multi-node job (slurm/gen_teacher.sh runs one per node through `srun`): the head or a
node joining it, every port it opens from a block of `launch.ports` — so that the nodes of a job, or two
jobs, sharing one machine never clash (the local multi-node SLURM cluster runs every node on this host) —
in a temp dir of its own, killed by PID (all its processes, the workers its raylet forked included) on
SIGTERM/SIGINT; killed itself (srun cancelling its step sends SIGKILL), it takes Ray with it (the kernel
sends `ray start` SIGTERM: `die_with_parent`). Never `ray stop`.

    python -m launch.ray_start head --num-cpus N [--num-gpus G] [--node-ip-address IP]
                                    [--port GCS] [--dashboard-port PORT] --ports-file FILE
    python -m launch.ray_start node --address HOST:GCS --num-cpus N [--num-gpus G] [--node-ip-address IP]

The head writes {"gcs": PORT, "dashboard": PORT, ...} to FILE (atomically) once its job API is up: the
ports the other nodes join and the job is submitted to. `--port` / `--dashboard-port` pin those two
(outside the block); unset they come from the block too. The exit status is 0 after a stop by signal,
Ray's own otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from launch.ray_head import LocalRayHead, RayHeadError
from launch.ray_node import LocalRayNode


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m launch.ray_start", description=__doc__.split("\n\n")[0])
    parser.add_argument("role", choices=("head", "node"))
    parser.add_argument("--num-cpus", type=int, required=True)
    parser.add_argument("--num-gpus", type=int, default=0)
    parser.add_argument("--node-ip-address", default=None)
    parser.add_argument("--address", help="node: HOST:PORT of the head's GCS")
    parser.add_argument("--port", type=int, help="head: the GCS port (default: from the block)")
    parser.add_argument("--dashboard-port", type=int, help="head: the job API's port (default: from the block)")
    parser.add_argument("--ports-file", type=Path, help="head: where to write the ports it listens on")
    parser.add_argument("--timeout-s", type=float, default=300.0, help="how long the node may take to come up")
    args = parser.parse_args(argv)
    if args.role == "head" and args.ports_file is None:
        parser.error("head: --ports-file is required")
    if args.role == "node" and not args.address:
        parser.error("node: --address HOST:PORT is required")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    stop = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.append(signal.Signals(signum).name))
    try:
        if args.role == "head":
            node = LocalRayHead(num_cpus=args.num_cpus, num_gpus=args.num_gpus, node_ip=args.node_ip_address,
                               gcs_port=args.port, dashboard_port=args.dashboard_port, tied=True)
        else:
            node = LocalRayNode(None, num_cpus=args.num_cpus, num_gpus=args.num_gpus, address=args.address,
                               node_ip=args.node_ip_address, tied=True)
        node.start(timeout_s=args.timeout_s)
    except RayHeadError as exc:
        print(f"ray_start: error: {exc}", file=sys.stderr)
        return 1
    try:
        if args.role == "head":
            tmp = args.ports_file.with_name(f"{args.ports_file.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({**node.ports, "worker_ports": list(node.worker_ports)}))
            os.replace(tmp, args.ports_file)
        print(f"ray_start: {args.role} up on ports {min(node.block.ports)}-{max(node.block.ports)}"
              + (f" (gcs {node.gcs_port}, dashboard {node.dashboard_port})" if args.role == "head" else "")
              + f", temp dir {node.temp_dir}", flush=True)
        while not stop and node.proc.poll() is None:
            time.sleep(0.2)
        code = 0 if stop else node.proc.returncode
        print(f"ray_start: {args.role}: " + (f"{stop[0]}: stopping" if stop else f"ray exited with status {code}"),
              flush=True)
        if not stop:  # its log goes with its temp dir
            log = node.log_path.read_text(errors="replace").splitlines()
            print("\n".join(f"ray_start: {args.role}: | {line}" for line in log[-40:]), file=sys.stderr, flush=True)
    finally:
        # SIGKILL at once, not Ray's clean stop (seconds): srun's SIGKILL follows its SIGTERM after KillWait,
        # and Ray's processes, in a session of their own, would outlive this one.
        node.kill()
    return code


if __name__ == "__main__":
    sys.exit(main())
