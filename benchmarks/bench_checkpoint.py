"""Cost of the per-parameter checkpoint state against DeepSpeed's own checkpoint, on 2 CPU ranks (gloo).

A module holding only what trains in the 1.3B student — LoRA A/B of both adapters at rank 64 on the ten
adapted linears of each block (width 1536, FFN 8960) and the c_f projection — for `--blocks` of the 30
blocks (memory: the whole 1.3B set is 177 M fp32 parameters plus two moments, more than this machine
lends a benchmark), one AdamW step so the moments exist, then per ZeRO stage, median of `--repeats`:

  ours    gd_train.checkpoint's state save (safe_get_full_* per tensor, rank 0 writes safetensors+JSON)
          and load (every rank reads the whole tensors, safe_set_full_* keeps its partition)
  ds      engine.save_checkpoint / engine.load_checkpoint (DeepSpeed's partitioned pickles)

    python benchmarks/bench_checkpoint.py [--blocks 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DIM, FFN, RANK = 1536, 8960, 64
LINEARS = {"attn1.to_q": (DIM, DIM), "attn1.to_k": (DIM, DIM), "attn1.to_v": (DIM, DIM), "attn1.to_out.0": (DIM, DIM),
           "attn2.to_q": (DIM, DIM), "attn2.to_k": (DIM, DIM), "attn2.to_v": (DIM, DIM), "attn2.to_out.0": (DIM, DIM),
           "ffn.net.0.proj": (DIM, FFN), "ffn.net.2": (FFN, DIM)}


def build(blocks: int):
    """(the module, a view of it under the student's parameter names: what gd_train.checkpoint walks)."""
    import torch

    names: dict[str, str] = {}

    class Trainable(torch.nn.Module):  # direct parameters: ZeRO-3 gathers them around this forward
        def __init__(self):
            super().__init__()
            gen = torch.Generator().manual_seed(0)
            for b in range(blocks):
                for linear, (fan_in, fan_out) in LINEARS.items():
                    for adapter in ("etm", "sdd"):
                        for part, shape in (("lora_A", (RANK, fan_in)), ("lora_B", (fan_out, RANK))):
                            self._add(f"blocks.{b}.{linear}.{part}.{adapter}.weight", shape, gen)
            self._add("cf_proj.1.weight", (DIM, DIM), gen)
            self._add("cf_proj.1.bias", (DIM,), gen)

        def _add(self, name, shape, gen):
            key = name.replace(".", "__")
            self.register_parameter(key, torch.nn.Parameter(torch.randn(shape, generator=gen) * 0.01))
            names[key] = name

        def forward(self, x):
            return sum((p ** 2).sum() for p in self.parameters()) * x.mean()

    class StudentNames:
        def __init__(self, module):
            self.module = module

        def named_parameters(self):
            return ((names[key], p) for key, p in self.module.named_parameters())

    model = Trainable()
    return model, StudentNames(model)


def worker(args) -> None:
    import deepspeed
    import torch

    from gd_train import checkpoint, distributed

    distributed.init()
    model, student = build(args.blocks)
    optimizer = torch.optim.AdamW(
        [{"name": "etm", "params": [p for n, p in student.named_parameters() if ".etm." in n]},
         {"name": "sdd", "params": [p for n, p in student.named_parameters() if ".etm." not in n]}], lr=1e-3)
    config = {"train_batch_size": distributed.world_size(), "train_micro_batch_size_per_gpu": 1,
              "gradient_accumulation_steps": 1, "zero_optimization": {"stage": args.stage, "contiguous_gradients": True},
              "zero_allow_untested_optimizer": True, "bf16": {"enabled": False}, "fp16": {"enabled": False},
              "steps_per_print": 2**62}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    engine.backward(engine(torch.ones(1)))
    engine.step()
    root = Path(args.dir)
    times = {"ours_save": [], "ours_load": [], "ds_save": [], "ds_load": []}
    for r in range(args.repeats):
        folder = root / f"ours-{r}"
        if distributed.rank() == 0:
            folder.mkdir(parents=True)
        distributed.barrier()
        for key, call in (("ours_save", lambda: checkpoint._save_training_state(engine, student, folder)),
                          ("ours_load", lambda: checkpoint._load_training_state(engine, student, folder)),
                          ("ds_save", lambda: engine.save_checkpoint(str(root / "ds"), tag=f"t{r}", save_latest=False,
                                                                     exclude_frozen_parameters=True)),
                          ("ds_load", lambda: engine.load_checkpoint(str(root / "ds"), tag=f"t{r}",
                                                                     load_module_strict=False))):
            distributed.barrier()
            start = time.perf_counter()
            call()
            distributed.barrier()
            times[key].append(time.perf_counter() - start)
    if distributed.rank() == 0:
        sizes = {"ours": sum(f.stat().st_size for f in (root / "ours-0").rglob("*") if f.is_file()),
                 "ds": sum(f.stat().st_size for f in (root / "ds" / "t0").rglob("*") if f.is_file())}
        tensors = sum(1 for _ in model.named_parameters())
        numel = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for _, p in model.named_parameters())
        print("RESULT " + json.dumps({"stage": args.stage, "tensors": tensors, "numel": numel, "sizes": sizes,
                                      **{k: statistics.median(v) for k, v in times.items()}}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--stage", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--dir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    results = []
    for stage in (2, 3):
        work = Path(tempfile.mkdtemp(prefix="bench-ckpt-"))
        code = ("import sys; from launch.local import run_node; from launch.rendezvous import local_node; "
                f"sys.exit(run_node(local_node(2), ['benchmarks/bench_checkpoint.py', '--worker', '--stage', '{stage}', "
                f"'--blocks', '{args.blocks}', '--repeats', '{args.repeats}', '--dir', '{work}']))")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT,
                              env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
        shutil.rmtree(work, ignore_errors=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            raise SystemExit(f"ZeRO-{stage} run failed:\n{proc.stderr[-3000:]}")
        results.append(json.loads(lines[-1][len("RESULT "):]))
    r0 = results[0]
    print(f"{args.blocks} of 30 blocks: {r0['tensors']} trained tensors, {r0['numel'] / 1e6:.1f} M fp32 parameters; "
          f"2 CPU ranks (gloo), median of {args.repeats}")
    print(f"{'':8}{'ours save':>11}{'ds save':>9}{'ratio':>7}{'ours load':>11}{'ds load':>9}{'ratio':>7}"
          f"{'ours MB':>9}{'ds MB':>7}")
    for r in results:
        print(f"ZeRO-{r['stage']:<3}{r['ours_save']:>10.2f}s{r['ds_save']:>8.2f}s{r['ours_save'] / r['ds_save']:>7.2f}"
              f"{r['ours_load']:>10.2f}s{r['ds_load']:>8.2f}s{r['ours_load'] / r['ds_load']:>7.2f}"
              f"{r['sizes']['ours'] / 2**20:>9.1f}{r['sizes']['ds'] / 2**20:>7.1f}")


if __name__ == "__main__":
    main()
