"""Checkpoints of a training run: save (every rank), find, load, list, export.

Layout of `<run_dir>/checkpoints/`:

    latest                       one line: the tag of the newest *complete* checkpoint
    step-00000120/
      checkpoint.json            manifest (step, epoch, samples seen, world size, ...), written last
      config.yaml                the resolved config at that step
      state/trainable.safetensors  per parameter of the student's own weights (adapters + c_f):
                                 `fp32/<name>` (the master weight) and, for those that train,
                                 `exp_avg/<name>`, `exp_avg_sq/<name>` (AdamW's moments), whole tensors
      state/training.json        per-parameter AdamW step counts, the optimizer's parameter groups
                                 (lr, betas, ...), the lr scheduler and DeepSpeed's step counters
      trainer/rank-00000.json    each rank's reader position and RNG states
      adapters/etm/, adapters/sdd/   PEFT exports (adapter_model.safetensors + adapter_config.json)
      adapters/cf_proj.safetensors   the c_f projection
    .partial-step-00000140/      a save in progress (or one that crashed): never read

Nothing in it depends on how ZeRO partitioned the state when it was written: each tensor is whole,
gathered with DeepSpeed's per-parameter full-state getters (`deepspeed.utils.safe_get_full_*`) and set
back with their setters, which cut it into the partitions of *this* launch. So a checkpoint resumes on
any number of ranks and under ZeRO-0/1/2/3 alike. Tensors are safetensors, the rest JSON: no load path
here goes through pickle. DeepSpeed's own `engine.save_checkpoint` files (pickles, loaded with
`torch.load(weights_only=False)`) are no longer written.

A save is written under `.partial-<tag>`; only when every rank has finished does rank 0 write the
manifest, rename the folder to `<tag>` and then move `latest` (write-then-rename, atomic on POSIX file
systems). A crash at any point leaves either the previous `latest` or the new one, never a folder that
looks complete and is not. Keep-last-K deletes the oldest complete checkpoints after `latest` moved.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from gd_train import distributed

CHECKPOINTS = "checkpoints"
LATEST = "latest"
MANIFEST = "checkpoint.json"
PARTIAL_PREFIX = ".partial-"
FORMAT = "gd-train/checkpoint/v2"  # v2: per-parameter state in state/ instead of DeepSpeed's pickles
FORMAT_V1 = "gd-train/checkpoint/v1"  # adapters still readable (init_from, show, export); not resumable
ADAPTERS_DIR = "adapters"
TRAINER_DIR = "trainer"
STATE_DIR = "state"
TRAINABLE_FILE = f"{STATE_DIR}/trainable.safetensors"
TRAINING_FILE = f"{STATE_DIR}/training.json"
CONFIG_FILE = "config.yaml"  # written by the trainer through save(files=...); its `seed` derives RNGs
MOMENTS = ("exp_avg", "exp_avg_sq")  # AdamW's per-element state; `step` is one count per parameter


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or does not fit this launch (one line)."""


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


@dataclass
class Manifest:
    tag: str
    step: int  # optimizer steps completed
    epoch: int  # epoch of the next micro-batch
    samples_seen: int  # samples that went into optimizer steps (global)
    world_size: int
    zero_stage: int
    stage: str
    base_fingerprint: str  # sha256 of the frozen base weights: proves they never changed
    reason: str = "periodic"  # periodic | preempted | final
    skipped_micro_steps: int = 0  # NaN/inf losses skipped so far
    # Every file of the checkpoint (relative path -> bytes), listed by rank 0 once all ranks finished:
    # what `missing_files` checks before any rank loads it. Empty in checkpoints written before it.
    files: dict[str, int] = field(default_factory=dict)
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    format: str = FORMAT

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def read(cls, folder: Path) -> "Manifest":
        path = folder / MANIFEST
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"checkpoint {folder}: unreadable {MANIFEST} ({exc})") from None
        if data.get("format") not in (FORMAT, FORMAT_V1):
            raise CheckpointError(f"checkpoint {folder}: format {data.get('format')!r}, expected {FORMAT!r}")
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


