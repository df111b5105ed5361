"""Linear cost of streaming (DESIGN §3.4): time and peak memory per generated chunk versus F.

For each model size and latent frame count F it measures
  (a) stream    — the student with KV caches (Algorithm 1),
  (b) recompute — the student without caches (ETM over the whole history every chunk),
  (c) teacher   — the bidirectional teacher denoising all F frames with the same step count,
and prints seconds per chunk, peak memory, and the ratios that matter: (a) at the largest F against
(a) at the smallest, and (c) against (a). Every measurement runs in a fresh subprocess, so the peak
RSS it reports (CPU) is its own; on CUDA it is `max_memory_allocated`.

    python benchmarks/bench_stream.py                       # tiny + mid, F = 8..128, CPU
    python benchmarks/bench_stream.py --sizes mid --frames 8,64 --modes stream,teacher
    python benchmarks/bench_stream.py --overhead 1,2 --sizes mid --frames 8,128 --modes stream,merged

`merged` is (a) with per-adapter merged weights (`StreamSettings.merged_adapters`, what gd-generate
uses) instead of PEFT's LoRA layers. `--overhead THREADS` measures, per thread count and in one
process, round-robin so that machine load hits all three alike: the generator through PEFT, the
generator with merged weights, and the raw transformer work a chunk needs — the same six passes
(4 SDD denoising steps, one SDD context pass, one ETM pass against the window cache) called directly
on a plain diffusers model without any LoRA — and prints generator / raw per chunk.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Model sizes: overrides on top of configs/model/tiny.yaml (same diffusers classes, random weights).
SIZES = {
    "tiny": [],
    "mid": ["model.transformer.num_attention_heads=4", "model.transformer.attention_head_dim=64",
            "model.transformer.ffn_dim=1024", "model.transformer.num_layers=4", "model.transformer.text_dim=32",
            "video.height=128", "video.width=192"],
}
# (b) and (c) grow with F; past these sizes they take minutes per point on a 2-core CPU.
LIMITS = {("mid", "recompute"): 32, ("mid", "teacher"): 64, ("tiny", "recompute"): 64}


def _trend(times: list[float]) -> Optional[tuple[float, float]]:
    """The fitted change of per-chunk time over the stream, as a fraction of the median chunk, and its
    standard error: every chunk counts, not just 8 at each end."""
    n = len(times)
    if n < 16:
        return None
    xs = list(range(n))
    slope, intercept = statistics.linear_regression(xs, times)
    residual = sum((t - (intercept + slope * x)) ** 2 for x, t in zip(xs, times)) / (n - 2)
    spread = sum((x - (n - 1) / 2) ** 2 for x in xs)
    scale = (n - 1) / statistics.median(times)
    return slope * scale, (residual / spread) ** 0.5 * scale


def count_flops(size: str, mode: str, frames: int) -> list[int]:
    """FLOPs of every chunk of one stream (torch.utils.flop_counter around each chunk): what timing on a
    noisy machine cannot settle, whether a chunk's work depends on its position f."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from gd_train.config import load_config
    from gd_train.infer.stream import StreamingGenerator, StreamSettings
    from gd_train.model.student import GreedyDistillStudent

    cfg = load_config(ROOT / "configs/model/tiny.yaml", SIZES[size])
    torch.manual_seed(0)
    student = GreedyDistillStudent.from_config(cfg)
    text = torch.randn(1, 64, cfg.model.transformer.text_dim)
    settings = StreamSettings.from_config(cfg, kv_cache=(mode != "recompute"), merged_adapters=(mode == "merged"))
    chunks, counts = iter(StreamingGenerator(student, settings).stream(text, frames, seed=0)), []
    while True:
        with FlopCounterMode(display=False) as counter:
            if next(chunks, None) is None:
                return counts
        counts.append(counter.get_total_flops())


