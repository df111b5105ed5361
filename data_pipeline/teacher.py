"""The teacher: `diffusers.WanPipeline` sampling latents for prompts, one shard at a time.

`TeacherWorker` is a plain class; `gen_teacher.py` makes it a Ray actor (one per GPU), so the teacher
is loaded once per actor and then serves shard after shard. The pipeline is built from the project's
loaders (`gd_train.model.backbone`): the real Wan2.1-T2V-1.3B from `pretrained_path`, or the tiny
random teacher (same classes, weights from `model.init_seed`, identical in every process).

Every sample is reproducible on its own: its noise comes from a CPU generator seeded from its stable
key (the same on any device), its length from the key or its CSV row (`data_pipeline.lengths`), and the
settings it was sampled with are stored in its metadata. A shard's prompts all have one length, so a
batch (`datagen.batch_size`) never mixes lengths and nothing is padded.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from data_pipeline.lengths import LengthPlanner, latent_frames
from data_pipeline.prompts import Prompt
from gd_train.config import Config, latent_shape
from gd_train.data.shards import SHARD_NAME, ShardRecord, TeacherSample, write_shard

STORAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SCHEDULER = "UniPCMultistepScheduler(prediction_type=flow_prediction, use_flow_sigmas=True)"


def sampling_settings(cfg: DictConfig) -> dict[str, Any]:
    """Everything that determines a sample besides its prompt and seed; stored with every sample and
    in the manifest (a rerun into the same folder must use the same). With a length policy other than
    `fixed`, `lengths` records it and `latent_shape` is [C, null, H, W] (F differs per shard)."""
    d, v = cfg.datagen, cfg.video
    policy = LengthPlanner.from_config(cfg).settings()
    shape = list(latent_shape(cfg))
    if policy is not None:
        shape[1] = None
    settings = {
        "teacher": str(cfg.pretrained_path) if cfg.pretrained_path else f"tiny(init_seed={cfg.model.init_seed})",
        "dtype": cfg.model.dtype, "storage_dtype": d.storage_dtype, "scheduler": SCHEDULER,
        "num_inference_steps": d.num_inference_steps, "guidance_scale": d.guidance_scale,
        "flow_shift": d.flow_shift, "negative_prompt": d.negative_prompt,
        "height": v.height, "width": v.width, "num_frames": v.num_frames, "fps": v.fps,
        "max_sequence_length": cfg.model.max_text_tokens, "batch_size": d.batch_size, "seed": cfg.seed,
        "latent_shape": shape,
    }
    if policy is not None:  # absent for fixed: folders written before per-sample lengths keep resuming
        settings["lengths"] = policy
    return settings


def sample_seed(base_seed: int, key: str) -> int:
    """The noise seed of one sample: a function of the run seed and the sample's stable key only."""
    return int.from_bytes(hashlib.sha256(f"{base_seed}/{key}".encode()).digest()[:8], "big") >> 1


def wants_preview(key: str, fraction: float) -> bool:
    """A fixed, key-determined subset (so a retried shard previews the same samples)."""
    return int(hashlib.sha256(f"preview/{key}".encode()).hexdigest()[:8], 16) < fraction * 16**8


@dataclass(frozen=True)
class ShardTask:
    index: int
    prompts: tuple[Prompt, ...]

    @property
    def name(self) -> str:
        return SHARD_NAME.format(index=self.index)

    @property
    def num_frames(self) -> Optional[int]:
        """The planned length of every prompt of the shard (None: video.num_frames)."""
        return self.prompts[0].num_frames if self.prompts else None


@dataclass(frozen=True)
class ShardResult:
    name: str
    record: ShardRecord
    attempt: int
    host: str
    seconds: float
    previews: int
    node: str = ""  # Ray node id: hostnames repeat on one-machine clusters


def config_from_container(data: dict[str, Any]) -> DictConfig:
    """Rebuild the typed, read-only config a driver sent to an actor."""
    cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(data))
    OmegaConf.set_readonly(cfg, True)
    return cfg