# --------------------------------------------------------------------------------------------------
# Finding checkpoints
# --------------------------------------------------------------------------------------------------
def checkpoints_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CHECKPOINTS


def latest_tag(run_dir: str | os.PathLike) -> Optional[str]:
    path = checkpoints_dir(run_dir) / LATEST
    if not path.is_file():
        return None
    return path.read_text().strip() or None


def missing_files(folder: Path, manifest: Manifest) -> list[str]:
    """What an incomplete checkpoint lacks (a file gone, or of another size); [] when complete. For
    checkpoints without a file list: each rank's trainer state and DeepSpeed's model states."""
    expected = manifest.files or {f"{TRAINER_DIR}/rank-{r:05d}.json": None for r in range(manifest.world_size)}
    if not manifest.files:
        expected["mp_rank_00_model_states.pt"] = None
    problems = []
    for name, size in sorted(expected.items()):
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} missing")
        elif size is not None and path.stat().st_size != size:
            problems.append(f"{name} has {path.stat().st_size} bytes, the manifest says {size}")
    return problems


def _complete(folder: Path) -> tuple[Optional[Manifest], list[str]]:
    """(manifest, problems): problems is [] when the checkpoint can be loaded as it is."""
    if folder.name.startswith(PARTIAL_PREFIX) or not (folder / MANIFEST).is_file():
        return None, [f"no {MANIFEST} (a save that did not finish)"]
    try:
        manifest = Manifest.read(folder)
    except CheckpointError as exc:
        return None, [str(exc)]
    return manifest, missing_files(folder, manifest)


def resolve(path: str | os.PathLike, warn: Optional[Callable[[str], None]] = None) -> Path:
    """A complete checkpoint folder from a run folder (its `latest`) or a checkpoint folder itself.

    A checkpoint folder named explicitly must be complete. A run whose latest checkpoint has lost files
    falls back to its newest complete earlier checkpoint (`warn` gets one line saying so); with none,
    it is refused in one line."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        _, problems = _complete(path)
        if problems:
            raise CheckpointError(f"checkpoint {path}: incomplete ({'; '.join(problems[:3])}"
                                  f"{f'; {len(problems) - 3} more' if len(problems) > 3 else ''})")
        return path
    if path.name.startswith(PARTIAL_PREFIX):
        raise CheckpointError(f"checkpoint {path}: half-written (a save that did not finish); use the run's latest")
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such folder (expected a run folder with {CHECKPOINTS}/{LATEST}, "
                              f"or a checkpoint folder with {MANIFEST})")
    if (path / CHECKPOINTS).is_dir() or (path / "config.yaml").is_file():
        tag = latest_tag(path)
        if tag is None:
            raise CheckpointError(f"run folder {path}: no complete checkpoint yet ({CHECKPOINTS}/{LATEST} is missing)")
        folder = checkpoints_dir(path) / tag
        if not folder.is_dir():
            raise CheckpointError(f"run folder {path}: {CHECKPOINTS}/{LATEST} names '{tag}', but {folder} "
                                  f"does not exist")
        _, problems = _complete(folder)
        if not problems:
            return folder
        why = "; ".join(problems[:3]) + (f"; {len(problems) - 3} more" if len(problems) > 3 else "")
        earlier = [p for p in sorted(checkpoints_dir(path).iterdir(), reverse=True)
                   if p.is_dir() and not p.name.startswith(PARTIAL_PREFIX) and p.name < tag]
        for candidate in earlier:
            if not _complete(candidate)[1]:
                if warn is not None:
                    warn(f"latest checkpoint {tag} of {path} is incomplete ({why}); resuming from {candidate.name}, "
                         f"the newest complete one")
                return candidate
        raise CheckpointError(f"run folder {path}: latest checkpoint {tag} is incomplete ({why}) and no earlier "
                              f"complete checkpoint exists")
    raise CheckpointError(f"{path}: neither a run folder ({CHECKPOINTS}/{LATEST}) nor a checkpoint folder ({MANIFEST})")


def adapters_folder(path: str | os.PathLike) -> Path:
    """The PEFT export to start from: an exported adapters folder (etm/, sdd/, cf_proj.safetensors), or
    the `adapters/` of a checkpoint folder or of a run's latest checkpoint."""
    path = Path(path)
    if (path / "etm" / "adapter_config.json").is_file():
        return path
    folder = resolve(path) / ADAPTERS_DIR
    if not (folder / "etm" / "adapter_config.json").is_file():
        raise CheckpointError(f"{path}: its checkpoint holds no {ADAPTERS_DIR}/etm export")
    return folder