def measure(size: str, mode: str, frames: int, device: str, warmup: int) -> dict:
    import torch

    from gd_train.config import latent_shape, load_config
    from gd_train.infer.stream import StreamingGenerator, StreamSettings
    from gd_train.model.student import GreedyDistillStudent

    cfg = load_config(ROOT / "configs/model/tiny.yaml", SIZES[size])
    torch.manual_seed(0)
    student = GreedyDistillStudent.from_config(cfg, device=device)
    text = torch.randn(1, 64, cfg.model.transformer.text_dim, device=device)
    settings = StreamSettings.from_config(cfg, kv_cache=(mode != "recompute"), merged_adapters=(mode == "merged"))
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def run_student(n: int) -> list[float]:
        times, t0 = [], time.perf_counter()
        for _ in StreamingGenerator(student, settings).stream(text, n, seed=0):
            sync()
            t1 = time.perf_counter()
            times.append(t1 - t0)
            t0 = t1
        return times

    def run_teacher(n: int) -> list[float]:
        c, _, h, w = latent_shape(cfg, n)
        x = torch.randn(1, c, n, h, w, device=device)
        t0 = time.perf_counter()
        with torch.no_grad():
            for sigma, nxt in zip(settings.sigmas[:-1], settings.sigmas[1:]):
                x = x + (nxt - sigma) * student.teacher_velocity(x, sigma * 1000.0, text)
        sync()
        return [(time.perf_counter() - t0) / n] * n  # all chunks come out together

    run = run_teacher if mode == "teacher" else run_student
    run(min(frames, warmup))  # warm-up (allocator, kernels, autotune) at a small size
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = run(frames)
    if cuda:
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB -> MB (Linux)
    # Streaming: the median chunk once the window is full (chunk 0 has no context, chunks 1..w a
    # partial window); the median keeps a stray scheduler hiccup on this shared CPU out of the figure.
    steady = times[min(len(times) - 1, student.window + 1):] if mode != "teacher" else times
    first_full = min(len(times) - 1, student.window + 1)
    early, late = times[first_full:first_full + 8], times[-8:]
    return {"size": size, "mode": mode, "F": frames, "s_per_chunk": statistics.median(steady),
            "early_chunk_s": statistics.median(early), "late_chunk_s": statistics.median(late),
            "trend": _trend(steady) if mode != "teacher" else None,
            "last_chunk_s": times[-1], "total_s": sum(times), "peak_mb": peak_mb,
            "growth_mb": peak_mb - base_rss / 1024 if not cuda else None}


def measure_overhead(size: str, threads: int, chunks: int, rounds: int) -> dict:
    import copy

    import torch

    from gd_train.config import load_config
    from gd_train.infer.stream import StreamingGenerator, StreamSettings
    from gd_train.model.backbone import load_transformer
    from gd_train.model.forward import WanPass
    from gd_train.model.student import GreedyDistillStudent

    torch.set_num_threads(threads)
    cfg = load_config(ROOT / "configs/model/tiny.yaml", SIZES[size])
    torch.manual_seed(0)
    student = GreedyDistillStudent.from_config(cfg).eval()
    text = torch.randn(1, 64, cfg.model.transformer.text_dim)

    class PlainPass(WanPass):  # a diffusers model without LoRA: there is no adapter to select
        def select_adapter(self, i, adapter):
            pass

    raw = copy.copy(student)  # the student's own pass layouts, run on the plain model
    raw.runner = PlainPass(load_transformer(cfg).eval(), backend=student.runner.backend)
    # Two adapters are two weight sets: the ETM pass and the SDD passes of a chunk cannot share one.
    # raw2 runs them on two plain models (what merged weights amount to), raw on one (a lower bound
    # that ignores this; on a CPU the second weight set also competes for the caches).
    raw_sdd = copy.copy(student)
    raw_sdd.runner = PlainPass(load_transformer(cfg).eval(), backend=student.runner.backend)
    sigmas = StreamSettings.from_config(cfg).sigmas
    first = student.window + 1  # chunks before this have a partial ETM window

    def per_chunk(times: list[float]) -> float:
        return statistics.median(times[first:])

    def generator(merged: bool) -> float:
        settings = StreamSettings.from_config(cfg, merged_adapters=merged)
        times, t0 = [], time.perf_counter()
        for _ in StreamingGenerator(student, settings).stream(text, chunks, seed=0):
            t1 = time.perf_counter()
            times.append(t1 - t0)
            t0 = t1
        return per_chunk(times)

    @torch.no_grad()
    def raw_passes(sdd) -> float:
        etm_cache, sdd_cache = raw.new_caches(1, *settings_hw(cfg))
        x = torch.randn(1, cfg.model.transformer.in_channels, 1, *settings_hw(cfg))
        cond, times = None, []
        for f in range(chunks):
            t0 = time.perf_counter()
            for sigma in sigmas[:-1]:
                sdd.sdd_velocity_step(x, sigma, f, cond, sdd_cache, text)
            sdd.sdd_context_step(x, f, sdd_cache, text)
            cond = raw.etm_step(x, f, etm_cache, text)
            times.append(time.perf_counter() - t0)
        return per_chunk(times)

    runs = {"peft": generator, "merged": generator, "raw": raw_passes, "raw2": raw_passes}
    args = {"peft": (False,), "merged": (True,), "raw": (raw,), "raw2": (raw_sdd,)}
    for name in runs:  # warm-up
        runs[name](*args[name])
    got: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name in runs:
            got[name].append(runs[name](*args[name]))
    out = {name: statistics.median(v) for name, v in got.items()}
    extra = student.runner.merged.extra_bytes() if student.runner.merged is not None else 0
    base = sum(p.numel() * p.element_size() for p in student.base_parameters().values())
    return {"size": size, "threads": threads, **out, "merged_extra_mb": extra / 2**20, "base_mb": base / 2**20}


