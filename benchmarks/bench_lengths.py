"""Clip length vs training cost (issue 12): stage-1 throughput per length bucket, measured on this machine,
and FLOPs, activation memory and the largest micro-batch per length at the full 1.3B size, computed.

    python benchmarks/bench_lengths.py                          # everything (~11 min on 2 loaded cores)
    python benchmarks/bench_lengths.py --parts meta             # the full-size computation only (~5 min)
    python benchmarks/bench_lengths.py --tiny-steps 8 --mid-steps 3 --lengths 2,5,8

Measured: real `gd-train stage1` runs on 1 rank (benchmarks/bench_train.py's `run`) over shards of mixed
lengths (one length per shard, as datagen writes them), `train.log_every=1`, so each metrics.jsonl record
is one optimizer step of one length; per length, medians of `throughput_by_length/F{n}/tokens_per_s` and
`.../samples_per_s` over its steps after its first (which builds that length's masks and RoPE tables).
Tokens are the trainer's: latent frames x tokens per frame x samples. Each run is exactly one epoch, so
every length gets the same number of steps. Sizes: the tiny config, and the mid-size one of
benchmarks/bench_full_arch.py (4 Wan2.1-1.3B-wide blocks, activation checkpointing on) at its 32x32 px and at
64x64 px (4 and 16 tokens per latent frame).

Computed on the meta device (nothing allocated), full Wan2.1-T2V-1.3B at 832x480, bf16 base, rank-64
LoRA: FLOPs per sample (benchmarks/flops.py's `stage1_step_flops`) and an activation-memory estimate per
sample with per-block checkpointing, from the tensors autograd saves in a real stage-1 forward
(`saved_tensors_hooks`) — see `activation_memory` for the method and what it leaves out.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
sys.path.insert(0, str(REPO_ROOT / "tests"))

from bench_full_arch import SIZES, WAN_WIDTH  # noqa: E402
from bench_train import run as run_stage  # noqa: E402
from flops import meta_student, stage1_step_flops  # noqa: E402
from train_utils import TINY_STAGE1, write_tiny_shards  # noqa: E402

FULL_CONFIG = "configs/model/wan2.1-t2v-1.3b.yaml"
FULL_VIDEO = ["video.height=480", "video.width=832", "model.dtype=bfloat16"]
FULL_FRAMES = (81, 161, 301)
# Nominal sizes in 10^9 B (an 80 GB H100 SXM reports ~85e9 B to CUDA: the nominal figure leaves ~5 GB spare)
GPU_BYTES = {"80 GB": 80 * 10**9, "141 GB (H200)": 141 * 10**9}
TRAINABLE_BYTES = 4 + 4 + 8  # fp32 weight, fp32 gradient, AdamW's two fp32 moments


# --------------------------------------------------------------------------------------------------
# Measured: throughput per length on this machine
# --------------------------------------------------------------------------------------------------
def per_length(records: list[dict]) -> dict[int, dict]:
    """latent frames -> medians of tokens/s and samples/s over that length's steps after its first."""
    seen: dict[int, list[tuple[float, float]]] = {}
    for r in records:
        keys = [k for k in r if k.startswith("throughput_by_length/") and k.endswith("/tokens_per_s")]
        if len(keys) != 1:
            raise SystemExit(f"metrics record of step {r.get('step')}: expected one length per record "
                             f"(train.log_every=1), got {keys}")
        frames = int(keys[0].split("/")[1][1:])
        seen.setdefault(frames, []).append((r[keys[0]], r[f"throughput_by_length/F{frames}/samples_per_s"]))
    out = {}
    for frames, values in sorted(seen.items()):
        steady = values[1:] or values
        out[frames] = {"steps": len(values), "measured": len(steady),
                       "tokens_per_s": statistics.median(v[0] for v in steady),
                       "samples_per_s": statistics.median(v[1] for v in steady)}
    return out