def check_adapter_specs(folder: Path, cfg) -> None:
    """Saved adapters' rank and target modules against the config's `student.{etm,sdd}_lora`, from their
    adapter_config.json alone: one line before any rank builds a model."""
    for name in ("etm", "sdd"):
        path = Path(folder) / name / "adapter_config.json"
        try:
            saved = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"adapters folder {folder}: unreadable {name}/adapter_config.json ({exc})") from None
        spec = cfg.student[f"{name}_lora"]
        targets = sorted(saved.get("target_modules") or [])
        if int(saved.get("r", -1)) != int(spec.rank) or set(targets) != set(spec.target_modules):
            raise CheckpointError(f"key 'train.init_from': adapters folder {folder}: {name} has rank {saved.get('r')} "
                                  f"on {targets}, the config asks rank {spec.rank} on {sorted(spec.target_modules)} "
                                  f"(set student.{name}_lora to match)")


@dataclass
class Listing:
    tag: str
    folder: Path
    complete: bool
    is_latest: bool
    manifest: Optional[Manifest]
    size_bytes: int


def list_checkpoints(run_dir: str | os.PathLike) -> list[Listing]:
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    latest = latest_tag(run_dir)
    out = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        manifest, problems = _complete(folder)
        complete = not problems
        manifest = manifest if complete else None
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        out.append(Listing(folder.name, folder, complete, folder.name == latest, manifest, size))
    return out


# --------------------------------------------------------------------------------------------------
# RNG and per-rank state (JSON: nothing here goes through pickle)
# --------------------------------------------------------------------------------------------------
def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {"torch": _b64(torch.get_rng_state()),
             "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
             "python": [py_state[0], list(py_state[1]), py_state[2]]}
    if torch.cuda.is_available():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(_unb64(state["torch"]))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------
# The student's own weights (adapters + c_f), gathered when ZeRO-3 shards them
# --------------------------------------------------------------------------------------------------
def _is_student_weight(name: str) -> bool:
    return ".lora_" in name or name.startswith("cf_proj.")


