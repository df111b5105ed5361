"""The typed configuration of gd-train: schema defaults -> YAML file(s) -> CLI dot-list overrides.

One schema (`Config`) serves every command; each command reads the sections it needs. The schema's
defaults *are* the tiny model (random weights, same diffusers classes), so a bare `load_config()` or
`configs/model/tiny.yaml` runs anywhere. A YAML file may name other YAML files under `include:`
(paths relative to itself); they are merged first, in order, then the file itself, then overrides.

Every mistake is reported on one line that names the file, the key and what was expected
(`ConfigError`), e.g. ``configs/x.yaml: unknown key 'student.etm_windw' (did you mean 'student.etm_window'?)``.
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

# Wan2.1's own negative prompt (the one its pipeline examples and model card use). CFG with "" is a
# different, weaker guidance signal than the one the teacher was tuned with (DESIGN §2).
WAN_NEGATIVE_PROMPT = (
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, "
    "static, overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra "
    "fingers, poorly drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, fused "
    "fingers, still picture, messy background, three legs, many people in the background, walking "
    "backwards"
)


class ConfigError(ValueError):
    """A configuration problem, described in one line (file, key, what was expected)."""


# --------------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------------
@dataclass
class TransformerArch:
    """`diffusers.WanTransformer3DModel` constructor arguments (ignored when `pretrained_path` is set:
    the architecture then comes from `<pretrained_path>/transformer/config.json`)."""

    patch_size: list[int] = field(default_factory=lambda: [1, 2, 2])
    num_attention_heads: int = 2
    attention_head_dim: int = 12
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 32
    freq_dim: int = 256
    ffn_dim: int = 32
    num_layers: int = 2
    cross_attn_norm: bool = True
    qk_norm: str = "rms_norm_across_heads"
    eps: float = 1e-6
    rope_max_seq_len: int = 1024


@dataclass
class VaeArch:
    """`diffusers.AutoencoderKLWan` constructor arguments for the random-weight model."""

    base_dim: int = 3
    z_dim: int = 16
    dim_mult: list[int] = field(default_factory=lambda: [1, 1, 1, 1])
    num_res_blocks: int = 1
    temperal_downsample: list[bool] = field(default_factory=lambda: [False, True, True])


@dataclass
class TextEncoderArch:
    """`transformers.UMT5EncoderModel` arguments for the random-weight model (byte-level tokenizer)."""

    d_model: int = 32
    d_kv: int = 8
    d_ff: int = 64
    num_layers: int = 2
    num_heads: int = 4
    relative_attention_num_buckets: int = 8


@dataclass
class ModelConfig:
    transformer: TransformerArch = field(default_factory=TransformerArch)
    vae: VaeArch = field(default_factory=VaeArch)
    text_encoder: TextEncoderArch = field(default_factory=TextEncoderArch)
    # Seed of the random weights when no `pretrained_path` is given: every process that builds the tiny
    # model gets the same weights, so teacher data, training and generation agree.
    init_seed: int = 0
    dtype: str = "float32"  # float32 | bfloat16
    attention_backend: str = "auto"  # auto (flex on CUDA, SDPA on CPU) | sdpa | flex
    max_text_tokens: int = 512  # UMT5 context: embeddings are zero-padded to this length


@dataclass
class VideoConfig:
    """Pixel geometry; latents are (16, 1 + (num_frames - 1) / 4, height / 8, width / 8)."""

    height: int = 64
    width: int = 96
    num_frames: int = 21
    fps: int = 16


@dataclass
class LoraSpec:
    rank: int = 4
    alpha: int = 4
    target_modules: list[str] = field(
        default_factory=lambda: ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                                 "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
                                 "ffn.net.0.proj", "ffn.net.2"]
    )
    dropout: float = 0.0


@dataclass
class StudentConfig:
    etm_window: int = 3  # w of Eq. (1): a chunk sees itself and the w chunks before it
    etm_lora: LoraSpec = field(default_factory=LoraSpec)
    sdd_lora: LoraSpec = field(default_factory=LoraSpec)
    # Flow shift of the student's few-step schedule: sigma' = s*sigma / (1 + (s-1)*sigma).
    flow_shift: float = 5.0
    denoising_steps: list[int] = field(default_factory=lambda: [1000, 750, 500, 250])
    guidance_scale: float = 1.0  # 1.0 = no classifier-free guidance
    negative_prompt: str = WAN_NEGATIVE_PROMPT
    # Algorithm 1 starts from a noise frame x_0; we denoise it with the same SDD and no context, so
    # stage 1 also trains that f = 0 term (see docs/design.md).
    train_first_frame: bool = True
    gradient_checkpointing: bool = False
    # Mixed lengths: checkpointing on for steps whose clips have at least this many latent frames (None:
    # `gradient_checkpointing` alone decides, at every length).
    gradient_checkpointing_min_frames: Optional[int] = None


@dataclass
class GenerateConfig:
    latent_frames: int = 8
    seed: int = 0
    prompt: str = "a red fox running through fresh snow, cinematic lighting"
    kv_cache: bool = True
    # Passes through per-adapter merged weights, not PEFT's LoRA layers (same output to rounding;
    # costs one extra copy of the adapted weights per adapter: ~2.8 GB each at 1.3B in bf16)
    merged_adapters: bool = True


@dataclass
class PromptFilters:
    """Which valid CSV rows become prompts (applied in this order; every drop is counted)."""

    min_aesthetic_score: Optional[float] = None  # OpenVidHD's `aesthetic score` column
    min_motion_score: Optional[float] = None  # OpenVidHD's `motion score` column
    dedupe_captions: bool = True  # keep the first row of each caption
    max_prompts: Optional[int] = None  # keep the first N rows left after the filters above


@dataclass
class LengthPolicy:
    """How many frames each prompt's teacher clip gets (pixel frames, 1 + 4k; docs/data.md). The choice
    is a function of the prompt's key and the policy only: the same on every worker, rerun and retry."""

    mode: str = "fixed"  # fixed (video.num_frames) | choices (a weighted list) | source (the CSV row's duration)
    choices: list[int] = field(default_factory=list)  # choices: the lengths to draw from
    weights: list[float] = field(default_factory=list)  # choices: their weights (empty: equal)
    # source: the clip's duration (OpenVidHD `seconds`, else `frame` / `fps`) at video.fps, snapped to the
    # nearest 1 + 4k inside [min_frames, max_frames]
    min_frames: int = 81
    max_frames: int = 301
    on_missing: str = "bad_row"  # source, a row without a readable duration: bad_row (reported, left out) | fixed