class TeacherWorker:
    """Loads the teacher once; `generate_shard` writes one complete shard per call."""

    def __init__(self, config: dict[str, Any], output_dir: str):
        from diffusers import WanPipeline

        from gd_train.model.backbone import PromptEncoder, load_scheduler, load_transformer, load_vae

        self.cfg = cfg = config_from_container(config)
        self.output_dir = Path(output_dir)
        self.device = torch.device("cuda" if cfg.datagen.num_gpus_per_worker > 0 and torch.cuda.is_available()
                                   else "cpu")
        self.encoder = PromptEncoder(cfg, device=self.device)
        self.pipe = WanPipeline(tokenizer=self.encoder.pipe.tokenizer, text_encoder=self.encoder.pipe.text_encoder,
                                vae=load_vae(cfg), scheduler=load_scheduler(cfg.datagen.flow_shift),
                                transformer=load_transformer(cfg)).to(self.device)
        self.pipe.set_progress_bar_config(disable=True)  # one tqdm bar per call would flood days of logs
        self.settings = sampling_settings(cfg)
        self.storage_dtype = STORAGE_DTYPES[cfg.datagen.storage_dtype]
        self.negative_embeds = None
        if cfg.datagen.guidance_scale > 1.0:
            self.negative_embeds = self.encoder.encode_padded([cfg.datagen.negative_prompt])

    def ready(self, marker: str) -> dict[str, Any]:
        """Where this worker runs, and whether it sees the driver's `marker` file in output_dir (a
        node without the shared filesystem would write shards nobody finds)."""
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        return {"host": socket.gethostname(), "pid": os.getpid(), "device": name, "node": ray_node_id(),
                "sees_output_dir": (self.output_dir / marker).is_file()}

    def generate_shard(self, task: ShardTask, attempt: int) -> ShardResult:
        start = time.perf_counter()
        kill_after_first = self.cfg.datagen.fault_kill_shard == task.index and attempt == 1
        previews = []
        record = write_shard(self.output_dir / task.name, self._samples(task.prompts, kill_after_first, previews),
                             attempt_tag=f"attempt{attempt}-{socket.gethostname()}-{os.getpid()}")
        return ShardResult(name=task.name, record=record, attempt=attempt, host=socket.gethostname(),
                           seconds=time.perf_counter() - start, previews=len(previews), node=ray_node_id())

    def _samples(self, prompts: Sequence[Prompt], kill_after_first: bool, previews: list[Path]) -> Iterator[TeacherSample]:
        batch_size = self.cfg.datagen.batch_size
        for begin in range(0, len(prompts), batch_size):
            for sample in self.sample(prompts[begin:begin + batch_size]):
                yield sample
                if kill_after_first:
                    # Fault injection: die as a crashed or pre-empted worker does, mid-shard, with no
                    # cleanup (the partial file stays behind; no exception reaches Ray).
                    os._exit(17)
                if wants_preview(sample.key, self.cfg.datagen.preview_fraction):
                    previews.append(self.write_preview(sample))

    @torch.no_grad()
    def sample(self, prompts: Sequence[Prompt]) -> list[TeacherSample]:
        """Teacher latents for prompts of one planned length (one pipeline call)."""
        d, v = self.cfg.datagen, self.cfg.video
        lengths = {p.num_frames or v.num_frames for p in prompts}
        if len(lengths) != 1:
            raise ValueError(f"one pipeline call samples one length; these prompts have {sorted(lengths)} frames")
        num_frames = lengths.pop()
        captions = [p.caption for p in prompts]
        padded = self.encoder.encode_padded(captions)  # (B, max_tokens, D), zero past each prompt
        tokens = self.encoder.token_counts(captions)
        seeds = [sample_seed(self.cfg.seed, p.key) for p in prompts]
        negative = None if self.negative_embeds is None else self.negative_embeds.expand(len(prompts), -1, -1)
        latents = self.pipe(
            prompt_embeds=padded, negative_prompt_embeds=negative, height=v.height, width=v.width,
            num_frames=num_frames, num_inference_steps=d.num_inference_steps, guidance_scale=d.guidance_scale,
            generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="latent",
            max_sequence_length=self.cfg.model.max_text_tokens).frames  # (B, 16, F, H, W), normalised
        return [TeacherSample(key=p.key, latents=latents[i].to("cpu", self.storage_dtype),
                              prompt_embeds=padded[i, :n].to("cpu", self.storage_dtype),
                              meta={"caption": p.caption, "seed": seed, "source_row": p.row, "source_line": p.line,
                                    "video": p.video, "num_frames": num_frames,
                                    "latent_frames": latent_frames(num_frames), "settings": self.settings})
                for i, (p, n, seed) in enumerate(zip(prompts, tokens, seeds))]

    def write_preview(self, sample: TeacherSample) -> Path:
        from gd_train.media import decode_latents, write_mp4

        frames = decode_latents(self.pipe.vae, sample.latents[None].float())[0]
        return write_mp4(frames, self.output_dir / "previews" / f"{sample.key}.mp4", fps=self.cfg.video.fps)


def ray_node_id() -> str:
    """The Ray node this process runs on ('' outside Ray): hostnames repeat on one-machine clusters."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    except Exception:
        return ""


def describe_worker_error(exc: BaseException) -> str:
    """One line for a failed attempt (Ray wraps task errors in multi-line tracebacks)."""
    cause = getattr(exc, "cause", None) or exc
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}"[:300]