def student_weights(student: torch.nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of every adapter weight and the c_f projection. All ranks must call it (under ZeRO-3
    the parameters are sharded, and gathering them is a collective); the result is valid everywhere."""
    named = [(n, p) for n, p in student.named_parameters() if _is_student_weight(n)]
    with gathered([p for _, p in named]):
        return {n: p.detach().to("cpu", copy=True) for n, p in named}


class gathered:
    """`deepspeed.zero.GatheredParameters` (read-only, on every rank) for ZeRO-3 parameters, a no-op
    otherwise. A collective: every rank enters it."""

    def __init__(self, params: list[torch.nn.Parameter]):
        self.params = [p for p in params if hasattr(p, "ds_id")]
        self.ctx = None

    def __enter__(self):
        if self.params:
            import deepspeed

            self.ctx = deepspeed.zero.GatheredParameters(self.params, modifier_rank=None)
            self.ctx.__enter__()
        return self

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.__exit__(*exc)
        return False


def base_fingerprint(student: torch.nn.Module) -> str:
    """sha256 over the frozen base weights (name order). Collective under ZeRO-3 (gathers one tensor at
    a time); the frozen base must never change, and the manifest records this value to prove it."""
    digest = hashlib.sha256()
    for name, p in sorted(student.named_parameters(), key=lambda item: item[0]):
        if _is_student_weight(name):
            continue
        with gathered([p]):
            digest.update(name.encode())
            digest.update(p.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------
# The trainable state per parameter, independent of the partitioning
# --------------------------------------------------------------------------------------------------
class _Optimizer:
    """Where this engine keeps each trained parameter's fp32 master, AdamW moments and step count.

    ZeRO-1/2 keep one flat fp32 partition per parameter group, ZeRO-3 one per sub-group, each with one
    AdamW state (`step`, `exp_avg`, `exp_avg_sq`); without ZeRO the state is per parameter. Under ZeRO
    the whole tensors go through `deepspeed.utils.safe_{get,set}_full_*`; getting is a collective (an
    all-reduce under ZeRO-1/2, an all-gather under ZeRO-3), so every rank walks the parameters in the
    same (name) order."""

    def __init__(self, engine):
        self.zero = engine.optimizer  # DeepSpeed's ZeRO optimizer, or the torch optimizer without ZeRO
        self.inner = getattr(self.zero, "optimizer", self.zero)
        if hasattr(self.zero, "fp32_partitioned_groups_flat"):  # ZeRO-3
            self.flats = list(zip(self.zero.fp32_partitioned_groups_flat, self.zero.fp16_groups))
            self.partitioned = True
        elif hasattr(self.zero, "single_partition_of_fp32_groups"):  # ZeRO-1/2
            self.flats = list(zip(self.zero.single_partition_of_fp32_groups, self.zero.bit16_groups))
            self.partitioned = True
        else:
            self.flats = [(q, [q]) for group in self.inner.param_groups for q in group["params"]]
            self.partitioned = False
        self.flat_of = {id(q): flat for flat, params in self.flats for q in params}

    def trains(self, param: torch.nn.Parameter) -> bool:
        return id(param) in self.flat_of

    def ensure_state(self) -> None:
        """AdamW creates its state at the first step; before one (or on a fresh engine) create what it
        would create (step 0, zero moments), so that every parameter has state to get and set."""
        for flat, _ in self.flats:
            state = self.inner.state[flat]
            unknown = sorted(set(state) - {"step", *MOMENTS})
            if unknown:
                raise CheckpointError(f"optimizer state holds {unknown}; checkpoints save AdamW's step, "
                                      f"{', '.join(MOMENTS)} only")
            if not state:
                group = next((g for g in self.inner.param_groups if any(q is flat for q in g["params"])), {})
                on_device = group.get("fused") or group.get("capturable")
                scalar = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
                state["step"] = torch.tensor(0.0, dtype=scalar, device=flat.device if on_device else "cpu")
                for key in MOMENTS:
                    state[key] = torch.zeros_like(flat, memory_format=torch.preserve_format)
        if hasattr(self.zero, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-1/2: views into the state
            self.zero._hp_optimizer_states_linked = False
            self.zero._lazy_init_hp_params_optimizer_state()

    def step(self, param) -> int:
        return int(self.inner.state[self.flat_of[id(param)]]["step"])

    def set_step(self, flat, value: int) -> None:
        state = self.inner.state[flat]
        old = state["step"]
        if torch.is_tensor(old):
            value = torch.tensor(float(value), dtype=old.dtype, device=old.device)
        state["step"] = value

    def get(self, param, key: Optional[str]) -> torch.Tensor:
        """The whole fp32 master (key None) or moment of `param` (collective under ZeRO)."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        if not self.partitioned:
            value = param if key is None else self.inner.state[param][key]
        else:
            value = safe_get_full_fp32_param(param) if key is None else safe_get_full_optimizer_state(param, key)
        return value.detach().to("cpu", copy=True).reshape(param.ds_shape if hasattr(param, "ds_id") else param.shape)

    def set(self, param, key: Optional[str], value: torch.Tensor) -> None:
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        if not self.partitioned:
            (param if key is None else self.inner.state[param][key]).data.copy_(value)
        elif key is None:
            safe_set_full_fp32_param(param, value.to(param.device))
        else:
            safe_set_full_optimizer_state(param, value.to(param.device), key)


def _student_named(student) -> list[tuple[str, torch.nn.Parameter]]:
    return sorted(((n, p) for n, p in student.named_parameters() if _is_student_weight(n)), key=lambda item: item[0])


def _jsonable(value):
    def scalar(v):
        if torch.is_tensor(v) and v.numel() == 1:
            return v.item()
        raise TypeError(f"not JSON: {type(v).__name__}")

    return json.loads(json.dumps(value, default=scalar))


def _save_training_state(engine, student, folder: Path) -> None:
    """Every rank calls this (collectives); rank 0 writes `state/`."""
    from safetensors.torch import save_file

    opt = _Optimizer(engine)
    opt.ensure_state()
    tensors: dict[str, torch.Tensor] = {}
    params: dict[str, dict[str, Any]] = {}
    for name, param in _student_named(student):
        if opt.trains(param):
            tensors[f"fp32/{name}"] = opt.get(param, None)
            for key in MOMENTS:
                tensors[f"{key}/{name}"] = opt.get(param, key)
            params[name] = {"step": opt.step(param)}
        else:  # frozen (an adapter this stage does not train): not in the optimizer, the weight itself
            with gathered([param]):
                tensors[f"fp32/{name}"] = param.detach().to("cpu", copy=True)
            params[name] = {"step": None}
    if distributed.rank() != 0:
        return
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.inner.param_groups]
    scheduler = engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None
    meta = {"zero_stage": int(engine.zero_optimization_stage()), "world_size": distributed.world_size(),
            "params": params, "param_groups": _jsonable(groups), "lr_scheduler": _jsonable(scheduler),
            "engine": {"global_steps": int(engine.global_steps), "global_samples": int(engine.global_samples),
                       "skipped_steps": int(engine.skipped_steps)}}
    (folder / STATE_DIR).mkdir(exist_ok=True)
    tmp = folder / (TRAINABLE_FILE + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, folder / TRAINABLE_FILE)
    _write_atomic(folder / TRAINING_FILE, json.dumps(meta, indent=1, sort_keys=True))


