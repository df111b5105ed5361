"""Compute bound of streaming generation and of a stage-1 step, counted, not estimated.

The model is built on the `meta` device at the configured size (default: the full Wan2.1-T2V-1.3B
config with the student's LoRA), and every pass is run under `torch.utils.flop_counter.FlopCounterMode`,
so the matmul FLOPs are those of the real code path. Attention FLOPs are counted *useful*: only the
(query, key) chunk pairs the mask lets through (flex attention skips the rest on GPU; CPU SDPA with a
dense mask does not), 4·d FLOPs per pair of tokens forward (QKᵀ and PV) and twice that backward.

    python benchmarks/flops.py                                   # 1.3B, 480p, T = 4, w = 3
    python benchmarks/flops.py --config configs/model/tiny.yaml  # any config
    python benchmarks/flops.py --fps 24,30 --peak-tflops 989     # required GPU throughput

Per chunk (one latent frame = 4 video frames): one ETM pass (L queries against ≤ (w+1)L keys), one
SDD context pass (L against L) and T SDD denoising passes (L against ≤ 3L).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# On the meta device SDPA decomposes into batched matmuls (aten.bmm); the Wan linears run as mm/addmm.
ATTENTION_OPS = ("scaled_dot_product", "flex_attention", "_efficient_attention", "_flash_attention", "aten.bmm")


def split_counts(counter: FlopCounterMode) -> tuple[float, float]:
    """(matmul-and-other FLOPs, attention FLOPs as the counter saw them)."""
    attn = other = 0
    for op, flops in counter.get_flop_counts()["Global"].items():
        if any(name in str(op) for name in ATTENTION_OPS):
            attn += flops
        else:
            other += flops
    return float(other), float(attn)


def attention_flops(q_tokens: int, k_tokens: int, dim: int, layers: int) -> float:
    return 4.0 * q_tokens * k_tokens * dim * layers


def meta_student(config: str, overrides=()):
    from gd_train.config import load_config
    from gd_train.model.backbone import load_transformer
    from gd_train.model.student import GreedyDistillStudent

    cfg = load_config(config, ["pretrained_path=null", "model.dtype=float32", *overrides])
    with torch.device("meta"):
        student = GreedyDistillStudent(cfg, load_transformer(cfg), device="meta")
    return cfg, student


def chunk_flops(cfg, student) -> dict[str, float]:
    """FLOPs of each streaming pass for one chunk deep in the stream (full window, full SDD context)."""
    from gd_train.config import latent_shape

    tcfg = student.transformer.config
    dim, layers = tcfg.num_attention_heads * tcfg.attention_head_dim, tcfg.num_layers
    C, _, H, W = latent_shape(cfg, 1)
    L = student.tokens_per_chunk(H, W)
    w = student.window
    text = torch.zeros(1, cfg.model.max_text_tokens, tcfg.text_dim, device="meta")
    frame = torch.zeros(1, C, 1, H, W, device="meta")
    cond = torch.zeros(1, L, dim, device="meta")
    etm_cache, sdd_cache = student.new_caches(1, H, W)
    index = w + 2  # full window, x_0 and x_{f-1} both cached
    passes = {
        "etm": (lambda: student.etm_step(frame, index, etm_cache, text), (w + 1) * L),
        "sdd_context": (lambda: student.sdd_context_step(frame, index, sdd_cache, text), L),
        "sdd_denoise": (lambda: student.sdd_velocity_step(frame, 0.5, index, cond, sdd_cache, text), 3 * L),
    }
    out = {"tokens_per_chunk": L}
    with torch.no_grad():
        for name, (fn, keys) in passes.items():
            with FlopCounterMode(display=False) as counter:
                fn()
            matmul, _ = split_counts(counter)  # attention is counted from the useful pairs instead
            attn = attention_flops(L, keys, dim, layers) + attention_flops(L, cfg.model.max_text_tokens, dim, layers)
            out[name] = {"matmul": matmul, "attention": attn, "total": matmul + attn}
    T = len(cfg.student.denoising_steps)
    out["per_chunk"] = out["etm"]["total"] + out["sdd_context"]["total"] + T * out["sdd_denoise"]["total"]
    return out


def stage1_step_flops(cfg, student, latent_frames: int) -> dict[str, float]:
    """One clip through the parallel pass, forward + backward. The frozen base needs input grads only
    (plus LoRA weight grads): the counter sees exactly the ops autograd runs. Checkpoint recompute is
    not counted (the MFU convention)."""
    from gd_train.config import latent_shape
    from gd_train.model.attention import sdd_visibility, sliding_window_visibility

    tcfg = student.transformer.config
    dim, layers = tcfg.num_attention_heads * tcfg.attention_head_dim, tcfg.num_layers
    C, _, H, W = latent_shape(cfg, 1)
    L = student.tokens_per_chunk(H, W)
    n, w = latent_frames, student.window
    first = 0 if cfg.student.train_first_frame else 1
    text = torch.zeros(1, cfg.model.max_text_tokens, tcfg.text_dim, device="meta")
    clip = torch.zeros(1, C, n, H, W, device="meta")
    noisy = clip[:, :, first:]
    # Model FLOPs: with activation checkpointing on (the 1.3B config) the counter would also see the
    # recompute in backward, ~1.33x more than the step's model FLOPs at 81 frames.
    student.set_gradient_checkpointing(False)
    with FlopCounterMode(display=False) as counter:
        out = student.parallel_forward(clip, noisy, torch.zeros(1, noisy.shape[2], device="meta"), text)
        out.velocity.float().pow(2).mean().backward()
    matmul, _ = split_counts(counter)
    pairs = int(sliding_window_visibility(n - 1, w).sum()) + int(sdd_visibility(n - 1, first, noisy.shape[2]).sum())
    seq_etm, seq_sdd = (n - 1) * L, (n - 1 + noisy.shape[2]) * L
    attn = 3 * (4.0 * dim * layers * pairs * L * L
                + attention_flops(seq_etm + seq_sdd, cfg.model.max_text_tokens, dim, layers))  # fwd + 2x bwd
    return {"matmul": matmul, "attention": attn, "total": matmul + attn, "tokens": seq_etm + seq_sdd,
            "etm_tokens": seq_etm, "sdd_tokens": seq_sdd}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs/model/wan2.1-t2v-1.3b.yaml"))
    ap.add_argument("--fps", default="24,30", help="video frame rates to report the required throughput for")
    ap.add_argument("--peak-tflops", type=float, default=989.0,
                    help="dense bf16 peak of the GPU (H100/H200 SXM datasheet: 989)")
    ap.add_argument("--train-latent-frames", type=int, default=21, help="stage-1 clip length (81 video frames)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    cfg, student = meta_student(args.config, args.overrides)
    tcfg = student.transformer.config
    T = len(cfg.student.denoising_steps)
    chunk = chunk_flops(cfg, student)
    print(f"config {args.config}: dim {tcfg.num_attention_heads * tcfg.attention_head_dim}, {tcfg.num_layers} "
          f"layers, L = {chunk['tokens_per_chunk']} tokens per chunk, w = {student.window}, T = {T}, "
          f"text {cfg.model.max_text_tokens} tokens")
    print("\n| pass | matmul & other TFLOP | attention (self + text) TFLOP | total TFLOP |")
    print("|---|---:|---:|---:|")
    for name in ("etm", "sdd_context", "sdd_denoise"):
        r = chunk[name]
        print(f"| {name} (1 pass) | {r['matmul'] / 1e12:.3f} | {r['attention'] / 1e12:.3f} | {r['total'] / 1e12:.3f} |")
    per_chunk = chunk["per_chunk"]
    print(f"\nper chunk (ETM + context + {T} x SDD): {per_chunk / 1e12:.2f} TFLOP = "
          f"{per_chunk / 4 / 1e12:.2f} TFLOP per video frame (4 video frames per latent frame)")
    for fps in (float(f) for f in args.fps.split(",")):
        need = per_chunk * fps / 4
        print(f"  {fps:.0f} video frames/s needs {need / 1e12:.0f} TFLOP/s = "
              f"{100 * need / (args.peak_tflops * 1e12):.1f}% of a {args.peak_tflops:.0f} TFLOP/s peak")

    n = args.train_latent_frames
    step = stage1_step_flops(cfg, student, n)
    print(f"\nstage-1 step, {n} latent frames ({1 + 4 * (n - 1)} video frames), batch 1: {step['total'] / 1e12:.1f} "
          f"TFLOP (fwd + bwd; matmul {step['matmul'] / 1e12:.1f}, useful attention {step['attention'] / 1e12:.1f}); "
          f"{step['tokens']} tokens through the model (ETM {step['etm_tokens']} + SDD {step['sdd_tokens']})")
    print(f"  MFU = {step['total'] / 1e12:.1f} TFLOP / (step time s x peak TFLOP/s); 35% of "
          f"{args.peak_tflops:.0f} TFLOP/s needs a step time <= {step['total'] / (0.35 * args.peak_tflops * 1e12):.2f} s")


if __name__ == "__main__":
    main()
