"""The public Python streaming API: weights + adapters -> decoded video frames, a clip or an endless stream.

    from diffusers.utils import export_to_video
    from gd_train import GreedyDistillPipeline

    pipe = GreedyDistillPipeline.from_pretrained("/models/Wan2.1-T2V-1.3B-Diffusers", "runs/stage2/export/step-00001000")
    video = pipe("a red fox in fresh snow", num_frames=21, seed=0).frames[0]   # (T, H, W, 3) floats in [0, 1]
    export_to_video(video, "fox.mp4", fps=pipe.fps)

    stream = pipe.stream("a red fox in fresh snow", seed=0)   # endless: one video frame per step
    for i, frame in enumerate(stream):                          # (H, W, 3) floats in [0, 1]
        if i == 100:
            stream.set_prompt("the fox jumps into a river")    # from the next latent frame on

Inside: the UMT5 text encoder (through `WanPipeline.encode_prompt`), the student with its two LoRA
adapters and c_f projection, Algorithm 1 (`gd_train.infer.stream`) and the Wan VAE's streaming decoder
(`gd_train.media.StreamingDecoder`): memory and time per frame stay constant however long the stream.
Frames are what diffusers' pipelines return with `output_type="np"`, so `export_to_video` takes them.
`image=` starts the stream from a given first frame (VAE-encoded as x_0).

Counting: `num_frames` is in latent frames (the stream's unit), as everywhere in gd-train; latent frame
f > 0 decodes to 4 video frames, frame 0 to 1, so F latent frames are 1 + 4 (F - 1) video frames.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from omegaconf import DictConfig

from gd_train.config import load_config

REPO_CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "model"


def parse_prompt_schedule(spec: str) -> dict[int, str]:
    """`"0:a red fox;40:a blue bird"` or a JSON file `{"0": "a red fox", "40": "a blue bird"}`: latent
    frame -> the prompt from that frame on. Bad entries are one line naming the entry."""
    where = f"--prompt-schedule {spec}"
    if spec.endswith(".json"):
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"{where}: no such file (expected JSON {{\"frame\": \"prompt\", ...}})")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: not JSON ({exc})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{where}: expected a JSON object {{\"frame\": \"prompt\", ...}}, got {type(raw).__name__}")
        items = list(raw.items())
    else:
        items = [part.split(":", 1) if ":" in part else (part, None) for part in spec.split(";") if part.strip()]
    schedule: dict[int, str] = {}
    for frame, prompt in items:
        try:
            f = int(str(frame).strip())
        except ValueError:
            f = -1
        if f < 0 or not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{where}: entry {frame!r}: expected FRAME:PROMPT with FRAME a latent frame index >= 0")
        if f in schedule:
            raise ValueError(f"{where}: frame {f} is given twice")
        schedule[f] = prompt.strip()
    if not schedule:
        raise ValueError(f"{where}: no entries (expected e.g. \"0:a red fox;40:a blue bird\")")
    return dict(sorted(schedule.items()))


@dataclass
class GreedyDistillPipelineOutput:
    frames: list[np.ndarray]  # one (T, H, W, 3) float32 array in [0, 1] (diffusers' output_type="np")
    latents: torch.Tensor  # (1, 16, F, h, w), normalised like the teacher latents, on CPU


class GreedyDistillPipeline:
    """Everything loaded once (student + adapters, text encoder, VAE), then any number of clips/streams."""

    def __init__(self, cfg: DictConfig, device: str | torch.device = "cpu", adapters: Optional[str | Path] = None,
                 kv_cache: bool = True, steps: Optional[Sequence[int]] = None, text_encoder: bool = True,
                 vae: bool = True):
        from gd_train.infer.stream import StreamingGenerator, StreamSettings
        from gd_train.model.backbone import PromptEncoder, load_vae
        from gd_train.model.student import GreedyDistillStudent

        self.cfg, self.device = cfg, torch.device(device)
        self.student = GreedyDistillStudent.from_config(cfg, device=self.device)
        if adapters:
            self.student.load_adapters(adapters)
        self.student.eval()
        self.settings = StreamSettings.from_config(cfg, kv_cache=kv_cache, steps=steps,
                                                   merged_adapters=bool(cfg.generate.merged_adapters))
        self.generator = StreamingGenerator(self.student, self.settings)
        self.encoder = PromptEncoder(cfg, device=self.device) if text_encoder else None
        self.vae = load_vae(cfg).to(self.device) if vae else None
        self.negative = None
        if self.encoder is not None and self.settings.guidance_scale != 1.0:
            self.negative = self.encoder.encode_padded([cfg.student.negative_prompt])

    @classmethod
    def from_pretrained(cls, pretrained_path: Optional[str | Path] = None, adapters: Optional[str | Path] = None, *,
                        config: Optional[str | Path] = None, overrides: Sequence[str] = (), device: str = "auto",
                        **kwargs) -> "GreedyDistillPipeline":
        """`pretrained_path`: a local Wan2.1-T2V-1.3B-Diffusers folder (None: the tiny random-weight model);
        `adapters`: an exported adapters folder (`gd-train ckpt export`), a checkpoint or a run folder
        (None: no adapters, i.e. the teacher's weights in the student's layout). `config`: a YAML
        (default: configs/model/wan2.1-t2v-1.3b.yaml with weights, the tiny schema default without);
        the adapters' own rank/alpha/targets always win over the config's."""
        from gd_train.checkpoint import adapters_folder

        if config is None and pretrained_path is not None and (REPO_CONFIGS / "wan2.1-t2v-1.3b.yaml").is_file():
            config = REPO_CONFIGS / "wan2.1-t2v-1.3b.yaml"
        extra = [f"pretrained_path={pretrained_path}"] if pretrained_path is not None else []
        folder = None
        if adapters is not None:
            folder = adapters_folder(adapters)
            for name in ("etm", "sdd"):
                saved = json.loads((folder / name / "adapter_config.json").read_text())
                extra += [f"student.{name}_lora.rank={int(saved['r'])}",
                          f"student.{name}_lora.alpha={int(saved['lora_alpha'])}",
                          f"student.{name}_lora.target_modules={json.dumps(sorted(saved['target_modules']))}"]
        cfg = load_config(str(config) if config is not None else None, [*extra, *overrides])
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        return cls(cfg, device=device, adapters=folder, **kwargs)

    # ------------------------------------------------------------------------------------------
    @property
    def fps(self) -> int:
        return int(self.cfg.video.fps)

    def encode_prompt(self, prompt: str) -> torch.Tensor:
        """(1, model.max_text_tokens, text_dim), zero-padded (what the stream takes)."""
        if self.encoder is None:
            raise ValueError("this pipeline was built without a text encoder (text_encoder=False)")
        return self.encoder.encode_padded([prompt])

    def encode_image(self, image) -> torch.Tensor:
        """A file or (H, W, 3) uint8 -> x_0 (1, 16, 1, h, w), normalised like the teacher latents."""
        from gd_train.media import encode_frame, read_image

        if self.vae is None:
            raise ValueError("this pipeline was built without a VAE (vae=False)")
        video = self.cfg.video
        if not isinstance(image, np.ndarray):
            image = read_image(image, video.width, video.height)
        if image.shape != (video.height, video.width, 3) or image.dtype != np.uint8:
            raise ValueError(f"image: expected uint8 ({video.height}, {video.width}, 3) (video.height, video.width), "
                             f"got {image.dtype} {image.shape}")
        return encode_frame(self.vae, image).to(self.device)

    def latent_stream(self, prompt_embeds: torch.Tensor, num_frames: Optional[int], seed: int, *,
                      negative_embeds: Optional[torch.Tensor] = None, first_frame: Optional[torch.Tensor] = None,
                      schedule=None) -> Iterator[torch.Tensor]:
        """Algorithm 1's latents, (1, 16, 1, h, w) each; `num_frames=None` never stops."""
        negative = negative_embeds if negative_embeds is not None else self.negative
        return self.generator.stream(prompt_embeds.to(self.device), num_frames, seed, negative,
                                     first_frame=first_frame, schedule=schedule)

    def stream(self, prompt: str, seed: int = 0, *, image=None, num_frames: Optional[int] = None) -> "VideoStream":
        """Decoded video frames, one (H, W, 3) float32 array in [0, 1] per step; endless by default."""
        return VideoStream(self, prompt, seed, image, num_frames)

    def __call__(self, prompt: str, num_frames: Optional[int] = None, seed: int = 0, *, image=None,
                 prompt_schedule: Optional[dict[int, str] | str] = None,
                 output_type: str = "np") -> GreedyDistillPipelineOutput:
        """One clip of `num_frames` latent frames (default generate.latent_frames). `prompt_schedule`:
        {latent frame: prompt} switches (or a `parse_prompt_schedule` string); `output_type`: "np" or
        "latent" (frames left empty, no decode)."""
        if output_type not in ("np", "latent"):
            raise ValueError(f"output_type: expected 'np' or 'latent', got {output_type!r}")
        n = int(num_frames if num_frames is not None else self.cfg.generate.latent_frames)
        stream = VideoStream(self, prompt, seed, image, n, decode=output_type == "np")
        if isinstance(prompt_schedule, str):
            prompt_schedule = parse_prompt_schedule(prompt_schedule)
        for frame, text in sorted((prompt_schedule or {}).items()):
            stream.set_prompt(text, at=frame)
        if output_type == "np":
            frames = [np.stack(list(stream))]
        else:
            frames = []
            for _ in stream.latents_iter():
                pass
        return GreedyDistillPipelineOutput(frames=frames, latents=torch.cat(stream.latents, dim=2))


