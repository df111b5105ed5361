"""`gd-generate`: config -> student (+ adapters) -> streaming generator (Algorithm 1) -> latents / mp4.

One video:
    gd-generate --config configs/model/tiny.yaml --latent-frames 8 --seed 0 --out runs/gen/sample.safetensors \\
        --mp4 runs/gen/sample.mp4 [--prompt TEXT | --prompt-embeds FILE] [--adapters DIR] [--no-kv-cache] [KEY=VALUE ...]
Image-to-video, and prompt switches by latent frame ("F:TEXT;F:TEXT" or a JSON file {"F": "TEXT"}):
    gd-generate --image first.png --prompt-schedule "0:a snowy valley at dusk;40:the valley at night" \\
        --latent-frames 80 --out runs/gen/valley.safetensors --mp4 runs/gen/valley.mp4
A prompt list, named the way VBench's evaluation expects (`DIR/<prompt>-<index>.mp4`, index 0..K-1):
    gd-generate --config CFG --adapters DIR --prompt-file prompts.txt --vbench-dir videos/greedy_distill/ \\
        --samples-per-prompt 5 --latent-frames 21
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from gd_train import vbench
from gd_train.config import ConfigError, load_config, to_yaml
from gd_train.pipeline import parse_prompt_schedule


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gd-generate", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--config", default="configs/model/tiny.yaml", help="YAML config (default: the tiny model)")
    p.add_argument("--latent-frames", type=int, default=None, help="latent frames to stream (default: generate.latent_frames)")
    p.add_argument("--seed", type=int, default=None, help="noise seed (default: generate.seed)")
    p.add_argument("--out", default=None, help="output .safetensors; holds `latents` (1, 16, N, H, W)")
    p.add_argument("--mp4", default=None, help="also decode with the VAE and write this mp4")
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default=None, help="text prompt, encoded by the configured UMT5 encoder")
    prompt.add_argument("--prompt-embeds", default=None, help="safetensors file with `prompt_embeds` (tokens, dim)")
    prompt.add_argument("--prompt-file", default=None, help="one prompt per line (with --vbench-dir)")
    p.add_argument("--vbench-dir", default=None, help="write <dir>/<prompt>-<index>.mp4 for every prompt")
    p.add_argument("--vbench-mode", default="standard", choices=["standard", "custom_input"],
                   help="standard: whole-prompt names, a name too long for the file system is refused; "
                        "custom_input: such prompts get short names and <dir>/vbench_prompts.json maps names to prompts")
    p.add_argument("--samples-per-prompt", type=int, default=5, help="videos per prompt in --vbench-dir mode")
    p.add_argument("--image", default=None, help="image-to-video: this image (PNG/JPEG) is x_0, the stream continues it")
    p.add_argument("--prompt-schedule", default=None,
                   help='prompt switches by latent frame: "0:a red fox;40:a blue bird" or a JSON file '
                        '{"0": "a red fox", "40": "a blue bird"}; frame 0 defaults to --prompt')
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


@dataclass
class StreamResult:
    latents: torch.Tensor  # (1, 16, N, H, W) on CPU
    generate_s: float
    decode_s: float
    first_chunk_s: float
    mp4_frames: int


class Generator:
    """The CLI's use of `GreedyDistillPipeline`: the same loaded parts, plus files, timing and progress."""

    def __init__(self, cfg, device: torch.device, adapters: Optional[str], kv_cache: bool,
                 steps: Optional[list[int]], need_text: bool, need_vae: bool):
        from gd_train.pipeline import GreedyDistillPipeline

        self.pipe = GreedyDistillPipeline(cfg, device=device, adapters=adapters, kv_cache=kv_cache, steps=steps,
                                          text_encoder=need_text, vae=need_vae)
        self.cfg, self.device = cfg, device
        self.student, self.settings, self.vae = self.pipe.student, self.pipe.settings, self.pipe.vae

    def encode(self, prompt: str) -> torch.Tensor:
        return self.pipe.encode_prompt(prompt)

    def run(self, prompt_embeds: torch.Tensor, n_frames: int, seed: int, mp4: Optional[Path],
            negative: Optional[torch.Tensor] = None, progress: bool = True,
            first_frame: Optional[torch.Tensor] = None, schedule=None) -> StreamResult:
        from tqdm import tqdm

        from gd_train.media import Mp4Writer, StreamingDecoder

        writer = Mp4Writer(mp4, fps=self.cfg.video.fps) if mp4 is not None else None
        decoder = StreamingDecoder(self.vae) if mp4 is not None else None
        frames, generate_s, decode_s, first_chunk_s = [], 0.0, 0.0, None
        chunks = self.pipe.latent_stream(prompt_embeds, n_frames, seed, negative_embeds=negative,
                                         first_frame=first_frame, schedule=schedule)
        tick = time.perf_counter()
        try:
            for frame in tqdm(chunks, total=n_frames, desc="chunks", unit="chunk", file=sys.stderr,
                              disable=not progress):
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                generate_s += time.perf_counter() - tick
                first_chunk_s = generate_s if first_chunk_s is None else first_chunk_s
                frames.append(frame.float().cpu())
                if writer is not None:  # decode as we go: memory stays flat however long the stream
                    t0 = time.perf_counter()
                    writer.write(decoder.decode(frame)[0])
                    decode_s += time.perf_counter() - t0
                tick = time.perf_counter()
        except BaseException:
            if writer is not None:
                writer.__exit__(*sys.exc_info())
            raise
        if writer is not None:
            writer.close()
        return StreamResult(torch.cat(frames, dim=2), generate_s, decode_s, first_chunk_s,
                            writer.frames if writer is not None else 0)