def measure(size: str, lengths: list[int], steps_per_length: int, global_batch: int, out: Path,
            threads: int, px: int | None = None) -> tuple[dict, float, list[str]]:
    """One epoch of real stage 1 on single-length shards of each length: steps_per_length steps each.
    px: the mid size's square video size (bench_full_arch.py's is 32)."""
    overrides = []
    if size != "tiny":
        overrides = [o for o in WAN_WIDTH if px is None or not o.startswith(("video.height=", "video.width="))]
        overrides += [*SIZES[size], *([f"video.height={px}", f"video.width={px}"] if px is not None else [])]
        size = f"{size}-{px}px" if px is not None else size
    shards = out / f"shards-{size}"
    config = TINY_STAGE1
    if overrides:  # shards of the run's geometry and text width: write_tiny_shards reads them from a config
        from omegaconf import OmegaConf

        from gd_train.config import load_config

        config = str(out / f"{size}.yaml")
        cfg = load_config(REPO_ROOT / TINY_STAGE1, overrides)
        Path(config).write_text(OmegaConf.to_yaml(cfg))
    per_shard = steps_per_length * global_batch
    write_tiny_shards(shards, per_shard * len(lengths), samples_per_shard=per_shard, config=config,
                      lengths=lengths)
    steps = steps_per_length * len(lengths)
    extra = [*overrides, f"train.global_batch_size={global_batch}", "train.micro_batch_size=1",
             "train.log_every=1", "train.video_every=0"]
    result = run_stage("stage1", 1, out / f"run-{size}", shards, steps, extra, threads)
    command = (f"gd-train stage1 --config {TINY_STAGE1} --nproc 1 data.shards=<{len(lengths)} shards, latent "
               f"frames {','.join(map(str, lengths))}, {per_shard} samples each> "
               f"train.max_steps={steps} " + " ".join(extra))
    return per_length(result["records"]), result["wall_s"], [command]