def _set_module_weight(param: torch.nn.Parameter, value: torch.Tensor) -> None:
    """The weight the module computes with (ZeRO-3: gathered, set, partitioned again; a collective)."""
    if hasattr(param, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([param], modifier_rank=0), torch.no_grad():
            param.data.copy_(value.to(param.device, param.dtype))
    else:
        with torch.no_grad():
            param.data.copy_(value.to(param.device, param.dtype))


def _load_training_state(engine, student, folder: Path) -> None:
    """Set the saved whole tensors into this engine's partitions (every rank, same order)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        meta = json.loads((folder / TRAINING_FILE).read_text())
        tensors = load_file(str(folder / TRAINABLE_FILE))
    except (OSError, ValueError, SafetensorError) as exc:
        raise CheckpointError(f"checkpoint {folder}: unreadable {STATE_DIR}/ ({exc})") from None
    opt = _Optimizer(engine)
    named = _student_named(student)
    saved = meta["params"]
    ours = {n for n, _ in named}
    if set(saved) != ours:
        diff = sorted(set(saved) ^ ours)
        raise CheckpointError(f"checkpoint {folder}: its student weights differ from this config's ({len(diff)} "
                              f"names, e.g. {diff[0]}); student.etm_lora / sdd_lora must match the run's")
    changed = sorted(n for n, p in named if opt.trains(p) != (saved[n]["step"] is not None))
    if changed:
        raise CheckpointError(f"checkpoint {folder}: {changed[0]} (and {len(changed) - 1} more) trains in one of "
                              f"the checkpoint and this launch only; train.adapters must match the run's")
    groups = opt.inner.param_groups
    if [g.get("name") for g in groups] != [g.get("name") for g in meta["param_groups"]]:
        raise CheckpointError(f"checkpoint {folder}: optimizer groups {[g.get('name') for g in meta['param_groups']]},"
                              f" this launch has {[g.get('name') for g in groups]}; train.adapters must match")

    opt.ensure_state()
    for flat, params in opt.flats:
        steps = {saved[n]["step"] for n, p in named if any(p is q for q in params)}
        if len(steps) > 1:  # one AdamW state per flat group: its parameters stepped together
            raise CheckpointError(f"checkpoint {folder}: parameters of one optimizer group saved with different "
                                  f"step counts {sorted(steps)}")
        if steps:
            opt.set_step(flat, steps.pop())
    for name, param in named:
        value = tensors[f"fp32/{name}"]
        if tuple(value.shape) != tuple(param.ds_shape if hasattr(param, "ds_id") else param.shape):
            raise CheckpointError(f"checkpoint {folder}: {name} has shape {tuple(value.shape)}, the model "
                                  f"{tuple(param.shape)}")
        _set_module_weight(param, value)
        if opt.trains(param):
            opt.set(param, None, value)
            for key in MOMENTS:
                opt.set(param, key, tensors[f"{key}/{name}"])
    for group, saved_group in zip(groups, meta["param_groups"]):
        for key, value in saved_group.items():
            if key in group:
                group[key] = tuple(value) if isinstance(group[key], tuple) else value
    if engine.lr_scheduler is not None and meta["lr_scheduler"] is not None:
        engine.lr_scheduler.load_state_dict(meta["lr_scheduler"])
    counters = meta["engine"]
    engine.global_steps, engine.global_samples = counters["global_steps"], counters["global_samples"]
    engine.skipped_steps = counters["skipped_steps"]


def trainable_state(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, training.json) of a checkpoint, as saved: `fp32/<name>`, `exp_avg/<name>`, ..."""
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / TRAINABLE_FILE)), json.loads((Path(folder) / TRAINING_FILE).read_text())