def _parse_steps(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",")]
    except ValueError:
        raise ValueError(f"--steps {text!r}: expected comma-separated integer timesteps, e.g. 1000,750,500,250") from None


def _read_prompt_embeds(path: str, cfg) -> dict[str, torch.Tensor]:
    """The --prompt-embeds file, checked before any model is built: safetensors, with `prompt_embeds`
    (tokens, text_dim) or (1, tokens, text_dim) of the model's text width."""
    from safetensors.torch import load_file

    from gd_train.config import transformer_arch

    width = transformer_arch(cfg)["text_dim"]
    expected = f"a safetensors file with `prompt_embeds` of shape (tokens, {width})"
    if not Path(path).is_file():
        raise ValueError(f"--prompt-embeds {path}: no such file; expected {expected}")
    try:
        tensors = load_file(path)
    except Exception as exc:  # safetensors' own errors (SafetensorError, ...): not this format
        raise ValueError(f"--prompt-embeds {path}: unreadable ({type(exc).__name__}: {exc}); expected {expected}") from None
    emb = tensors.get("prompt_embeds")
    if emb is None:
        raise ValueError(f"--prompt-embeds {path}: no `prompt_embeds` tensor inside (has {sorted(tensors)}); "
                         f"expected {expected}")
    for name in ("prompt_embeds", "negative_prompt_embeds"):
        t = tensors.get(name)
        if t is None:
            continue
        if t.ndim not in (2, 3) or (t.ndim == 3 and t.shape[0] != 1) or t.shape[-1] != width:
            raise ValueError(f"--prompt-embeds {path}: `{name}` has shape {tuple(t.shape)}, expected (tokens, {width}) "
                             f"(the text width of this config's model)")
    return tensors


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    n_frames = args.latent_frames if args.latent_frames is not None else cfg.generate.latent_frames
    if n_frames < 1:
        raise ValueError(f"--latent-frames: expected >= 1, got {n_frames}")
    seed = args.seed if args.seed is not None else cfg.generate.seed
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    steps = _parse_steps(args.steps) if args.steps else None
    if args.vbench_dir or args.prompt_file:
        return run_prompt_list(args, cfg, n_frames, seed, device, steps)
    if args.out is None or Path(args.out).suffix != ".safetensors":
        raise ValueError(f"--out {args.out}: expected a .safetensors file name")

    tensors = _read_prompt_embeds(args.prompt_embeds, cfg) if args.prompt_embeds else None
    switches = parse_prompt_schedule(args.prompt_schedule) if args.prompt_schedule else {}
    if args.image is not None and not Path(args.image).is_file():
        raise FileNotFoundError(f"--image {args.image}: no such file (expected a PNG/JPEG image)")
    gen = Generator(cfg, device, args.adapters, kv_cache=not args.no_kv_cache, steps=steps,
                    need_text=args.prompt_embeds is None or bool(switches),
                    need_vae=args.mp4 is not None or args.image is not None)
    text_prompt = None
    negative = None
    if args.prompt_embeds:
        from gd_train.model.backbone import pad_prompt_embeds

        emb = tensors["prompt_embeds"]
        prompt_embeds = pad_prompt_embeds([emb[0] if emb.ndim == 3 else emb], cfg.model.max_text_tokens)
        if gen.settings.guidance_scale != 1.0:
            if "negative_prompt_embeds" not in tensors:
                raise ValueError(f"--prompt-embeds {args.prompt_embeds}: guidance needs `negative_prompt_embeds` too")
            negative = pad_prompt_embeds([tensors["negative_prompt_embeds"]], cfg.model.max_text_tokens)
    else:
        text_prompt = args.prompt if args.prompt is not None else cfg.generate.prompt
        prompt_embeds = gen.encode(text_prompt)

    from gd_train.infer.stream import PromptSchedule

    schedule = PromptSchedule()
    for frame, text in switches.items():
        schedule.switch(frame, gen.encode(text))
    first_frame = gen.pipe.encode_image(args.image) if args.image else None
    result = gen.run(prompt_embeds, n_frames, seed, Path(args.mp4) if args.mp4 else None, negative=negative,
                     first_frame=first_frame, schedule=schedule)
    from safetensors.torch import save_file

    out = Path(args.out)
    meta = {"seed": str(seed), "latent_frames": str(n_frames), "kv_cache": str(not args.no_kv_cache),
            "flow_shift": str(cfg.student.flow_shift), "sigmas": ",".join(f"{s:.6f}" for s in gen.settings.sigmas),
            "prompt": text_prompt or "", "adapters": args.adapters or "", "config": to_yaml(cfg),
            "prompt_schedule": json.dumps(switches), "image": args.image or ""}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({"latents": result.latents.contiguous()}, str(out), metadata=meta)
    print(f"wrote {out} latents {tuple(result.latents.shape)}")
    video_frames = 1 + 4 * (n_frames - 1)
    if args.mp4:
        print(f"wrote {args.mp4} ({result.mp4_frames} frames, {cfg.video.width}x{cfg.video.height}, {cfg.video.fps} fps)")
    print(f"generated {n_frames} latent frames ({video_frames} video frames) in {result.generate_s:.2f} s: "
          f"{video_frames / result.generate_s:.2f} video frames/s, first chunk {result.first_chunk_s:.3f} s "
          f"(without VAE decode)")
    if args.mp4:
        print(f"with VAE decode: {video_frames / (result.generate_s + result.decode_s):.2f} video frames/s")
    return 0


