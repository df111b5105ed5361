"""Latents -> pixels -> mp4 and back: the Wan VAE (diffusers) and PyAV (FFmpeg's encoders)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


@torch.no_grad()
def decode_latents(vae, latents_bcfhw: torch.Tensor) -> np.ndarray:
    """Normalised latents (as `WanPipeline(output_type="latent")` returns them) -> uint8 video
    (B, T, H, W, 3) with T = 1 + 4 (F - 1)."""
    cfg = vae.config
    mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1)
    std = torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1)
    param = next(vae.parameters())
    latents = latents_bcfhw.to(param.device, param.dtype)
    latents = latents * std.to(latents) + mean.to(latents)
    video = vae.decode(latents, return_dict=False)[0]  # (B, 3, T, H, W) in [-1, 1]
    video = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return video.permute(0, 2, 3, 4, 1).cpu().numpy()


def write_mp4(frames_thwc: np.ndarray, path: str | Path, fps: int) -> Path:
    """H.264 (yuv420p, playable everywhere) through PyAV; the frame size must be even."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    T, H, W, _ = frames_thwc.shape
    if H % 2 or W % 2:
        raise ValueError(f"{path}: H.264 needs even frame sizes, got {W}x{H}")
    tmp = path.with_name(path.name + ".partial")
    with av.open(str(tmp), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.options = {"crf": "18", "preset": "fast"}
        for frame in frames_thwc:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    tmp.replace(path)  # a reader never sees a half-written mp4
    return path


def read_mp4(path: str | Path) -> np.ndarray:
    """Decode every frame back to (T, H, W, 3) uint8 (for tests and checks)."""
    import av

    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