# --------------------------------------------------------------------------------------------------
# Save / load
# --------------------------------------------------------------------------------------------------
def save(engine, student, run_dir: str | os.PathLike, manifest: Manifest, rank_state: dict[str, Any],
         keep_last: int, files: Optional[dict[str, str]] = None) -> Path:
    """Every rank calls this at the same step; `files` (name -> text, e.g. the resolved config) are
    written by rank 0 into the checkpoint. Returns the complete checkpoint folder."""
    rank = distributed.rank()
    root = checkpoints_dir(run_dir)
    partial = root / (PARTIAL_PREFIX + manifest.tag)
    final = root / manifest.tag
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if partial.exists():  # left by a crash during an earlier save of this same step
            shutil.rmtree(partial)
        partial.mkdir()
    distributed.barrier()

    # The frozen base is rebuilt from the pretrained weights on load; saving it would cost GBs per save.
    _save_training_state(engine, student, partial)
    (partial / TRAINER_DIR).mkdir(exist_ok=True)
    _write_atomic(partial / TRAINER_DIR / f"rank-{rank:05d}.json",
                  json.dumps({"rank": rank, **rank_state, "rng": rng_state()}))
    weights = student_weights(student)
    if rank == 0:
        student.save_adapters(partial / ADAPTERS_DIR, state_dict=weights)
        for name, text in (files or {}).items():
            _write_atomic(partial / name, text)
    distributed.barrier()

    if rank == 0:
        missing = [r for r in range(manifest.world_size) if not (partial / TRAINER_DIR / f"rank-{r:05d}.json").is_file()]
        if missing:
            raise CheckpointError(f"checkpoint {partial}: ranks {missing} wrote no trainer state")
        manifest.format = FORMAT
        manifest.files = {str(p.relative_to(partial)): p.stat().st_size
                          for p in sorted(partial.rglob("*")) if p.is_file() and p.name != MANIFEST}
        _write_atomic(partial / MANIFEST, manifest.to_json())
        if final.exists():  # a complete save of this step from a run that crashed before moving `latest`
            shutil.rmtree(final)
        os.replace(partial, final)
        _write_atomic(root / LATEST, manifest.tag + "\n")
        _prune(root, keep_last, keep=manifest.tag)
    distributed.barrier()
    return final


