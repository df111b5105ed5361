"""Latents -> pixels -> mp4 and back: the Wan VAE (diffusers) and PyAV (FFmpeg's encoders)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch


def _denormalise(vae, latents: torch.Tensor) -> torch.Tensor:
    cfg = vae.config
    param = next(vae.parameters())
    latents = latents.to(param.device, param.dtype)
    mean = torch.tensor(cfg.latents_mean, device=latents.device, dtype=latents.dtype).view(1, cfg.z_dim, 1, 1, 1)
    std = torch.tensor(cfg.latents_std, device=latents.device, dtype=latents.dtype).view(1, cfg.z_dim, 1, 1, 1)
    return latents * std + mean


def _to_uint8(video_bcthw: torch.Tensor) -> np.ndarray:
    video = ((video_bcthw.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return video.permute(0, 2, 3, 4, 1).cpu().numpy()  # (B, T, H, W, 3)


@torch.no_grad()
def decode_latents(vae, latents_bcfhw: torch.Tensor) -> np.ndarray:
    """Normalised latents (as `WanPipeline(output_type="latent")` returns them) -> uint8 video
    (B, T, H, W, 3) with T = 1 + 4 (F - 1)."""
    return _to_uint8(vae.decode(_denormalise(vae, latents_bcfhw), return_dict=False)[0])


def read_image(path: str | Path, width: int, height: int) -> np.ndarray:
    """An image file as (height, width, 3) uint8: centre-cropped to that aspect ratio, then resized."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--image {path}: no such file (expected a PNG/JPEG image)")
    try:
        image = Image.open(path).convert("RGB")
    except OSError as exc:
        raise ValueError(f"--image {path}: not a readable image ({exc})") from None
    w, h = image.size
    scale = min(w / width, h / height)
    cw, ch = round(width * scale), round(height * scale)
    left, top = (w - cw) // 2, (h - ch) // 2
    image = image.crop((left, top, left + cw, top + ch)).resize((width, height), Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.uint8).copy()


@torch.no_grad()
def encode_frame(vae, image_hw3: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> one normalised latent frame (1, z_dim, 1, h, w), the inverse of `decode_latents`'
    normalisation: the mode of the VAE's posterior (as diffusers' Wan I2V pipeline encodes its image)."""
    param = next(vae.parameters())
    pixels = torch.from_numpy(image_hw3).to(param.device, param.dtype).permute(2, 0, 1)[None, :, None]
    latents = vae.encode(pixels / 127.5 - 1.0).latent_dist.mode()
    cfg = vae.config
    mean = torch.tensor(cfg.latents_mean, device=latents.device, dtype=latents.dtype).view(1, cfg.z_dim, 1, 1, 1)
    std = torch.tensor(cfg.latents_std, device=latents.device, dtype=latents.dtype).view(1, cfg.z_dim, 1, 1, 1)
    return (latents - mean) / std


class StreamingDecoder:
    """Decode latent frames one at a time, carrying the Wan VAE's causal feature cache between calls.

    `AutoencoderKLWan.decode` runs exactly this per-frame loop internally, but only over a whole clip;
    an endless stream needs it one frame at a time (constant memory, decode overlapping generation).
    It uses the VAE's own decoder modules and cache layout (`_cached_conv_counts`), and a test holds
    it equal to `decode` on the whole clip.
    """

    def __init__(self, vae):
        if getattr(vae.config, "patch_size", None) is not None or getattr(vae, "use_tiling", False):
            raise ValueError("StreamingDecoder supports the Wan2.1 VAE without patching or tiling")
        self.vae = vae
        self._feat_map = [None] * vae._cached_conv_counts["decoder"]
        self._first = True

    @torch.no_grad()
    def decode(self, latent_bc1hw: torch.Tensor) -> np.ndarray:
        """One latent frame -> its uint8 video frames (B, 1 or 4, H, W, 3)."""
        x = self.vae.post_quant_conv(_denormalise(self.vae, latent_bc1hw))
        out = self.vae.decoder(x, feat_cache=self._feat_map, feat_idx=[0], first_chunk=self._first)
        self._first = False
        return _to_uint8(out)


class Mp4Writer:
    """H.264 (yuv420p, playable everywhere) through PyAV, frames appended as they come. Written under a
    temporary name and renamed on close, so a reader never sees a half-written file."""

    def __init__(self, path: str | Path, fps: int):
        import av

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # A short temporary name: the final one may already use all of the file system's NAME_MAX.
        digest = hashlib.sha256(self.path.name.encode()).hexdigest()[:16]
        self._tmp = self.path.with_name(f".{digest}.mp4.partial")
        self._container = av.open(str(self._tmp), mode="w", format="mp4")
        self._stream = None
        self.fps = fps
        self.frames = 0

    def write(self, frames_thwc: np.ndarray) -> None:
        import av

        if self._stream is None:
            _, H, W, _ = frames_thwc.shape
            if H % 2 or W % 2:
                raise ValueError(f"{self.path}: H.264 needs even frame sizes, got {W}x{H}")
            self._stream = self._container.add_stream("libx264", rate=self.fps)
            self._stream.width, self._stream.height, self._stream.pix_fmt = W, H, "yuv420p"
            self._stream.options = {"crf": "18", "preset": "fast"}
        for frame in frames_thwc:
            video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            for packet in self._stream.encode(video_frame):
                self._container.mux(packet)
            self.frames += 1

    def close(self) -> Path:
        if self._stream is not None:
            for packet in self._stream.encode():
                self._container.mux(packet)
        self._container.close()
        self._tmp.replace(self.path)
        return self.path

    def __enter__(self) -> "Mp4Writer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._container.close()
            self._tmp.unlink(missing_ok=True)


def write_mp4(frames_thwc: np.ndarray, path: str | Path, fps: int) -> Path:
    with Mp4Writer(path, fps) as writer:
        writer.write(frames_thwc)
    return writer.path


def read_mp4(path: str | Path) -> np.ndarray:
    """Decode every frame back to (T, H, W, 3) uint8 (for tests and checks)."""
    import av

    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
