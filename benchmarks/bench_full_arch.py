"""Per-rank memory of stage 1 under ZeRO-2 vs ZeRO-3 with a frozen bf16 base, at the real width.

    python benchmarks/bench_full_arch.py --size mid            # 4 Wan2.1-1.3B blocks (dim 1536, ffn 8960)
    python benchmarks/bench_full_arch.py --size full --steps 4 # all 30 blocks: ~7-12 GiB per rank
    python benchmarks/bench_full_arch.py --variants zero2,zero3,zero2-glibc,zero3-glibc

Each variant is a real `gd-train stage1 --nproc 2` run (DeepSpeed over gloo, 2 CPU ranks, activation
checkpointing on, random weights, micro-batch 1 on each rank, `train.video_every=0`) on synthetic shards
at 32x32 px. A sampler reads every rank's resident set (VmRSS) every 0.25 s; the table gives each
rank's peak (start-up included), its peak during step 2 and during the last step (flat = the same), and
the loss of every step
(ZeRO-2 and ZeRO-3 must agree to bf16 rounding: the same data and seeds). `zero3-ds-defaults` is
ZeRO-3 with DeepSpeed's own live-parameter and reuse-distance limits (1e9 elements each), which is
what `train.zero_stage=3` ran before they were set from the model (gd_train/train/trainer.py). Any
variant + `-glibc` (e.g. `zero3-glibc`) runs with glibc's adaptive mmap threshold instead of the fixed
one the trainer sets on CPU ranks (`train.cpu_mmap_threshold=null`; gd_train/train/host_memory.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from gd_train.config import latent_shape, load_config  # noqa: E402
from gd_train.data.shards import SHARD_NAME, TeacherSample, encode_sample  # noqa: E402

WAN_WIDTH = ["model.transformer.num_attention_heads=12", "model.transformer.attention_head_dim=128",
             "model.transformer.ffn_dim=8960", "model.transformer.text_dim=4096", "model.transformer.freq_dim=256",
             "model.dtype=bfloat16", "video.height=32", "video.width=32", "video.num_frames=13", "data.min_frames=null",
             "student.etm_lora.rank=64", "student.etm_lora.alpha=64", "student.sdd_lora.rank=64",
             "student.sdd_lora.alpha=64", "student.gradient_checkpointing=true"]
SIZES = {"mid": ["model.transformer.num_layers=4"], "full": ["model.transformer.num_layers=30"]}
VARIANTS = {"zero2": ["train.zero_stage=2"], "zero3": ["train.zero_stage=3"],
            "zero3-ds-defaults": ["train.zero_stage=3", "train.zero3_max_live_parameters=1000000000",
                                  "train.zero3_max_reuse_distance=1000000000"]}
# The trainer fixes glibc's mmap threshold on CPU ranks (train.cpu_mmap_threshold, 1 MiB); a `-glibc`
# variant runs with glibc's adaptive threshold instead, under which freed gather buffers stay resident.
for _name in list(VARIANTS):
    VARIANTS[_name + "-glibc"] = [*VARIANTS[_name], "train.cpu_mmap_threshold=null"]
STAGE1 = "configs/tiny/stage1.yaml"


def write_shards(folder: Path, overrides: list[str], samples: int) -> None:
    import webdataset as wds

    cfg = load_config(REPO_ROOT / STAGE1, overrides)
    C, F, H, W = latent_shape(cfg)
    gen = torch.Generator().manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(folder / SHARD_NAME.format(index=0))) as sink:
        for i in range(samples):
            sink.write(encode_sample(TeacherSample(
                key=f"s{i:04d}", latents=torch.randn(C, F, H, W, generator=gen),
                prompt_embeds=torch.randn(8, cfg.model.transformer.text_dim, generator=gen),
                meta={"caption": f"prompt {i}", "seed": i})))


class RssSampler(threading.Thread):
    """VmRSS of every python process under `root` (the launcher's ranks), sampled until stopped."""

    def __init__(self, root: int, metrics: Path, period: float = 0.25):
        super().__init__(daemon=True)
        self.root, self.metrics, self.period = psutil.Process(root), metrics, period
        self.series: dict[int, list[tuple[int, int]]] = {}  # pid -> (steps finished, RSS)
        self.stop_flag = threading.Event()

    def run(self) -> None:
        while not self.stop_flag.is_set():
            try:
                steps = self.metrics.read_text().count("\n") if self.metrics.is_file() else 0
                for p in self.root.children(recursive=True):
                    if "gd_train.train.trainer" in " ".join(p.cmdline()):
                        self.series.setdefault(p.pid, []).append((steps, p.memory_info().rss))
            except psutil.Error:
                pass
            time.sleep(self.period)


def run_variant(name: str, size: str, steps: int, shards: Path, out: Path, threads: int) -> dict:
    overrides = [*WAN_WIDTH, *SIZES[size], *VARIANTS[name]]
    cmd = [sys.executable, "-m", "gd_train.cli", "stage1", "--config", STAGE1, "--nproc", "2",
           f"output_dir={out}", f"data.shards={shards}", f"train.max_steps={steps}", "train.epochs=100",
           "train.global_batch_size=2", "train.checkpoint_every=100000", "train.video_every=0",
           "data.num_workers=0", *overrides]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = RssSampler(proc.pid, out / "metrics.jsonl")
    sampler.start()
    log, _ = proc.communicate()
    sampler.stop_flag.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed ({proc.returncode}):\n{log[-4000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    ranks = []
    longest = max((len(s) for s in sampler.series.values()), default=0)
    for pid, series in sorted(sampler.series.items()):
        if len(series) < longest // 4:  # a rank's short-lived fork (e.g. a subprocess before its exec)
            continue
        by_step: dict[int, int] = {}
        for steps, rss in series:  # the highest RSS seen while step `steps + 1` ran
            by_step[steps] = max(rss, by_step.get(steps, 0))
        ranks.append({"peak_gib": max(by_step.values()) / 2**30,
                      "step2_gib": by_step.get(1, 0) / 2**30,
                      "last_gib": by_step.get(max(k for k in by_step if k < len(records)), 0) / 2**30,
                      "per_step_gib": [round(by_step[k] / 2**30, 3) for k in sorted(by_step)]})
    return {"variant": name, "wall_s": time.perf_counter() - start, "ranks": ranks,
            "losses": [r.get("loss") for r in records if "loss" in r],  # rank 0's metrics: the global mean
            "step_s": [r.get("throughput/step_time_s") for r in records if "throughput/step_time_s" in r]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="mid")
    ap.add_argument("--variants", default="zero2,zero3,zero3-ds-defaults")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1, help="OMP threads per rank")
    ap.add_argument("--keep", type=Path, default=None)
    args = ap.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="bench_full_arch_"))
    shards = root / f"shards-{args.size}"
    if not shards.is_dir():
        write_shards(shards, [*WAN_WIDTH, *SIZES[args.size]], samples=4 * args.steps)
    print(f"# bench_full_arch.py --size {args.size} --steps {args.steps}  {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} "
          f"UTC  {os.cpu_count()} CPU(s), load average {os.getloadavg()[0]:.2f}; 2 ranks, micro-batch 1 each")
    results = []
    for name in args.variants.split(","):
        out = root / f"run-{args.size}-{name}"
        shutil.rmtree(out, ignore_errors=True)
        r = run_variant(name, args.size, args.steps, shards, out, args.threads)
        results.append(r)
        print(f"{name}: done in {r['wall_s']:.0f} s", file=sys.stderr, flush=True)
    print("\n| variant | rank | peak RSS (GiB) | peak during step 2 (GiB) | peak during the last step (GiB) | median step (s) |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        step = sorted(r["step_s"])[len(r["step_s"]) // 2] if r["step_s"] else float("nan")
        for i, m in enumerate(r["ranks"]):
            print(f"| {r['variant']} | {i} | {m['peak_gib']:.2f} | {m['step2_gib']:.2f} | {m['last_gib']:.2f} | "
                  f"{step:.2f} |")
    print("\nper-step peak RSS of rank 0 (GiB; index 0 = start-up and step 1):")
    for r in results:
        print(f"  {r['variant']:18s} {r['ranks'][0]['per_step_gib'] if r['ranks'] else []}")
    print("\nlosses per step:")
    for r in results:
        print(f"  {r['variant']:18s} " + " ".join(f"{x:.5f}" if isinstance(x, float) else str(x) for x in r["losses"]))
    if len(results) >= 2 and all(isinstance(x, float) for r in results for x in r["losses"]):
        ref = results[0]["losses"]
        for r in results[1:]:
            worst = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(ref, r["losses"]))
            print(f"  max relative loss difference {r['variant']} vs {results[0]['variant']}: {worst:.2e}")
    print(f"\nload average at end: {os.getloadavg()[0]:.2f}")
    if args.keep is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
