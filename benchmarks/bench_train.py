"""Training throughput on this machine: stage 1 and stage 2, tiny model, 1 vs 2 ranks (CPU, gloo).

Each configuration is a real `gd-train` run (DeepSpeed ZeRO-2, the shard reader with one loader worker
per rank, real tiny shards written first); the figures come from the run's own metrics.jsonl:
samples/s and data-wait fraction as medians over the steps after warm-up, and the peak resident memory
of the largest rank. The global batch is the same for 1 and 2 ranks (accumulation makes up the
difference), so samples/s compare directly.

    python benchmarks/bench_train.py [--steps 24] [--warmup 4] [--out runs/bench-train]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tests"))

from train_utils import TINY_STAGE1, TINY_STAGE2, write_tiny_shards  # noqa: E402


def run(stage: str, nproc: int, run_dir: Path, shards: Path, steps: int, extra: list[str], threads: int) -> dict:
    config = TINY_STAGE1 if stage == "stage1" else TINY_STAGE2
    command = [sys.executable, "-m", "gd_train.cli", stage, "--config", config, "--nproc", str(nproc),
               f"output_dir={run_dir}", f"data.shards={shards}", f"train.max_steps={steps}", "train.epochs=100",
               "train.checkpoint_every=100000", *extra]
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": str(threads)})
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{proc.stderr[-3000:]}")
    wall_s = time.perf_counter() - start
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"records": records, "wall_s": wall_s}


def summarise(records: list[dict], warmup: int) -> dict:
    steady = records[warmup:]
    return {"samples_per_s": statistics.median(r["throughput/samples_per_s"] for r in steady),
            "step_time_s": statistics.median(r["throughput/step_time_s"] for r in steady),
            "data_wait": statistics.median(r["throughput/data_wait_fraction"] for r in steady),
            "peak_rss_gib": max(r["system/peak_rss_memory_gib"] for r in records)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--out", default="runs/bench-train")
    parser.add_argument("--threads", type=int, default=1,
                        help="OMP threads per rank (1: ranks x threads never exceeds this 2-core machine; on a "
                             "shared, loaded machine 2 threads per rank spin in OpenMP barriers and run far slower)")
    args = parser.parse_args()
    out = REPO_ROOT / args.out
    shutil.rmtree(out, ignore_errors=True)
    shards = out / "shards"
    write_tiny_shards(shards, 64, samples_per_shard=8)

    # Stage 2 starts from a stage-1 checkpoint: the 2-rank stage-1 run below provides it.
    rows = []
    for stage, global_batch in (("stage1", 4), ("stage2", 2)):
        for nproc in (1, 2):
            run_dir = out / f"{stage}-{nproc}rank"
            extra = [f"train.global_batch_size={global_batch}"]
            if stage == "stage2":
                extra.append(f"train.init_from={out / 'stage1-2rank'}")
            result = run(stage, nproc, run_dir, shards, args.steps, extra, args.threads)
            rows.append((stage, nproc, global_batch, global_batch // nproc, summarise(result["records"], args.warmup),
                         result["wall_s"]))

    import torch

    print(f"gd-train training benchmark — {time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPU cores (load average {os.getloadavg()[0]:.1f} at the end), torch {torch.__version__}, "
          f"tiny model (configs/tiny/*.yaml), {args.threads} OMP thread(s) per rank, {args.steps} steps per run, "
          f"medians over steps {args.warmup + 1}..{args.steps}")
    print()
    print("| stage | ranks | global batch | accumulation | samples/s | step time (s) | data-wait fraction | "
          "peak RSS per rank (GiB) | run wall time (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for stage, nproc, global_batch, accumulation, s, wall_s in rows:
        print(f"| {stage} | {nproc} | {global_batch} | {accumulation} | {s['samples_per_s']:.1f} | {s['step_time_s']:.3f} | "
              f"{s['data_wait']:.1%} | {s['peak_rss_gib']:.2f} | {wall_s:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
