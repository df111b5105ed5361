"""What each rank's memory holds under ZeRO-2 vs ZeRO-3: every live tensor storage, by kind.

    python benchmarks/bench_zero_census.py --size mid            # 4 Wan2.1-1.3B-wide blocks, ~2 GiB per rank
    python benchmarks/bench_zero_census.py --size full --steps 2 # all 30 blocks: ~7 GiB per rank

Resident-set figures (bench_full_arch.py) cannot tell tensors from allocator retention, nor see a
buffer whose pages were never touched (DeepSpeed's gradient bucket on CPU). Here a real 2-rank
`Trainer` (through launch.local, as `gd-train stage1` runs it; bench_full_arch.py's overrides and
synthetic shards) is stopped three times — after set-up, after step 2's backward (just before its
optimizer step), after the run — and `gc` lists every live CPU tensor storage, classed as: the
module's parameter data (frozen / trainable), ZeRO-3's partitions (`ds_tensor`), AdamW state, or other
(DeepSpeed's buffers: gradient bucket, gradient partitions, fp32 partitions), with the RSS beside it.
"""

from __future__ import annotations

import argparse
import collections
import gc
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

from bench_full_arch import SIZES, STAGE1, WAN_WIDTH, write_shards  # noqa: E402


def census(trainer, tag: str) -> None:
    import psutil
    import torch

    gc.collect()
    kinds_of: dict[int, str] = {}
    for p in trainer.engine.module.parameters():
        role = "trainable" if p.requires_grad else "frozen"
        kinds_of[p.data.untyped_storage().data_ptr()] = f"parameter data, {role}"
        if getattr(p, "ds_tensor", None) is not None:
            kinds_of[p.ds_tensor.untyped_storage().data_ptr()] = f"ZeRO-3 partition, {role}"
    optimizers = [trainer.engine.optimizer, getattr(trainer.engine.optimizer, "optimizer", None)]
    for opt in (o for o in optimizers if o is not None and hasattr(o, "state")):
        for state in opt.state.values():
            for value in state.values():
                if torch.is_tensor(value):
                    kinds_of[value.untyped_storage().data_ptr()] = "AdamW state"
    storages: dict[int, tuple[int, torch.dtype]] = {}
    for obj in gc.get_objects():
        try:
            if torch.is_tensor(obj) and obj.device.type == "cpu":
                storage = obj.untyped_storage()
                storages.setdefault(storage.data_ptr(), (storage.nbytes(), obj.dtype))
        except (RuntimeError, ReferenceError):  # tensor subclasses / views without a storage
            continue
    total, large = collections.Counter(), collections.defaultdict(list)
    for ptr, (nbytes, dtype) in storages.items():
        kind = kinds_of.get(ptr, f"other ({str(dtype).replace('torch.', '')})")
        total[kind] += nbytes
        if kind.startswith("other") and nbytes >= 64 * 2**20:
            large[kind].append(nbytes // 4 if dtype == torch.float32 else nbytes)
    rss = psutil.Process().memory_info().rss
    lines = [f"[rank {trainer.dist.rank}] {tag}: RSS {rss / 2**30:.2f} GiB, live tensor storages "
             f"{sum(total.values()) / 2**30:.2f} GiB"]
    lines += [f"    {kind:34s} {nbytes / 2**30:7.3f} GiB" for kind, nbytes in total.most_common() if nbytes >= 2**20]
    for kind, sizes in large.items():
        lines.append(f"    {kind}, storages >= 64 MiB (elements): {sorted(sizes, reverse=True)}")
    print("\n".join(lines), flush=True)


def rank_main(run_dir: str, *overrides: str) -> None:
    from gd_train.train.plan import load_run_config
    from gd_train.train.trainer import Trainer

    cfg = load_run_config(Path(run_dir), "stage1", str(REPO_ROOT / STAGE1), False, list(overrides))
    trainer = Trainer(cfg, Path(run_dir), resume=False)
    census(trainer, "after set-up")
    step, calls = trainer.engine.step, [0]

    def step_with_census(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 2 * trainer.plan.accumulation_steps:
            census(trainer, "step 2, after backward")
        return step(*args, **kwargs)

    trainer.engine.step = step_with_census
    trainer.run()
    census(trainer, "after the run")


def _rank0_lines(stdout: str) -> list[str]:
    """Rank 0's census blocks and the step lines (rank 1's blocks interleave with them)."""
    kept, ours = [], False
    for line in stdout.splitlines():
        if line.startswith("[rank "):
            ours = line.startswith("[rank 0]")
        if line.startswith("step ") or (ours and (line.startswith("[rank 0]") or line.startswith("    "))):
            kept.append(line)
    return kept


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="mid")
    ap.add_argument("--stages", default="2,3", help="ZeRO stages, one run each")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--keep", type=Path, default=None, help="folder for the shards (reused) and runs")
    ap.add_argument("--rank", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)  # one rank: RUN_DIR OVERRIDES
    args = ap.parse_args()
    if args.rank is not None:
        rank_main(*args.rank)
        return
    root = args.keep or Path(tempfile.mkdtemp(prefix="bench_zero_census_"))
    shards = root / f"shards-{args.size}"
    if not shards.is_dir():
        write_shards(shards, [*WAN_WIDTH, *SIZES[args.size]], samples=4 * args.steps)
    for stage in args.stages.split(","):
        run_dir = root / f"census-{args.size}-zero{stage}"
        overrides = [*WAN_WIDTH, *SIZES[args.size], f"train.zero_stage={stage}", f"data.shards={shards}",
                     f"train.max_steps={args.steps}", "train.epochs=100", "train.global_batch_size=2",
                     "train.checkpoint_every=100000", "train.video_every=0", "data.num_workers=0"]
        code = ("import sys; from launch.local import run_node; from launch.rendezvous import local_node; "
                f"sys.exit(run_node(local_node(2), [{__file__!r}, '--rank', {str(run_dir)!r}, *{overrides!r}]))")
        print(f"## ZeRO-{stage}, {args.size}", flush=True)
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
               "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
        proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
        print("\n".join(_rank0_lines(proc.stdout)), flush=True)
        if proc.returncode != 0:
            raise SystemExit(f"ZeRO-{stage} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")


if __name__ == "__main__":
    main()