@dataclass
class DatagenConfig:
    """Teacher-data generation (`data_pipeline/gen_teacher.py`)."""

    samples_per_shard: int = 8
    num_workers: int = 1  # Ray actors, each loading the teacher once; 0 = one per GPU of the cluster
    num_gpus_per_worker: float = 0.0  # 1 on a GPU cluster (0: CPU actors)
    num_cpus_per_worker: float = 1.0
    max_attempts: int = 3  # per shard, then reported as failed (a rerun tries it again)
    max_worker_restarts: int = 3  # Ray restarts of a dead actor before it is retired
    batch_size: int = 1  # prompts per pipeline call
    num_inference_steps: int = 50
    guidance_scale: float = 5.0
    flow_shift: float = 3.0  # diffusers' Wan2.1 480p value
    negative_prompt: str = WAN_NEGATIVE_PROMPT
    storage_dtype: str = "float32"  # float32 | bfloat16: how latents and prompt embeddings are stored
    preview_fraction: float = 0.0  # fraction of samples that also get a preview mp4 (chosen by key)
    progress_every_s: float = 30.0  # at most this long between progress lines
    min_free_disk_gb: float = 1.0  # headroom left free after the planned shards (checked at start)
    # On SIGTERM / SIGINT (`ray job stop`): how long in-flight shards may still finish before they are
    # abandoned. Keep it below the SIGKILL deadline: Ray's RAY_JOB_STOP_WAIT_TIME_S (3 s by default).
    stop_wait_s: float = 0.0
    # Testing: the worker process exits abruptly after writing the first sample of this shard, on the
    # shard's first attempt only (a worker death mid-shard, for the retry path).
    fault_kill_shard: Optional[int] = None
    filters: PromptFilters = field(default_factory=PromptFilters)
    lengths: LengthPolicy = field(default_factory=LengthPolicy)


