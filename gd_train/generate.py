"""`gd-generate`: config -> student (+ adapters) -> streaming generator (Algorithm 1) -> latents / mp4.

    gd-generate --config configs/model/tiny.yaml --latent-frames 8 --seed 0 --out runs/gen/sample.safetensors \
        --mp4 runs/gen/sample.mp4 [--prompt TEXT | --prompt-embeds FILE] [--adapters DIR] [--no-kv-cache] [KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from gd_train.config import ConfigError, latent_shape, load_config, to_yaml
from gd_train.flow import few_step_sigmas


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gd-generate", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/model/tiny.yaml", help="YAML config (default: the tiny model)")
    p.add_argument("--latent-frames", type=int, default=None, help="latent frames to stream (default: generate.latent_frames)")
    p.add_argument("--seed", type=int, default=None, help="noise seed (default: generate.seed)")
    p.add_argument("--out", required=True, help="output .safetensors; holds `latents` (1, 16, N, H, W)")
    p.add_argument("--mp4", default=None, help="also decode with the VAE and write this mp4")
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default=None, help="text prompt, encoded by the configured UMT5 encoder")
    prompt.add_argument("--prompt-embeds", default=None, help="safetensors file with `prompt_embeds` (tokens, dim)")
    p.add_argument("--adapters", default=None, help="exported adapters folder (etm/, sdd/, cf_proj.safetensors)")
    p.add_argument("--steps", default=None, help="comma-separated step list (default: student.denoising_steps)")
    p.add_argument("--no-kv-cache", action="store_true", help="recompute the history every chunk (slow; for checks)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("overrides", nargs="*", help="config overrides KEY=VALUE")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"gd-generate: error: {exc}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    from safetensors.torch import load_file, save_file
    from tqdm import tqdm

    from gd_train.infer.stream import StreamingGenerator, StreamSettings
    from gd_train.model.backbone import PromptEncoder, pad_prompt_embeds
    from gd_train.model.student import GreedyDistillStudent

    cfg = load_config(args.config, args.overrides)
    n_frames = args.latent_frames if args.latent_frames is not None else cfg.generate.latent_frames
    if n_frames < 1:
        raise ValueError(f"--latent-frames: expected >= 1, got {n_frames}")
    seed = args.seed if args.seed is not None else cfg.generate.seed
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise ValueError(f"--out {out}: expected a .safetensors file name")

    student = GreedyDistillStudent.from_config(cfg, device=device)
    if args.adapters:
        student.load_adapters(args.adapters)
    student.eval()

    text_prompt = None
    if args.prompt_embeds:
        tensors = load_file(args.prompt_embeds)
        if "prompt_embeds" not in tensors:
            raise ValueError(f"--prompt-embeds {args.prompt_embeds}: no `prompt_embeds` tensor inside")
        emb = tensors["prompt_embeds"]
        emb = emb[0] if emb.ndim == 3 else emb
        prompt_embeds = pad_prompt_embeds([emb], cfg.model.max_text_tokens)
        negative = None
    else:
        text_prompt = args.prompt if args.prompt is not None else cfg.generate.prompt
        encoder = PromptEncoder(cfg, device=device)
        prompt_embeds = encoder.encode_padded([text_prompt])
        negative = encoder.encode_padded([cfg.student.negative_prompt]) if cfg.student.guidance_scale != 1.0 else None
        del encoder

    steps = [int(s) for s in args.steps.split(",")] if args.steps else None
    settings = StreamSettings.from_config(cfg, kv_cache=not args.no_kv_cache, steps=steps)
    generator = StreamingGenerator(student, settings)

    writer = decoder = None
    if args.mp4:
        from gd_train.media import Mp4Writer, StreamingDecoder
        from gd_train.model.backbone import load_vae

        decoder = StreamingDecoder(load_vae(cfg).to(device))
        writer = Mp4Writer(args.mp4, fps=cfg.video.fps)

    frames = []
    generate_s = decode_s = 0.0
    first_chunk_s = None
    tick = time.perf_counter()
    for frame in tqdm(generator.stream(prompt_embeds.to(device), n_frames, seed, negative), total=n_frames,
                      desc="chunks", unit="chunk", file=sys.stderr):
        if device.type == "cuda":
            torch.cuda.synchronize()
        generate_s += time.perf_counter() - tick
        first_chunk_s = generate_s if first_chunk_s is None else first_chunk_s
        frames.append(frame.float().cpu())
        if writer is not None:  # decode as we go: memory stays flat however long the stream
            t0 = time.perf_counter()
            writer.write(decoder.decode(frame)[0])
            decode_s += time.perf_counter() - t0
        tick = time.perf_counter()
    latents = torch.cat(frames, dim=2)

    meta = {"seed": str(seed), "latent_frames": str(n_frames), "kv_cache": str(not args.no_kv_cache),
            "flow_shift": str(cfg.student.flow_shift), "sigmas": ",".join(f"{s:.6f}" for s in settings.sigmas),
            "prompt": text_prompt or "", "config": to_yaml(cfg)}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({"latents": latents.contiguous()}, str(out), metadata=meta)
    print(f"wrote {out} latents {tuple(latents.shape)}")

    video_frames = 1 + 4 * (n_frames - 1)
    if writer is not None:
        writer.close()
        print(f"wrote {args.mp4} ({writer.frames} frames, {cfg.video.width}x{cfg.video.height}, {cfg.video.fps} fps)")
    _, _, h, w = latent_shape(cfg, n_frames)
    print(f"generated {n_frames} latent frames ({video_frames} video frames, latent {h}x{w}) in {generate_s:.2f} s: "
          f"{video_frames / generate_s:.2f} video frames/s, first chunk {first_chunk_s:.3f} s (without VAE decode)")
    if writer is not None:
        print(f"with VAE decode: {video_frames / (generate_s + decode_s):.2f} video frames/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