def run_prompt_list(args, cfg, n_frames: int, seed: int, device: torch.device, steps) -> int:
    """Every prompt x `--samples-per-prompt` videos, named as VBench expects. Sample k of prompt i uses
    seed `seed + i * K + k`, so any subset can be regenerated alone; existing files are kept (resume)."""
    if not (args.vbench_dir and args.prompt_file):
        raise ValueError("--prompt-file and --vbench-dir go together")
    if args.samples_per_prompt < 1:
        raise ValueError(f"--samples-per-prompt: expected >= 1, got {args.samples_per_prompt}")
    prompts = vbench.read_prompt_file(args.prompt_file)
    out_dir = Path(args.vbench_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    K = args.samples_per_prompt
    naming = vbench.Naming(out_dir, args.vbench_mode, prompts, K, args.prompt_file)  # refusals before any model
    gen = Generator(cfg, device, args.adapters, kv_cache=not args.no_kv_cache, steps=steps,
                    need_text=True, need_vae=True)
    done = skipped = 0
    for i, prompt in enumerate(p.text for p in prompts):
        embeds = None
        for k in range(K):
            path = naming.path(i, k)
            if path.exists():
                skipped += 1
                continue
            embeds = gen.encode(prompt) if embeds is None else embeds
            gen.run(embeds, n_frames, seed + i * K + k, path, progress=False)
            done += 1
        print(f"[{i + 1}/{len(prompts)}] {prompt[:60]!r}: {K} videos", flush=True)
    prompt_map = naming.write_prompt_map()
    print(f"wrote {done} videos to {out_dir} ({skipped} already there)"
          + (f" and the prompt map {prompt_map}" if prompt_map else "") + f"; evaluate with `{naming.evaluate_hint()}`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