@dataclass
class DataConfig:
    """The training-side shard reader (`gd_train.data.reader`)."""

    shards: str = "runs/data/shards"  # a folder of shard-*.tar (with manifest.json) or a brace pattern
    num_workers: int = 2  # dataloader workers per rank
    # Per clip length, blocks of one step's samples are permuted within windows of this many samples, and
    # each rank's share of a step is shuffled (0: stored order); shards are reordered every epoch anyway.
    shuffle_buffer: int = 64
    resampled: bool = False  # True: sample shards with replacement, fixed steps per epoch on every rank
    # Held-out shards for `train.eval_every` (never read for training; must differ from `shards`).
    eval_shards: Optional[str] = None
    # Shards found damaged or missing at start (folder vs manifest.json, truncated tars): "continue" leaves
    # them out and reports each in one line; "refuse" stops before any rank starts. Damage met while
    # reading (verified against the manifest's digests) is always dropped, reported and counted.
    on_damage: str = "continue"
    # An unreadable sample's slot is refilled by a repeat of a readable one (the default: no pass over the
    # data at start). strict: one verifying pass at start, split over the ranks, and every epoch is
    # planned from the readable samples only, so no sample is read twice (docs/data.md).
    strict: bool = False
    # Clip lengths (pixel frames) a run trains on: shards holding other lengths are left out, each reported
    # once (None: no bound). Every optimizer step reads one length, the same on every rank (docs/data.md).
    min_frames: Optional[int] = None
    max_frames: Optional[int] = None


@dataclass
class TrainConfig:
    """The DeepSpeed loop shared by stage 1 and stage 2 (`gd_train.train`; docs/training.md)."""

    stage: Optional[str] = None  # stage1 | stage2; set by the command (`gd-train stage1|stage2`)
    epochs: int = 10
    max_steps: Optional[int] = None  # stop after this many optimizer steps (None: run all epochs)
    # global = micro x gradient accumulation x world size; a combination that does not divide is refused
    global_batch_size: int = 4
    micro_batch_size: int = 1  # at the shortest length of the data (see micro_batch_policy)
    # Mixed lengths (docs/training.md, "Lengths and batches"). The micro-batch at latent length F:
    # fixed = micro_batch_size at every length; token_budget = micro_batch_size x F_min // F (at least 1);
    # micro_batch_table (latent frames -> micro-batch) overrides either for the lengths it names.
    micro_batch_policy: str = "fixed"
    micro_batch_table: dict[str, int] = field(default_factory=dict)  # keys: latent frames, e.g. {"21": 2}
    # samples: every step holds global_batch_size samples (accumulation recomputed per length);
    # tokens: every step holds the tokens of global_batch_size samples at the shortest length (accumulation
    # fixed, fewer samples per step at longer lengths).
    batch_unit: str = "samples"
    adapters: list[str] = field(default_factory=lambda: ["etm", "sdd"])  # the others stay frozen
    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: str = "constant"  # constant | cosine (to min_lr_ratio x lr at the last step)
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0  # 0: no clipping
    zero_stage: int = 2  # DeepSpeed ZeRO stage: 2 (default) or 3 (parameters sharded too)
    zero3_param_persistence_threshold: int = 100_000  # ZeRO-3: smaller parameters stay whole on every rank
    # ZeRO-3: most elements gathered at once / a gathered parameter is kept if reused within this many
    # elements. None: two / one transformer block(s) (DeepSpeed's 1e9 keeps most of a frozen 1.3B base
    # gathered between forward and backward, more memory than ZeRO-2; see docs/training.md).
    zero3_max_live_parameters: Optional[int] = None
    zero3_max_reuse_distance: Optional[int] = None
    # CPU ranks (glibc): blocks of at least this many bytes are mapped and given back on free. None: glibc's
    # adaptive threshold, under which ZeRO-3's freed gather buffers stayed resident (gd_train/train/host_memory.py)
    cpu_mmap_threshold: Optional[int] = 1_048_576
    checkpoint_every: int = 100  # optimizer steps
    keep_last: int = 3  # complete checkpoints kept (older ones are deleted)
    log_every: int = 1
    video_every: int = 0  # 0: no sample videos in TensorBoard
    max_bad_steps: int = 5  # consecutive NaN/inf losses before the run aborts
    init_from: Optional[str] = None  # a run folder (its latest), a checkpoint folder or exported adapters
    teacher_guidance_scale: float = 5.0  # stage 2: CFG of the teacher score s_real (Wan's default)
    rl_score_level: str = "next"  # stage 2: where mu is re-noised for scoring: next | uniform
    # stage 2: DMD's fake score s_gen. sdd: the SDD itself (the paper; DESIGN §4's default) | critic: a third
    # LoRA adapter copied from the SDD at the start of stage 2 and trained alongside it on the student's
    # outputs by flow matching (public DMD code's reading; docs/training.md, "A separate critic")
    rl_fake_score: str = "sdd"
    trace: bool = False  # per-rank trace/rank-*.jsonl: sample keys, local loss, (f, t) per micro-step
    # Periodic evaluation (gd_train/eval/evaluators.py), logged under eval/ in TensorBoard and metrics.jsonl:
    eval_every: int = 0  # optimizer steps between evaluations (0: none); also once before the first step
    eval_evaluator: str = "distance"  # distance (student-to-teacher latent MSE) | world (the toy world's metrics)
    eval_samples: int = 8  # held-out samples scored: the first N of data.eval_shards
    eval_frames: Optional[int] = None  # latent frames streamed per sample (None: the samples' own length)