# --------------------------------------------------------------------------------------------------
# Computed: FLOPs and activation memory at full size, on the meta device
# --------------------------------------------------------------------------------------------------
class SavedTensors:
    """What autograd keeps for backward in one forward, by region and by storage (a storage saved
    twice counts once). Regions: ("etm" | "sdd", block index) while a block runs, "outside" else;
    "block_inputs": what per-block checkpointing keeps of each block instead (its arguments).

    Every attention call (self and text) is accounted as flash / flex attention keeps it on the GPU —
    q, k, v, out (their storages) and a float32 logsumexp per query and head — not as the meta/CPU
    SDPA path does (dense attention probabilities, and for the masked self-attention the dense
    (S, S) boolean mask held by the pass, neither of which exists with flex's BlockMask)."""

    def __init__(self, weights: set[int]):
        self.weights = weights  # storages of parameters and buffers: static memory, not activations
        self.region: object = "outside"
        self.in_attention = False
        self.bytes: dict[object, dict[int, int]] = {}
        self.dtypes: dict[int, str] = {}
        self._lse = 0
        self._held: list[torch.Tensor] = []  # a freed storage's address could be reused by a later one

    def add(self, region, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        if storage._cdata in self.weights:
            return
        self._held.append(t)
        self.bytes.setdefault(region, {})[storage._cdata] = storage.nbytes()
        self.dtypes[storage._cdata] = str(t.dtype).replace("torch.", "")

    def pack(self, t: torch.Tensor):
        if not self.in_attention:
            self.add(self.region, t)
        return t

    def attention(self, original):
        def sdpa(q, k, v, *args, **kwargs):
            self.in_attention = True
            try:
                out = original(q, k, v, *args, **kwargs)
            finally:
                self.in_attention = False
            for t in (q, k, v, out):
                self.add(self.region, t)
            self._lse -= 1  # a key no storage has: (B, heads, S_q) float32
            self.bytes.setdefault(self.region, {})[self._lse] = q.shape[0] * q.shape[1] * q.shape[2] * 4
            self.dtypes[self._lse] = "float32"
            return out
        return sdpa

    def total(self, *regions, minus=()) -> int:
        keep: dict[int, int] = {}
        for r in regions:
            keep.update(self.bytes.get(r, {}))
        for r in minus:
            for key in self.bytes.get(r, {}):
                keep.pop(key, None)
        return sum(keep.values())


def saved_tensors(student, cfg, latent_frames: int, batch: int) -> SavedTensors:
    """One stage-1 forward (the trainer's parallel pass, with grad), checkpointing off, every saved
    tensor recorded; each block's arguments recorded as what checkpointing would keep of it."""
    import torch.nn.functional as F

    from gd_train.config import latent_shape

    audit = SavedTensors({t.untyped_storage()._cdata for t in (*student.parameters(), *student.buffers())})
    runner = student.runner
    run_block = runner._run_block

    def audited_block(i, adapter, state, x, text_h, tproj):
        for t in (x, text_h, tproj, *state.q_rope, *state.k_rope):  # state.mask: flex's BlockMask, not kept
            audit.add("block_inputs", t)
        audit.region = (adapter, i)
        try:
            return run_block(i, adapter, state, x, text_h, tproj)
        finally:
            audit.region = "outside"

    C, _, H, W = latent_shape(cfg, 1)
    first = 0 if cfg.student.train_first_frame else 1
    dtype = student.dtype
    text = torch.zeros(batch, cfg.model.max_text_tokens, student.transformer.config.text_dim, device="meta", dtype=dtype)
    clip = torch.zeros(batch, C, latent_frames, H, W, device="meta", dtype=dtype)
    noisy = clip[:, :, first:]
    sdpa = F.scaled_dot_product_attention
    runner._run_block, F.scaled_dot_product_attention = audited_block, audit.attention(sdpa)
    student.set_gradient_checkpointing(False)
    try:
        with torch.autograd.graph.saved_tensors_hooks(audit.pack, lambda t: t):
            out = student.parallel_forward(clip, noisy, torch.zeros(batch, noisy.shape[2], device="meta"), text)
            (out.velocity.float() - clip[:, :, first:].float()).pow(2).mean()
    finally:
        del runner._run_block
        F.scaled_dot_product_attention = sdpa
    return audit


def activation_memory(student, cfg, latent_frames: int, batch: int) -> dict[str, int]:
    """Peak activation bytes of one stage-1 micro-batch with per-block activation checkpointing:

    - kept through the step: every block's inputs in both passes (hidden states, plus the text
      states, per-token time modulation and RoPE tables each pass shares between its blocks), and
      what the code outside the blocks saves (patch embedding, condition embedder, c_f projection,
      output head, loss);
    - during backward, one block at a time is recomputed: its saved tensors (the largest over the
      ETM and SDD passes), less those already counted above;
    - backward transients of that block: taken as 2 x its largest saved tensor (a gradient of that
      size and the one it is computed from). A rule, not a measurement.
    """
    audit = saved_tensors(student, cfg, latent_frames, batch)
    layers = student.transformer.config.num_layers
    kept = audit.total("block_inputs", "outside")
    block = {}
    for adapter in ("etm", "sdd"):
        # the first block can save a little less (what it shares with the code before it is counted there)
        sizes = [audit.total((adapter, i), minus=("block_inputs", "outside")) for i in range(layers)]
        block[adapter] = max(sizes)
    pass_ = max(block, key=block.get)
    last = audit.bytes[(pass_, layers - 1)]
    largest = max(last.values())
    by_dtype: dict[str, int] = {}
    for key, nbytes in last.items():
        by_dtype[audit.dtypes[key]] = by_dtype.get(audit.dtypes[key], 0) + nbytes
    return {"kept": kept, "block_inputs": audit.total("block_inputs"),
            "outside": audit.total("outside", minus=("block_inputs",)),
            "recompute": block[pass_], "recompute_pass": pass_, "etm_block": block["etm"], "sdd_block": block["sdd"],
            "transient": 2 * largest, "total": kept + block[pass_] + 2 * largest,
            "recompute_by_dtype": by_dtype, "largest": largest}


def static_memory(student) -> dict[str, int]:
    base = sum(p.numel() * p.element_size() for p in student.base_parameters().values())
    base_params = sum(p.numel() for p in student.base_parameters().values())
    trainable = sum(p.numel() for p in student.trainable_parameters())
    return {"base": base, "base_params": base_params, "trainable_params": trainable,
            "trainable": trainable * TRAINABLE_BYTES, "total": base + trainable * TRAINABLE_BYTES}


def compute_full(frames: tuple[int, ...]) -> tuple[list[dict], dict, str]:
    # FLOPs on flops.py's fp32 model (its inputs are fp32; FLOPs do not depend on the dtype), memory on the
    # bf16 base the GPU configs train
    flops_cfg, flops_student = meta_student(str(REPO_ROOT / FULL_CONFIG), FULL_VIDEO[:2])
    cfg, student = meta_student(str(REPO_ROOT / FULL_CONFIG), FULL_VIDEO)
    static = static_memory(student)
    L = student.tokens_per_chunk(cfg.video.height // 8, cfg.video.width // 8)
    rows = []
    for video_frames in frames:
        n = 1 + (video_frames - 1) // 4
        flops_student.set_gradient_checkpointing(False)  # the recompute is not counted (the MFU convention)
        flops = stage1_step_flops(flops_cfg, flops_student, n)
        # what the GPU executes with per-block checkpointing: the counter sees the recompute's matmuls in
        # backward; flops.py's useful attention (fwd + 2x bwd) gets one more forward
        flops_student.set_gradient_checkpointing(True)
        recompute = stage1_step_flops(flops_cfg, flops_student, n)
        flops["executed"] = recompute["matmul"] + flops["attention"] * 4 / 3
        one, two = activation_memory(student, cfg, n, 1), activation_memory(student, cfg, n, 2)
        per_sample = two["total"] - one["total"]  # measured at batch 1 and 2: the part that grows with B
        fixed = one["total"] - per_sample
        fits = {name: max(int((budget - static["total"] - fixed) // per_sample), 0) for name, budget in GPU_BYTES.items()}
        rows.append({"video_frames": video_frames, "latent_frames": n, "clip_tokens": n * L, "flops": flops,
                     "memory": one, "per_sample": per_sample, "fixed": fixed, "max_micro_batch": fits})
    return rows, static, f"L = {L} tokens per latent frame"


# --------------------------------------------------------------------------------------------------
def gib(b: float) -> str:
    return f"{b / 2**30:.2f}"


def rate(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else f"{x:.3g}"


def print_measured(name: str, table: dict, wall_s: float, commands: list[str]) -> None:
    shortest = table[min(table)]
    print(f"\n### {name}: stage 1, 1 rank ({wall_s:.0f} s for the run)\n")
    for c in commands:
        print(f"    {c}")
    print("\n| latent frames (video frames) | steps (measured) | tokens/s | samples/s | tokens/s vs shortest | "
          "samples/s vs shortest |")
    print("|---|---:|---:|---:|---:|---:|")
    for frames, r in table.items():
        print(f"| {frames} ({1 + 4 * (frames - 1)}) | {r['steps']} ({r['measured']}) | {rate(r['tokens_per_s'])} | "
              f"{rate(r['samples_per_s'])} | {r['tokens_per_s'] / shortest['tokens_per_s']:.2f}x | "
              f"{r['samples_per_s'] / shortest['samples_per_s']:.2f}x |")


def print_full(rows: list[dict], static: dict, note: str) -> None:
    print(f"\n### Full Wan2.1-T2V-1.3B at 832x480 (meta device, computed; {note}; bf16 base, rank-64 LoRA, "
          f"per-block activation checkpointing)\n")
    print(f"static: bf16 base {static['base_params'] / 1e9:.3f} B params = {gib(static['base'])} GiB; trainable "
          f"(LoRA + c_f) {static['trainable_params'] / 1e6:.1f} M params x {TRAINABLE_BYTES} B (fp32 weight, grad, "
          f"2 AdamW moments; no ZeRO sharding) = {gib(static['trainable'])} GiB; total {gib(static['total'])} GiB. "
          "Budgets: " + ", ".join(f"{name} = {gib(b)} GiB" for name, b in GPU_BYTES.items()) + ".\n")
    base = rows[0]
    print("| video frames (latent) | clip tokens | tokens through the model (ETM + SDD) | TFLOP per sample (fwd+bwd) | "
          "vs 81 | TFLOP executed with the recompute | kept between blocks (GiB) | one block recomputed: ETM / SDD (GiB) | backward transient (GiB) | "
          "activations per sample (GiB) | vs 81 | " + " | ".join(f"largest micro-batch in {n}" for n in GPU_BYTES) + " |")
    print("|---|" + "---:|" * (10 + len(GPU_BYTES)))
    for r in rows:
        m, f = r["memory"], r["flops"]
        print(f"| {r['video_frames']} ({r['latent_frames']}) | {r['clip_tokens']} | {f['tokens']} ({f['etm_tokens']} + "
              f"{f['sdd_tokens']}) | {f['total'] / 1e12:.0f} | {f['total'] / base['flops']['total']:.2f}x | "
              f"{f['executed'] / 1e12:.0f} | {gib(m['kept'])} | {gib(m['etm_block'])} / {gib(m['sdd_block'])} | {gib(m['transient'])} | "
              f"{gib(r['per_sample'])} | {r['per_sample'] / base['per_sample']:.2f}x | "
              + " | ".join(str(r["max_micro_batch"][n]) for n in GPU_BYTES) + " |")
    print("\nper sample = activations at micro-batch 2 minus at 1 (both computed); what does not grow with the batch "
          "(RoPE tables) is " + ", ".join(f"{gib(r['fixed'])}" for r in rows) + " GiB. Kept between blocks, at "
          "batch 1: block inputs " + ", ".join(gib(r["memory"]["block_inputs"]) for r in rows) + " GiB; saved outside "
          "the blocks " + ", ".join(gib(r["memory"]["outside"]) for r in rows) + " GiB. One recomputed "
          + rows[0]["memory"]["recompute_pass"].upper() + " block by dtype (its saved tensors, with q, k, v, out and "
          "logsumexp of its attentions): " + "; ".join(
              f"{r['video_frames']} frames " + ", ".join(f"{d} {gib(b)}" for d, b in sorted(r["memory"]["recompute_by_dtype"].items()))
              + f" GiB (largest tensor {gib(r['memory']['largest'])})" for r in rows) + ".")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="tiny,mid,meta", help="which of tiny, mid, meta to run")
    ap.add_argument("--lengths", default="2,5,8", help="latent frames of the measured runs' shards")
    ap.add_argument("--tiny-steps", type=int, default=12, help="steps per length, tiny (global batch 4)")
    ap.add_argument("--mid-steps", type=int, default=5, help="steps per length, mid size (global batch 1)")
    ap.add_argument("--mid-px", default="32,64", help="square video sizes of the mid-size runs (32: bench_full_arch's)")
    ap.add_argument("--threads", type=int, default=1,
                    help="OMP threads of the 1-rank runs (1: on this shared machine 2 threads spin in OpenMP barriers)")
    ap.add_argument("--frames", default=",".join(map(str, FULL_FRAMES)), help="video frames of the computed part")
    ap.add_argument("--keep", type=Path, default=None, help="keep shards and runs here")
    args = ap.parse_args()
    parts = args.parts.split(",")
    lengths = [int(x) for x in args.lengths.split(",")]
    root = args.keep or Path(tempfile.mkdtemp(prefix="bench_lengths_"))
    root.mkdir(parents=True, exist_ok=True)
    print(f"# bench_lengths.py {' '.join(sys.argv[1:])}  {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC  "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU(s), load average "
          f"{os.getloadavg()[0]:.1f} at start; torch {torch.__version__}, {args.threads} OMP thread(s)")
    try:
        if "tiny" in parts:
            table, wall_s, commands = measure("tiny", lengths, args.tiny_steps, 4, root, args.threads)
            print_measured("tiny (configs/tiny/stage1.yaml, 64x96 px: 24 tokens per latent frame)", table, wall_s,
                           commands)
        if "mid" in parts:
            for px in (int(x) for x in args.mid_px.split(",")):
                table, wall_s, commands = measure("mid", lengths, args.mid_steps, 1, root, args.threads, px)
                print_measured(f"mid (bench_full_arch.py's 4 Wan2.1-1.3B-wide blocks, checkpointing on) at {px}x{px} "
                               f"px: {(px // 16) ** 2} tokens per latent frame", table, wall_s, commands)
        if "meta" in parts:
            start = time.perf_counter()
            rows, static, note = compute_full(tuple(int(x) for x in args.frames.split(",")))
            print_full(rows, static, note)
            print(f"\n(computed in {time.perf_counter() - start:.0f} s)")
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    print(f"\nload average at end: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
