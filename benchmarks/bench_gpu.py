"""Speed of streaming generation and of a stage-1 step at the full Wan2.1-T2V-1.3B config (one GPU).

Random weights: speed does not depend on weight values. Measures, with warm-up first and CUDA events
(wall clock on CPU):
  - the student streaming 81 and 301 video frames (21 and 76 latent frames) with T denoising steps:
    video frames/s without and with VAE decode (stated separately), first-chunk latency, per-chunk
    time at both lengths, peak memory;
  - the bidirectional teacher on the 81-frame clip at 50 and at 4 steps (video frames/s, latency);
  - the ratios (student vs teacher, per-chunk 301 vs 81);
  - optionally (--train) one stage-1 step at 81 frames with activation checkpointing: step time,
    tokens/s, MFU against the FLOPs counted by benchmarks/flops.py, peak memory.
The cost of torch.compile / autotuning (first calls) is reported apart from the timed runs.

    python benchmarks/bench_gpu.py --train                              # on the GPU: the full config
    python benchmarks/bench_gpu.py --device cpu --config configs/model/tiny.yaml --frames 9,21 \\
        --teacher-steps 4 --train --dtype float32                       # proves the script on CPU
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


class Timer:
    """CUDA events on a GPU, perf_counter on CPU; `stop()` returns seconds since `start()`."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def start(self) -> None:
        if self.cuda:
            self._a = torch.cuda.Event(enable_timing=True)
            self._b = torch.cuda.Event(enable_timing=True)
            self._a.record()
        else:
            self._t = time.perf_counter()

    def stop(self) -> float:
        if self.cuda:
            self._b.record()
            self._b.synchronize()
            return self._a.elapsed_time(self._b) / 1e3
        return time.perf_counter() - self._t