@dataclass
class Config:
    # Local folder in the Wan2.1-T2V-1.3B-Diffusers layout (transformer/, vae/, text_encoder/,
    # tokenizer/). None: the tiny random-weight model described by `model`.
    pretrained_path: Optional[str] = None
    seed: int = 0
    output_dir: str = "runs/default"  # what a command writes: shards (datagen), the run folder (training)
    prompts_csv: Optional[str] = None  # OpenVidHD-layout CSV of prompts (datagen)
    video: VideoConfig = field(default_factory=VideoConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    datagen: DatagenConfig = field(default_factory=DatagenConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------
OPEN_MAPPINGS = ("train.micro_batch_table",)


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = (),
                schema: type = Config) -> DictConfig:
    """Defaults -> YAML (with its `include:` chain) -> dot-list overrides, validated, read-only."""
    cfg = OmegaConf.structured(schema)
    OmegaConf.set_struct(cfg, True)
    for key in OPEN_MAPPINGS:  # free-form tables: their keys are data, not schema
        if OmegaConf.select(cfg, key) is not None:
            OmegaConf.set_struct(OmegaConf.select(cfg, key), False)
    if path is not None:
        for source, data in _yaml_chain(Path(path)):
            cfg = _merge(cfg, data, source)
            # A merge skips `???` values; re-mark them so that the key must be set later (validate()).
            for key in _missing_paths(data):
                OmegaConf.update(cfg, key, "???", merge=False)
    if overrides:
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override '{item}': expected KEY=VALUE (e.g. student.etm_window=3)")
        cfg = _merge(cfg, OmegaConf.from_dotlist(list(overrides)), "command-line override")
    validate(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _yaml_chain(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[str, DictConfig]]:
    path = path.resolve() if path.is_absolute() else (Path.cwd() / path).resolve()
    if not path.is_file():
        raise ConfigError(f"config file {path}: not found (expected a YAML file, e.g. configs/model/tiny.yaml)")
    if path in seen:
        raise ConfigError(f"config file {path}: includes itself (chain: {' -> '.join(map(str, seen))})")
    try:
        data = OmegaConf.load(path)
    except Exception as exc:  # yaml.YAMLError and friends: report as one line
        raise ConfigError(f"config file {path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, DictConfig):
        raise ConfigError(f"config file {path}: expected a mapping at top level, got {type(data).__name__}")
    chain: list[tuple[str, DictConfig]] = []
    includes = data.pop("include", None) or []
    if isinstance(includes, str):
        includes = [includes]
    for inc in includes:
        chain += _yaml_chain(path.parent / str(inc), seen + (path,))
    chain.append((str(path), data))
    return chain


def _merge(cfg: DictConfig, data: DictConfig, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(cfg, data)
    except ConfigKeyError as exc:
        key = _full_key(exc)
        hint = _nearest_key(cfg, key)
        raise ConfigError(f"{source}: unknown key '{key}'" + (f" (did you mean '{hint}'?)" if hint else "")) from None
    except ValidationError as exc:
        key = _full_key(exc)
        raise ConfigError(f"{source}: key '{key}': {_first_line(exc)}") from None
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{source}: {_first_line(exc)}") from None


def _missing_paths(node: DictConfig, prefix: str = "") -> list[str]:
    out = []
    for key in node.keys():
        full = f"{prefix}.{key}" if prefix else str(key)
        if OmegaConf.is_missing(node, key):
            out.append(full)
        elif isinstance(node._get_node(key), DictConfig):
            out += _missing_paths(node[key], full)
    return out


def _full_key(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None) or getattr(exc, "key", None) or "?"
    return str(key)


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _all_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    if isinstance(node, DictConfig):
        for k in node.keys():
            full = f"{prefix}.{k}" if prefix else str(k)
            keys.append(full)
            keys += _all_keys(node._get_node(k), full)
    return keys


def _nearest_key(cfg: DictConfig, key: str) -> Optional[str]:
    candidates = _all_keys(cfg)
    parent = key.rsplit(".", 1)[0] if "." in key else ""
    siblings = [c for c in candidates if (c.rsplit(".", 1)[0] if "." in c else "") == parent]
    match = difflib.get_close_matches(key, siblings, n=1, cutoff=0.6) or difflib.get_close_matches(
        key, candidates, n=1, cutoff=0.6)
    return match[0] if match else None


# --------------------------------------------------------------------------------------------------
# Validation and derived quantities
# --------------------------------------------------------------------------------------------------
VAE_TEMPORAL, VAE_SPATIAL = 4, 8

EXPECTED_LAYOUT = ("a Wan2.1-T2V-1.3B-Diffusers folder holding transformer/ (config.json + "
                   "*.safetensors), vae/, text_encoder/ and tokenizer/")


# What to say when a config leaves a key mandatory (`???`) and the command line does not set it.
MISSING_HINTS = {
    "pretrained_path": "pretrained_path=/path/to/Wan2.1-T2V-1.3B-Diffusers (the local diffusers folder; "
                       "pretrained_path=null builds random weights, for speed tests only)",
    "prompts_csv": "prompts_csv=/path/to/OpenVidHD.csv",
    "output_dir": "output_dir=/shared/path (absolute, on a filesystem every node sees)",
}


def validate(cfg: DictConfig) -> None:
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        names = ", ".join(f"'{k}'" for k in missing)
        hints = "; ".join(MISSING_HINTS.get(k, k + "=VALUE") for k in missing)
        raise ConfigError(f"key{'s' if len(missing) > 1 else ''} {names}: must be set for this config; add {hints}")
    v = cfg.video
    if v.num_frames < 1 or (v.num_frames - 1) % VAE_TEMPORAL:
        raise ConfigError(f"key 'video.num_frames': {v.num_frames} is not 1 + 4k (the Wan VAE compresses time by 4)")
    for name in ("height", "width"):
        size = v[name]
        if size <= 0 or size % (VAE_SPATIAL * 2):
            raise ConfigError(f"key 'video.{name}': {size} is not a positive multiple of 16 (VAE x8, patch x2)")
    s = cfg.student
    if s.etm_window < 0:
        raise ConfigError(f"key 'student.etm_window': expected >= 0, got {s.etm_window}")
    steps = list(s.denoising_steps)
    if not steps or any(not 0 < t <= 1000 for t in steps) or steps != sorted(steps, reverse=True):
        raise ConfigError(f"key 'student.denoising_steps': expected decreasing values in (0, 1000], got {steps}")
    if s.flow_shift <= 0:
        raise ConfigError(f"key 'student.flow_shift': expected > 0, got {s.flow_shift}")
    if cfg.model.dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"key 'model.dtype': expected 'float32' or 'bfloat16', got '{cfg.model.dtype}'")
    if cfg.model.attention_backend not in ("auto", "sdpa", "flex"):
        raise ConfigError(f"key 'model.attention_backend': expected auto|sdpa|flex, got '{cfg.model.attention_backend}'")
    if cfg.pretrained_path is not None:
        check_pretrained_folder(cfg.pretrained_path, parts=("transformer",))
    _validate_eval(cfg)
    _validate_fake_score(cfg)


def _validate_eval(cfg: DictConfig) -> None:
    t, d = cfg.train, cfg.data
    if t.eval_every < 0:
        raise ConfigError(f"key 'train.eval_every': expected >= 0 (0: no evaluation), got {t.eval_every}")
    if t.eval_evaluator not in ("distance", "world"):
        raise ConfigError(f"key 'train.eval_evaluator': expected distance|world, got '{t.eval_evaluator}'")
    if t.eval_every and d.eval_shards is None:
        raise ConfigError("key 'data.eval_shards': train.eval_every is set but no held-out shards are given "
                          "(data.eval_shards=DIR, a folder of teacher shards not used for training)")
    if d.eval_shards is not None and os.path.abspath(str(d.eval_shards)) == os.path.abspath(str(d.shards)):
        raise ConfigError(f"key 'data.eval_shards': '{d.eval_shards}' is also data.shards; held-out samples must "
                          "not be training data")
    if t.eval_samples < 1 or (t.eval_frames is not None and t.eval_frames < 1):
        raise ConfigError(f"key 'train.eval_samples'/'train.eval_frames': expected >= 1, got "
                          f"{t.eval_samples}/{t.eval_frames}")


RL_FAKE_SCORES = ("sdd", "critic")


def _validate_fake_score(cfg: DictConfig) -> None:
    t = cfg.train
    if t.rl_fake_score not in RL_FAKE_SCORES:
        raise ConfigError(f"key 'train.rl_fake_score': expected one of {'|'.join(RL_FAKE_SCORES)}, got '{t.rl_fake_score}'")
    if t.rl_fake_score == "critic" and t.stage == "stage1":
        raise ConfigError("key 'train.rl_fake_score': 'critic' is a stage-2 option (stage 1 has no fake score); "
                          "leave it at 'sdd' for stage 1")


def check_pretrained_folder(root: str | os.PathLike, parts: Sequence[str]) -> Path:
    """Fail in one line when `root` lacks one of the diffusers sub-folders a command needs."""
    root_path = Path(root).expanduser()
    if not root_path.is_dir():
        raise ConfigError(f"pretrained_path '{root}': no such folder; expected {EXPECTED_LAYOUT}")
    for part in parts:
        sub = root_path / part
        if not sub.is_dir():
            raise ConfigError(f"pretrained_path '{root}': missing {part}/; expected {EXPECTED_LAYOUT}")
        if part in ("transformer", "vae", "text_encoder") and not (sub / "config.json").is_file():
            raise ConfigError(f"pretrained_path '{root}': missing {part}/config.json; expected {EXPECTED_LAYOUT}")
    return root_path


def latent_shape(cfg: DictConfig, latent_frames: Optional[int] = None) -> tuple[int, int, int, int]:
    """(C, F, H, W) of the latents of one clip (F from the video length unless given)."""
    v = cfg.video
    frames = latent_frames if latent_frames is not None else 1 + (v.num_frames - 1) // VAE_TEMPORAL
    return (transformer_arch(cfg)["in_channels"], frames, v.height // VAE_SPATIAL, v.width // VAE_SPATIAL)


def transformer_arch(cfg: DictConfig) -> dict[str, Any]:
    """The transformer's constructor arguments: from the pretrained folder when set, else the schema."""
    if cfg.pretrained_path is not None:
        root = check_pretrained_folder(cfg.pretrained_path, parts=("transformer",))
        with open(root / "transformer" / "config.json") as fh:
            arch = json.load(fh)
        return {k: v for k, v in arch.items() if not k.startswith("_")}
    arch = OmegaConf.to_container(cfg.model.transformer, resolve=True)
    arch["patch_size"] = tuple(arch["patch_size"])
    return arch


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def as_container(node: DictConfig | ListConfig) -> Any:
    return OmegaConf.to_container(node, resolve=True)