class VideoStream:
    """Iterates decoded video frames; `set_prompt` between frames switches the prompt from the next latent
    frame not yet generated. Keeps every latent in `latents` only for finite clips."""

    def __init__(self, pipe: GreedyDistillPipeline, prompt: str, seed: int, image, num_frames: Optional[int],
                 decode: bool = True):
        from gd_train.infer.stream import PromptSchedule
        from gd_train.media import StreamingDecoder

        if decode and pipe.vae is None:
            raise ValueError("this pipeline was built without a VAE (vae=False): use output_type='latent'")
        self.pipe = pipe
        self.schedule = PromptSchedule()
        first = pipe.encode_image(image) if image is not None else None
        self._latents = pipe.latent_stream(pipe.encode_prompt(prompt), num_frames, seed, first_frame=first,
                                           schedule=self.schedule)
        self._decoder = StreamingDecoder(pipe.vae) if decode else None
        self.latents: list[torch.Tensor] = []
        self._keep = num_frames is not None

    def set_prompt(self, prompt: str, at: Optional[int] = None) -> None:
        """From latent frame `at` on (default: the next one not yet generated), stream under `prompt`."""
        frame = self.schedule.next_frame if at is None else at
        self.schedule.switch(frame, self.pipe.encode_prompt(prompt))

    @property
    def next_latent_frame(self) -> int:
        return self.schedule.next_frame

    def latents_iter(self) -> Iterator[torch.Tensor]:
        for latent in self._latents:
            if self._keep:
                self.latents.append(latent.float().cpu())
            yield latent

    def __iter__(self) -> Iterator[np.ndarray]:
        for latent in self.latents_iter():
            for frame in self._decoder.decode(latent)[0]:
                yield frame.astype(np.float32) / 255.0