def peak_memory_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def stream_run(student, settings, text, latent_frames: int, device, vae_decoder_factory=None) -> dict:
    from gd_train.infer.stream import StreamingGenerator

    timer = Timer(device)
    decoder = vae_decoder_factory() if vae_decoder_factory else None
    chunk_s, decode_s = [], []
    reset_peak(device)
    gen = StreamingGenerator(student, settings).stream(text, latent_frames, seed=0)
    while True:
        timer.start()
        frame = next(gen, None)
        if frame is None:
            break
        chunk_s.append(timer.stop())
        if decoder is not None:
            timer.start()
            decoder.decode(frame)
            decode_s.append(timer.stop())
    video_frames = 1 + 4 * (latent_frames - 1)
    gen_s = sum(chunk_s)
    steady = chunk_s[len(chunk_s) // 4:] or chunk_s
    out = {"latent_frames": latent_frames, "video_frames": video_frames, "generate_s": gen_s,
           "fps": video_frames / gen_s, "first_chunk_s": chunk_s[0], "chunk_s": sum(steady) / len(steady),
           "peak_gb": peak_memory_gb(device)}
    if decoder is not None:
        out["fps_with_vae"] = video_frames / (gen_s + sum(decode_s))
        out["first_frame_with_vae_s"] = chunk_s[0] + decode_s[0]
    return out


def teacher_run(student, settings_sigmas, text, latent_frames: int, height: int, width: int, device, dtype) -> dict:
    timer = Timer(device)
    x = torch.randn(1, 16, latent_frames, height, width, device=device, dtype=dtype)
    reset_peak(device)
    timer.start()
    with torch.no_grad():
        for sigma, nxt in zip(settings_sigmas[:-1], settings_sigmas[1:]):
            x = x + (nxt - sigma) * student.teacher_velocity(x, sigma * 1000.0, text)
    total = timer.stop()
    video_frames = 1 + 4 * (latent_frames - 1)
    return {"steps": len(settings_sigmas) - 1, "video_frames": video_frames, "total_s": total,
            "fps": video_frames / total, "latency_s": total, "peak_gb": peak_memory_gb(device)}


def train_step_run(cfg, student, text, latent_frames: int, height: int, width: int, device, dtype, steps: int,
                   config: str, overrides: list[str]) -> dict:
    from flops import meta_student, stage1_step_flops

    student.set_gradient_checkpointing(True)
    opt = torch.optim.AdamW(student.trainable_parameters(), lr=1e-5)
    clip = torch.randn(1, 16, latent_frames, height, width, device=device, dtype=dtype)
    first = 0 if cfg.student.train_first_frame else 1
    noise = torch.randn_like(clip[:, :, first:])
    timer = Timer(device)

    def step() -> None:
        sigmas = torch.rand(1, noise.shape[2], device=device)
        s = sigmas[:, None, :, None, None].to(dtype)
        out = student.parallel_forward(clip, (1 - s) * clip[:, :, first:] + s * noise, sigmas, text)
        loss = (out.velocity.float() - (noise - clip[:, :, first:]).float()).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    timer.start()
    step()  # warm-up (allocator, kernels, autotune)
    warm_s = timer.stop()
    reset_peak(device)
    times = []
    for _ in range(steps):
        timer.start()
        step()
        times.append(timer.stop())
    student.set_gradient_checkpointing(False)
    step_s = sum(times) / len(times)
    meta_cfg, meta = meta_student(config, overrides)
    flops = stage1_step_flops(meta_cfg, meta, latent_frames)
    out = {"latent_frames": latent_frames, "step_s": step_s, "first_step_s": warm_s,
           "tokens_per_s": flops["tokens"] / step_s, "tflop_per_step": flops["total"] / 1e12,
           "achieved_tflops": flops["total"] / step_s / 1e12, "peak_gb": peak_memory_gb(device)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs/model/wan2.1-t2v-1.3b.yaml"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--frames", default="81,301", help="video frame counts to stream")
    ap.add_argument("--teacher-steps", default="50,4")
    ap.add_argument("--teacher-frames", type=int, default=81)
    ap.add_argument("--train", action="store_true", help="also time a stage-1 step (81 frames)")
    ap.add_argument("--train-steps", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="torch.compile each transformer block")
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    from gd_train.config import latent_shape, load_config
    from gd_train.flow import few_step_sigmas
    from gd_train.infer.stream import StreamSettings
    from gd_train.media import StreamingDecoder
    from gd_train.model.backbone import load_vae
    from gd_train.model.student import GreedyDistillStudent

    device = torch.device(args.device)
    cfg = load_config(args.config, ["pretrained_path=null", f"model.dtype={args.dtype}", *args.overrides])
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    torch.manual_seed(0)
    student = GreedyDistillStudent.from_config(cfg, device=device)
    if args.compile:
        for block in student.transformer.blocks:
            block.compile()
    _, _, H, W = latent_shape(cfg, 1)
    text = torch.randn(1, cfg.model.max_text_tokens, student.transformer.config.text_dim, device=device, dtype=dtype)
    settings = StreamSettings.from_config(cfg)
    vae = load_vae(cfg, dtype=dtype if device.type == "cuda" else torch.float32).to(device)
    results: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                     "date": time.strftime("%Y-%m-%d"), "config": args.config, "dtype": args.dtype,
                     "steps": list(cfg.student.denoising_steps), "compile": args.compile}

    timer = Timer(device)
    timer.start()
    stream_run(student, settings, text, 3, device, lambda: StreamingDecoder(vae))  # warm-up / compile
    results["warmup_compile_s"] = timer.stop()

    for video_frames in (int(f) for f in args.frames.split(",")):
        latent_frames = 1 + (video_frames - 1) // 4
        results[f"student_{video_frames}"] = stream_run(student, settings, text, latent_frames, device)
        results[f"student_{video_frames}_vae"] = stream_run(student, settings, text, latent_frames, device,
                                                            lambda: StreamingDecoder(vae))
    for steps in (int(s) for s in args.teacher_steps.split(",")):
        sigmas = few_step_sigmas([round(1000 * (1 - i / steps)) for i in range(steps)], cfg.student.flow_shift)
        teacher_run(student, sigmas[:2] + [0.0], text, 1 + (args.teacher_frames - 1) // 4, H, W, device, dtype)  # warm-up
        results[f"teacher_{steps}"] = teacher_run(student, sigmas, text, 1 + (args.teacher_frames - 1) // 4, H, W,
                                                  device, dtype)
    if args.train:
        r = train_step_run(cfg, student, text, 21, H, W, device, dtype, args.train_steps, args.config, args.overrides)
        r["mfu"] = r["achieved_tflops"] / args.peak_tflops
        results["train_stage1"] = r

    print(json.dumps(results, indent=2))
    frames = [int(f) for f in args.frames.split(",")]
    print("\n| what | video frames/s | first chunk / latency (s) | s per chunk | peak GB |")
    print("|---|---:|---:|---:|---:|")
    for f in frames:
        r, rv = results[f"student_{f}"], results[f"student_{f}_vae"]
        peak = "" if r["peak_gb"] is None else f"{r['peak_gb']:.1f}"
        print(f"| student, {f} frames, no VAE | {r['fps']:.2f} | {r['first_chunk_s']:.3f} | {r['chunk_s']:.4f} | {peak} |")
        print(f"| student, {f} frames, with VAE decode | {rv['fps_with_vae']:.2f} | {rv['first_frame_with_vae_s']:.3f} | | |")
    for steps in (int(s) for s in args.teacher_steps.split(",")):
        r = results[f"teacher_{steps}"]
        peak = "" if r["peak_gb"] is None else f"{r['peak_gb']:.1f}"
        print(f"| teacher, {args.teacher_frames} frames, {steps} steps | {r['fps']:.3f} | {r['latency_s']:.2f} | | {peak} |")
    a, b = results[f"student_{frames[0]}"], results[f"student_{frames[-1]}"]
    print(f"\nper-chunk time {frames[-1]} vs {frames[0]} frames: {b['chunk_s'] / a['chunk_s']:.3f}")
    for steps in (int(s) for s in args.teacher_steps.split(",")):
        print(f"student ({frames[0]} frames) / teacher {steps} steps, frames/s: "
              f"{a['fps'] / results[f'teacher_{steps}']['fps']:.1f}x")
    if args.train:
        r = results["train_stage1"]
        print(f"stage-1 step (81 frames, activation checkpointing): {r['step_s']:.3f} s, {r['tokens_per_s']:.0f} "
              f"tokens/s, {r['achieved_tflops']:.1f} TFLOP/s = MFU {100 * r['mfu']:.1f}% of {args.peak_tflops:.0f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