def _prune(root: Path, keep_last: int, keep: str) -> None:
    complete = sorted(p for p in root.iterdir()
                      if p.is_dir() and not p.name.startswith(PARTIAL_PREFIX) and (p / MANIFEST).is_file())
    for folder in complete[:-keep_last]:
        if folder.name != keep:
            shutil.rmtree(folder, ignore_errors=True)
    for stale in root.glob(PARTIAL_PREFIX + "*"):  # crashed saves of earlier steps
        if stale.name != PARTIAL_PREFIX + keep:
            shutil.rmtree(stale, ignore_errors=True)


def load(engine, folder: Path, world_size: int, student=None) -> tuple[Manifest, dict[str, Any]]:
    """Restore the student's weights, AdamW state, lr schedule and DeepSpeed's step counters into
    `engine` (any world size, any ZeRO stage) and return this rank's trainer state; the caller
    restores the reader from it. Every rank calls it (collectives under ZeRO-3).

    Same world size: this rank's own `trainer/rank-R.json`, its RNG states restored (bit-exact resume).
    Another world size: rank 0's file for every rank (its reader position is global), and this rank's
    RNG states seeded from (config seed, step, rank) — `derived_seed` — instead of a saved one."""
    manifest = Manifest.read(folder)
    check_resumable(folder, manifest)
    rank = distributed.rank()
    same = manifest.world_size == world_size
    state_path = folder / TRAINER_DIR / f"rank-{rank if same else 0:05d}.json"
    if not state_path.is_file():
        raise CheckpointError(f"checkpoint {folder}: no trainer state for rank {rank} ({state_path.name})")
    seed = None if same else _config_seed(folder)
    _load_training_state(engine, student if student is not None else engine.module.student, folder)
    rank_state = json.loads(state_path.read_text())
    saved_rng = rank_state.pop("rng")
    if same:
        set_rng_state(saved_rng)
    else:
        seed_rng(derived_seed(seed, manifest.step, rank))
    return manifest, rank_state


def check_resumable(folder: Path, manifest: Manifest) -> None:
    """Any world size and ZeRO stage resume; only a v1 checkpoint cannot: its optimizer state exists
    only in DeepSpeed's pickles, which are never loaded (unpickling a shared file can run code)."""
    if manifest.format == FORMAT_V1:
        raise CheckpointError(
            f"checkpoint {folder}: format {FORMAT_V1} keeps its optimizer state only in DeepSpeed's pickled .pt "
            f"files, which gd-train no longer loads; start a new run from its weights with "
            f"train.init_from={folder} (fresh optimizer and data order)")


def _config_seed(folder: Path) -> int:
    import yaml

    try:
        return int(yaml.safe_load((folder / CONFIG_FILE).read_text())["seed"])
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {folder}: no seed in {CONFIG_FILE} ({exc!r}); needed to derive RNG "
                              f"states for another world size") from None


def derived_seed(seed: int, step: int, rank: int) -> int:
    """RNG seed of `rank` when a run continues after `step` on another world size: a function of the
    three alone, so the draws after such a resume are defined (not those of an uninterrupted run)."""
    digest = hashlib.sha256(f"gd-train/rng/seed={seed}/step={step}/rank={rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def seed_rng(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # and every CUDA device


def export(folder: Path, out: Path) -> Path:
    """Copy a checkpoint's PEFT exports to `out` (etm/, sdd/, cf_proj.safetensors) and add to each
    adapter folder its diffusers layout (`pytorch_lora_weights.safetensors`, see
    `gd_train.model.diffusers_lora`), so that `WanPipeline.load_lora_weights(out / "sdd")` loads it."""
    from gd_train.model.diffusers_lora import write_diffusers_lora

    source = folder / ADAPTERS_DIR
    if not source.is_dir():
        raise CheckpointError(f"checkpoint {folder}: no {ADAPTERS_DIR}/ folder")
    if out.exists():
        raise CheckpointError(f"export target {out}: already exists (choose another --out)")
    shutil.copytree(source, out)
    for sub in sorted(p for p in out.iterdir() if (p / "adapter_config.json").is_file()):
        write_diffusers_lora(sub)
    return out