def _window(size: str) -> int:
    from gd_train.config import load_config

    return int(load_config(ROOT / "configs/model/tiny.yaml", SIZES[size]).student.etm_window)


def settings_hw(cfg) -> tuple[int, int]:
    from gd_train.config import latent_shape

    _, _, h, w = latent_shape(cfg, 1)
    return h, w


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="tiny,mid")
    ap.add_argument("--frames", default="8,16,32,64,128")
    ap.add_argument("--modes", default="stream,recompute,teacher")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--overhead", default=None, help="thread counts, e.g. 1,2: generator vs raw passes per chunk")
    ap.add_argument("--overhead-chunks", type=int, default=10)
    ap.add_argument("--overhead-rounds", type=int, default=3)
    ap.add_argument("--count-flops", action="store_true", help="FLOPs of every chunk of an F-chunk stream (largest "
                    "--frames; --modes stream and/or merged) instead of timing")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # size,mode,F: run in this process
    ap.add_argument("--one-overhead", default=None, help=argparse.SUPPRESS)  # size,threads
    args = ap.parse_args()

    if args.one_overhead:
        size, threads = args.one_overhead.split(",")
        print(json.dumps(measure_overhead(size, int(threads), args.overhead_chunks, args.overhead_rounds)))
        return

    if args.count_flops:
        frames = max(int(f) for f in args.frames.split(","))
        for size in args.sizes.split(","):
            for mode in (m for m in args.modes.split(",") if m in ("stream", "merged")):
                counts = count_flops(size, mode, frames)
                window = _window(size)
                full = counts[window + 1:]
                print(f"{size} {mode}: FLOPs per chunk over {frames} chunks: chunk 0 {counts[0]:,}, chunks 1-{window} "
                      f"{sorted(set(counts[1:window + 1]))}, full-window chunks {window + 1}-{frames - 1}: min "
                      f"{min(full):,} max {max(full):,} ({'all equal' if len(set(full)) == 1 else 'they differ'})")
        return

    if args.one:
        size, mode, frames = args.one.split(",")
        print(json.dumps(measure(size, mode, int(frames), args.device, args.warmup)))
        return

    rows = []
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    if args.overhead:
        print(f"load average at start: {os.getloadavg()[0]:.2f}")
        print("\n| size | threads | generator, PEFT (ms / chunk) | generator, merged (ms / chunk) | raw passes, "
              "2 plain models (ms / chunk) | raw passes, 1 plain model (ms / chunk) | PEFT / raw2 | merged / raw2 | "
              "merged / raw | merged weights (MB; base: MB) |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        for size in args.sizes.split(","):
            for threads in (int(t) for t in args.overhead.split(",")):
                out = subprocess.run([sys.executable, __file__, "--one-overhead", f"{size},{threads}",
                                      "--overhead-chunks", str(args.overhead_chunks),
                                      "--overhead-rounds", str(args.overhead_rounds)],
                                     capture_output=True, text=True, env=dict(env, OMP_NUM_THREADS=str(threads)),
                                     check=True)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                print(f"| {size} | {threads} | {r['peft'] * 1e3:.2f} | {r['merged'] * 1e3:.2f} | {r['raw2'] * 1e3:.2f} | "
                      f"{r['raw'] * 1e3:.2f} | {r['peft'] / r['raw2']:.3f} | {r['merged'] / r['raw2']:.3f} | "
                      f"{r['merged'] / r['raw']:.3f} | {r['merged_extra_mb']:.1f}; {r['base_mb']:.1f} |", flush=True)
        print(f"load average at end: {os.getloadavg()[0]:.2f}\n")
        if not args.modes:
            return
    for size in args.sizes.split(","):
        for mode in args.modes.split(","):
            for frames in (int(f) for f in args.frames.split(",")):
                if frames > LIMITS.get((size, mode), 10**9):
                    rows.append({"size": size, "mode": mode, "F": frames, "skipped": True})
                    continue
                out = subprocess.run([sys.executable, __file__, "--one", f"{size},{mode},{frames}",
                                      "--device", args.device, "--warmup", str(args.warmup)],
                                     capture_output=True, text=True, env=env, check=True)
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
                r = rows[-1]
                print(f"{size:5s} {mode:9s} F={frames:4d}  {r['s_per_chunk'] * 1e3:9.2f} ms/chunk  "
                      f"peak {r['peak_mb']:8.1f} MB", file=sys.stderr, flush=True)

    print("\n| size | mode | F | ms / chunk | peak memory (MB) | growth during the run (MB) |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        if r.get("skipped"):
            print(f"| {r['size']} | {r['mode']} | {r['F']} | not run (grows with F; too slow here) | | |")
        else:
            growth = "" if r["growth_mb"] is None else f"{r['growth_mb']:.1f}"
            print(f"| {r['size']} | {r['mode']} | {r['F']} | {r['s_per_chunk'] * 1e3:.2f} | {r['peak_mb']:.0f} | {growth} |")
    print()
    for size in args.sizes.split(","):
        got = {(r["mode"], r["F"]): r for r in rows if r["size"] == size and not r.get("skipped")}
        fs = sorted(f for m, f in got if m == "stream")
        for mode in ("stream", "merged"):
            mfs = sorted(f for m, f in got if m == mode)
            if len(mfs) < 2:
                continue
            a, b = got[(mode, mfs[0])], got[(mode, mfs[-1])]
            print(f"{size}: {mode} ms/chunk F={mfs[-1]} / F={mfs[0]} = {b['s_per_chunk'] / a['s_per_chunk']:.3f}; "
                  f"peak memory {a['peak_mb']:.0f} -> {b['peak_mb']:.0f} MB")
            print(f"{size}: within the {mode} F={mfs[-1]} stream, last 8 chunks / first 8 full-window chunks = "
                  f"{b['late_chunk_s'] / b['early_chunk_s']:.3f} ({b['early_chunk_s'] * 1e3:.1f} -> "
                  f"{b['late_chunk_s'] * 1e3:.1f} ms; same process, so machine load cancels)")
            if b.get("trend"):
                change, err = b["trend"]
                print(f"{size}: within the {mode} F={mfs[-1]} stream, least-squares line through every full-window "
                      f"chunk: {change:+.1%} from its first to its last chunk (± {2 * err:.1%}, 2 standard errors)")
        for f in fs:
            for other in ("recompute", "teacher"):
                if (other, f) in got:
                    print(f"{size}: F={f} {other} / stream per chunk = "
                          f"{got[(other, f)]['s_per_chunk'] / got[('stream', f)]['s_per_chunk']:.2f}")


if __name__ == "__main__":
    main()
