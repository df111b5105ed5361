"""The Greedy Distill student: one frozen Wan base, two PEFT LoRA adapters (`etm`, `sdd`) and the
zero-initialised projection that carries the ETM's temporal representation c_f into the SDD. With
`train.rl_fake_score=critic` (stage 2 only) a third adapter, `critic`, on the SDD's target modules and
rank: DMD's separately trained fake score. It trains and is checkpointed, but is never exported.

With adapters off the same module *is* the teacher. Three kinds of pass are offered:
- `teacher_velocity`: the bidirectional teacher (full attention, frames numbered from 0);
- `parallel_forward`: stage 1's teacher-forced pass — every c_f and every chunk's SDD velocity of a
  clip in one ETM pass plus one SDD pass (DESIGN §4);
- `etm_step` / `sdd_context_step` / `sdd_velocity_step`: one chunk at a time against KV caches, the
  pieces `gd_train.infer.stream` assembles into Algorithm 1.
Token layouts, masks and positions are those documented in `gd_train.model.attention`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from omegaconf import DictConfig
from torch import nn

from gd_train.model.attention import CacheOps, ChunkMask, KVCache, etm_mask, sdd_mask
from gd_train.model.backbone import load_transformer, torch_dtype
from gd_train.model.forward import WanPass

ADAPTERS = ("etm", "sdd")  # the student's own adapters: what is exported and loaded (`save_adapters`)
CRITIC = "critic"  # stage 2's optional fake score (train.rl_fake_score=critic): trained, never exported
ADAPTER_WEIGHTS = "adapter_model.safetensors"
CF_PROJ_WEIGHTS = "cf_proj.safetensors"

# Fixed RoPE frame positions of the SDD's context (see attention.py's module docstring).
SDD_POS_FIRST, SDD_POS_PREV, SDD_POS_NOISY = 0, 1, 2
# SDD cache slots: the noisy chunk being denoised, x_0, and the previous frame x_{f-1}.
SDD_SLOT_NOISY, SDD_SLOT_FIRST, SDD_SLOT_PREV = 0, 1, 2


def resolve_backend(requested: str, device: torch.device) -> str:
    if requested == "auto":
        return "flex" if device.type == "cuda" else "sdpa"
    return requested


@dataclass
class ParallelOutput:
    velocity: torch.Tensor  # (B, C, n_noisy, H, W): SDD prediction for noisy chunks first_noisy..F
    cond: Optional[torch.Tensor]  # (B, F, L, dim): c_1..c_F after the projection (None when F = 0)
    first_noisy: int  # 0 when the first frame is trained too, else 1


class GreedyDistillStudent(nn.Module):
    def __init__(self, cfg: DictConfig, transformer: nn.Module, device: torch.device | str = "cpu"):
        super().__init__()
        from peft import LoraConfig, get_peft_model

        self.cfg = cfg
        self.window = int(cfg.student.etm_window)
        self.device_ = torch.device(device)
        transformer = transformer.to(self.device_)
        transformer.requires_grad_(False)
        lora = {name: cfg.student[f"{name}_lora"] for name in ADAPTERS}
        self.peft = get_peft_model(transformer, _lora_config(LoraConfig, lora["etm"]), adapter_name="etm")
        self.peft.add_adapter("sdd", _lora_config(LoraConfig, lora["sdd"]))
        # Added last, so the etm/sdd initialisations are those of a run without it; its weights are
        # replaced by the SDD's at the start of stage 2 (`init_critic_from_sdd`).
        self.adapter_names: tuple[str, ...] = ADAPTERS
        if str(cfg.train.rl_fake_score) == CRITIC:
            self.peft.add_adapter(CRITIC, _lora_config(LoraConfig, lora["sdd"]))
            self.adapter_names = ADAPTERS + (CRITIC,)
        for name, p in self.transformer.named_parameters():
            p.requires_grad_(".lora_" in name)

        dim = self.transformer.config.num_attention_heads * self.transformer.config.attention_head_dim
        # c_f enters the SDD through this projection; zero-initialised so that at step 0 the SDD is
        # the teacher restricted to its context (DESIGN §2). The norm tames the raw block output.
        self.cf_proj = nn.Sequential(nn.LayerNorm(dim, elementwise_affine=False), nn.Linear(dim, dim))
        nn.init.zeros_(self.cf_proj[1].weight)
        nn.init.zeros_(self.cf_proj[1].bias)
        self.cf_proj.to(self.device_)

        backend = resolve_backend(cfg.model.attention_backend, self.device_)
        self.runner = WanPass(self.transformer, backend=backend)
        self.runner.gradient_checkpointing = bool(cfg.student.gradient_checkpointing)
        self.dim = dim

    @classmethod
    def from_config(cls, cfg: DictConfig, device: torch.device | str = "cpu") -> "GreedyDistillStudent":
        return cls(cfg, load_transformer(cfg, dtype=torch_dtype(cfg)), device=device)

    # ------------------------------------------------------------------------------------------
    # Introspection
    # ------------------------------------------------------------------------------------------
    @property
    def transformer(self) -> nn.Module:
        """The diffusers module inside `peft`, LoRA layers injected. A property, not an attribute: as a
        registered submodule every weight would have a second name (`transformer.…` next to `peft.…`),
        which DeepSpeed records as shared parameters and its `zero_to_fp32.py` then writes twice."""
        return self.peft.base_model.model

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.patch_embedding.weight.dtype

    @property
    def has_critic(self) -> bool:
        return CRITIC in self.adapter_names

    def trainable_parameters(self, adapter: Optional[str] = None) -> list[nn.Parameter]:
        """LoRA weights of one adapter (or all, the critic included), plus the c_f projection when
        adapter is None/'sdd'."""
        out = []
        for name, p in self.transformer.named_parameters():
            if ".lora_" in name and (adapter is None or f".{adapter}." in name):
                out.append(p)
        if adapter in (None, "sdd"):
            out += list(self.cf_proj.parameters())
        return out

    def base_parameters(self) -> dict[str, torch.Tensor]:
        return {n: p for n, p in self.transformer.named_parameters() if ".lora_" not in n}

    def project_cond(self, hidden: torch.Tensor) -> torch.Tensor:
        """c_f from the ETM's hidden states. The projection trains in fp32 (as PEFT keeps adapters on a
        bf16 base), so a bf16 base's hidden states are cast to it; its output is cast back where added."""
        return self.cf_proj(hidden.to(self.cf_proj[1].weight.dtype))

    def merged_inference(self, enabled: bool = True) -> None:
        """Passes without grad run plain blocks with the adapter merged in (no PEFT wrappers; one extra
        copy of the adapted weights per adapter, see gd_train.model.merged). Views stale since a LoRA
        weight changed are dropped here; training passes (grad on) always run the PEFT layers."""
        from gd_train.model.merged import MergedAdapters

        if not enabled:
            self.runner.merged = None
            return
        if self.runner.merged is None:
            self.runner.merged = MergedAdapters(self.transformer, self.adapter_names)
        self.runner.merged.refresh()

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        self.runner.gradient_checkpointing = enabled

    def tokens_per_chunk(self, height: int, width: int) -> int:
        return self.runner.tokens_per_chunk(height, width)

    # ------------------------------------------------------------------------------------------
    # Adapters on disk (PEFT's own format: loadable with plain `peft` on a plain diffusers model)
    # ------------------------------------------------------------------------------------------
    def save_adapters(self, folder: str | Path, state_dict: Optional[dict[str, torch.Tensor]] = None) -> Path:
        """Write `folder/etm/`, `folder/sdd/` (adapter_model.safetensors + adapter_config.json) and
        `folder/cf_proj.safetensors`. `state_dict`: full student weights when the live parameters are
        not the source of truth (e.g. gathered from ZeRO-3 shards)."""
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        live = state_dict if state_dict is not None else self.state_dict()
        peft_sd = {k[len("peft."):]: v for k, v in live.items() if k.startswith("peft.")}
        for name in ADAPTERS:
            weights = get_peft_model_state_dict(self.peft, state_dict=peft_sd, adapter_name=name)
            sub = folder / name
            sub.mkdir(exist_ok=True)
            save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(sub / ADAPTER_WEIGHTS))
            self.peft.peft_config[name].save_pretrained(str(sub))
        cf = {k[len("cf_proj."):]: v.detach().contiguous().cpu() for k, v in live.items() if k.startswith("cf_proj.")}
        save_file(cf, str(folder / CF_PROJ_WEIGHTS))
        return folder

    def load_adapters(self, folder: str | Path) -> None:
        """Load what `save_adapters` wrote; a missing file or a rank/target mismatch is one clear line."""
        import json

        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        folder = Path(folder)
        expected = f"{folder}/{{etm,sdd}}/{ADAPTER_WEIGHTS} + adapter_config.json and {folder}/{CF_PROJ_WEIGHTS}"
        for name in ADAPTERS:
            sub = folder / name
            if not (sub / ADAPTER_WEIGHTS).is_file() or not (sub / "adapter_config.json").is_file():
                raise FileNotFoundError(f"adapters folder {folder}: missing {name}/ files; expected {expected}")
            saved = json.loads((sub / "adapter_config.json").read_text())
            ours = self.peft.peft_config[name]
            if int(saved.get("r", -1)) != ours.r or set(saved.get("target_modules") or []) != set(ours.target_modules):
                raise ValueError(f"adapters folder {folder}: {name} has rank {saved.get('r')} on "
                                 f"{sorted(saved.get('target_modules') or [])}, the config asks rank {ours.r} on "
                                 f"{sorted(ours.target_modules)} (set student.{name}_lora to match)")
            result = set_peft_model_state_dict(self.peft, load_file(str(sub / ADAPTER_WEIGHTS)), adapter_name=name)
            if getattr(result, "unexpected_keys", None):
                raise ValueError(f"adapters folder {folder}: {name} holds unexpected weights "
                                 f"{result.unexpected_keys[:3]}")
        if not (folder / CF_PROJ_WEIGHTS).is_file():
            raise FileNotFoundError(f"adapters folder {folder}: missing {CF_PROJ_WEIGHTS}; expected {expected}")
        self.cf_proj.load_state_dict(load_file(str(folder / CF_PROJ_WEIGHTS)))
        if self.runner.merged is not None:  # merged from the weights just replaced
            self.runner.merged.invalidate()
        for p in self.trainable_parameters():  # loading must not freeze what trains
            p.requires_grad_(True)

    def init_critic_from_sdd(self) -> None:
        """Set the critic adapter to a copy of the SDD adapter's current weights (PEFT's own state-dict
        helpers; the parameters are written in place, so they stay what the optimizer will hold). At
        that moment the critic scores exactly as the SDD does."""
        from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

        if not self.has_critic:
            raise ValueError("init_critic_from_sdd: this student has no critic adapter (train.rl_fake_score=critic)")
        sdd = {k: v.detach().clone() for k, v in get_peft_model_state_dict(self.peft, adapter_name="sdd").items()}
        result = set_peft_model_state_dict(self.peft, sdd, adapter_name=CRITIC)
        if getattr(result, "unexpected_keys", None):
            raise RuntimeError(f"init_critic_from_sdd: SDD weights the critic lacks: {result.unexpected_keys[:3]}")
        if self.runner.merged is not None:
            self.runner.merged.invalidate()
        for p in self.trainable_parameters(CRITIC):
            p.requires_grad_(True)

    # ------------------------------------------------------------------------------------------
    # The teacher
    # ------------------------------------------------------------------------------------------
    def teacher_velocity(self, latents: torch.Tensor, timestep: torch.Tensor | float,
                         prompt_embeds: torch.Tensor) -> torch.Tensor:
        """Adapters off, full attention, frames numbered 0..F-1: exactly `WanTransformer3DModel`."""
        B, _, n, H, W = self._check_latents(latents, "latents")
        t = torch.as_tensor(timestep, dtype=torch.float32, device=latents.device).reshape(-1)
        if t.numel() == 1:
            t = t.expand(B)
        if t.shape != (B,):
            raise ValueError(f"timestep: expected a scalar or shape ({B},), got {tuple(t.shape)}")
        positions = list(range(n))
        return self.runner(latents, t, positions, prompt_embeds, adapter=None).velocity

    # ------------------------------------------------------------------------------------------
    # Stage 1: the parallel teacher-forced pass
    # ------------------------------------------------------------------------------------------
    def parallel_forward(self, clip: torch.Tensor, noisy: torch.Tensor, sigmas: torch.Tensor,
                         prompt_embeds: torch.Tensor) -> ParallelOutput:
        """clip: clean latents x_0..x_F (B, C, F+1, H, W); noisy: x_f^t for f = first_noisy..F
        (B, C, n_noisy, H, W); sigmas: (B, n_noisy) flow times in [0, 1] of those chunks."""
        B, C, N, H, W = self._check_latents(clip, "clip")
        F_ = N - 1
        first_noisy = N - noisy.shape[2]
        if noisy.shape[:2] != (B, C) or noisy.shape[3:] != (H, W) or first_noisy not in (0, 1):
            raise ValueError(f"noisy: expected (B={B}, C={C}, {N} or {N - 1}, {H}, {W}), got {tuple(noisy.shape)}")
        if sigmas.shape != (B, noisy.shape[2]):
            raise ValueError(f"sigmas: expected ({B}, {noisy.shape[2]}), got {tuple(sigmas.shape)}")
        L = self.tokens_per_chunk(H, W)
        dev = clip.device

        cond = None
        if F_ >= 1:
            # ETM over clean x_0..x_{F-1} at t = 0 with the sliding window mask of Eq. (1).
            etm = self.runner(
                clip[:, :, :F_], torch.zeros(B, F_, device=dev), list(range(F_)), prompt_embeds,
                adapter="etm", mask=etm_mask(F_, self.window, L, dev),
                want_velocity=False, want_hidden=True)
            cond = self.project_cond(etm.hidden).unflatten(1, (F_, L))  # c_f = chunk f-1's hidden state

        # SDD over [clean x_0..x_{F-1} ; noisy x_first..x_F] with the block mask.
        n_noisy = noisy.shape[2]
        latents = torch.cat([clip[:, :, :F_], noisy.to(clip.dtype)], dim=2)
        timesteps = torch.cat([torch.zeros(B, F_, device=dev), sigmas.to(dev).float() * 1000.0], dim=1)
        positions = ([SDD_POS_FIRST] + [SDD_POS_PREV] * (F_ - 1))[:F_] + [SDD_POS_NOISY] * n_noisy
        added = None
        if cond is not None:  # noisy x_1..x_F get c_1..c_F; clean context and noisy x_0 get nothing
            lead = torch.zeros(B, (F_ + 1 - first_noisy) * L, self.dim, device=dev, dtype=cond.dtype)
            added = torch.cat([lead, cond.flatten(1, 2)], dim=1)
        mask = sdd_mask(F_, first_noisy, n_noisy, L, dev)
        out = self.runner(latents, timesteps, positions, prompt_embeds, adapter="sdd", mask=mask, added=added)
        return ParallelOutput(velocity=out.velocity[:, :, F_:], cond=cond, first_noisy=first_noisy)

    # ------------------------------------------------------------------------------------------
    # Streaming (one chunk at a time, KV caches)
    # ------------------------------------------------------------------------------------------
    def new_caches(self, batch: int, height: int, width: int) -> tuple[KVCache, KVCache]:
        """(ETM cache: w+1 chunk slots, ring; SDD cache: noisy, x_0, x_{f-1}) — allocated once."""
        m = self.transformer.config
        L = self.tokens_per_chunk(height, width)

        def cache(slots: int) -> KVCache:
            return KVCache(m.num_layers, batch, slots, L, m.num_attention_heads, m.attention_head_dim,
                           self.dtype, self.device_)

        return cache(self.window + 1), cache(3)

    def etm_step(self, frame: torch.Tensor, index: int, cache: KVCache, text: torch.Tensor) -> torch.Tensor:
        """Feed clean x_index (B, C, 1, H, W); returns c_{index+1} as (B, L, dim), projected."""
        B, _, _, H, W = frame.shape
        slots = self.window + 1
        base = max(0, index - self.window)  # oldest chunk still in the window
        n_read = min(index + 1, slots)
        key_pos = [0] * n_read  # window-relative position of the chunk each slot holds after this write
        for c in range(base, index + 1):
            key_pos[c % slots] = c - base
        out = self.runner(
            frame, torch.zeros(B, 1, device=frame.device), [index - base], text, adapter="etm",
            cache_ops=CacheOps(cache, write_slot=index % slots, read_first=0, read_slots=n_read),
            key_positions=key_pos, want_velocity=False, want_hidden=True)
        return self.project_cond(out.hidden)

    def sdd_context_step(self, frame: torch.Tensor, index: int, cache: KVCache, text: torch.Tensor) -> None:
        """Run clean x_index through the SDD at t = 0 and keep its K/V (as x_0, or as x_{f-1})."""
        B = frame.shape[0]
        slot, pos = (SDD_SLOT_FIRST, SDD_POS_FIRST) if index == 0 else (SDD_SLOT_PREV, SDD_POS_PREV)
        self.runner(frame, torch.zeros(B, 1, device=frame.device), [pos], text, adapter="sdd",
                    cache_ops=CacheOps(cache, write_slot=slot, read_first=slot, read_slots=1),
                    key_positions=[pos], want_velocity=False)

    def sdd_velocity_step(self, noisy: torch.Tensor, sigma: float, index: int, cond: Optional[torch.Tensor],
                          cache: KVCache, text: torch.Tensor) -> torch.Tensor:
        """SDD velocity for noisy x_index (B, C, 1, H, W) at flow time sigma, given cached context."""
        B = noisy.shape[0]
        n_read = 1 if index == 0 else (2 if index == 1 else 3)
        key_pos = [SDD_POS_NOISY, SDD_POS_FIRST, SDD_POS_PREV][:n_read]
        t = torch.full((B, 1), float(sigma) * 1000.0, device=noisy.device)
        return self.runner(noisy, t, [SDD_POS_NOISY], text, adapter="sdd",
                           cache_ops=CacheOps(cache, write_slot=SDD_SLOT_NOISY, read_first=0, read_slots=n_read),
                           key_positions=key_pos, added=cond).velocity

    # Recompute (no cache): the same quantities from the whole history, for tests and benchmarks.
    def etm_recompute(self, history: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """c_{n} from clean x_0..x_{n-1} (B, C, n, H, W) by a full sliding-window pass; (B, L, dim)."""
        B, _, n, H, W = history.shape
        L = self.tokens_per_chunk(H, W)
        dev = history.device
        out = self.runner(history, torch.zeros(B, n, device=dev), list(range(n)), text,
                          adapter="etm", mask=etm_mask(n, self.window, L, dev),
                          want_velocity=False, want_hidden=True)
        return self.project_cond(out.hidden[:, -L:])

    def sdd_recompute(self, first: Optional[torch.Tensor], prev: Optional[torch.Tensor], noisy: torch.Tensor,
                      sigma: float, index: int, cond: Optional[torch.Tensor], text: torch.Tensor,
                      adapter: str = "sdd") -> torch.Tensor:
        """SDD velocity for noisy x_index from [clean x_0, clean x_{index-1}, noisy] in one masked pass.
        adapter='critic': the same pass (same context, layout and c_f) through the critic adapter."""
        if adapter not in ("sdd", CRITIC) or adapter not in self.adapter_names:
            raise ValueError(f"sdd_recompute: adapter '{adapter}', this student has {', '.join(self.adapter_names)}")
        B, _, _, H, W = noisy.shape
        L = self.tokens_per_chunk(H, W)
        dev = noisy.device
        context = [] if index == 0 else ([first] if index == 1 else [first, prev])
        n_ctx = len(context)
        latents = torch.cat(context + [noisy], dim=2)
        positions = [SDD_POS_FIRST, SDD_POS_PREV][:n_ctx] + [SDD_POS_NOISY]
        timesteps = torch.cat([torch.zeros(B, n_ctx, device=dev), torch.full((B, 1), float(sigma) * 1000.0, device=dev)], 1)
        vis = torch.eye(n_ctx + 1, dtype=torch.bool)
        vis[n_ctx, :] = True
        added = None
        if cond is not None:
            lead = torch.zeros(B, n_ctx * L, self.dim, device=dev, dtype=cond.dtype)
            added = torch.cat([lead, cond], dim=1)
        out = self.runner(latents, timesteps, positions, text, adapter=adapter, mask=ChunkMask(vis.to(dev), L), added=added)
        return out.velocity[:, :, -1:]

    # ------------------------------------------------------------------------------------------
    def _check_latents(self, latents: torch.Tensor, name: str) -> tuple[int, int, int, int, int]:
        c = self.transformer.config
        if latents.ndim != 5 or latents.shape[1] != c.in_channels:
            raise ValueError(f"{name}: expected latents (B, {c.in_channels}, F, H, W), got {tuple(latents.shape)}")
        B, C, n, H, W = latents.shape
        _, p_h, p_w = c.patch_size
        if n < 1:
            raise ValueError(f"{name}: expected at least 1 latent frame, got F={n}")
        if H % p_h or W % p_w:
            raise ValueError(f"{name}: H={H}, W={W} must be multiples of the patch size ({p_h}, {p_w})")
        return B, C, n, H, W


def _lora_config(cls, spec: DictConfig):
    return cls(r=int(spec.rank), lora_alpha=int(spec.alpha), target_modules=list(spec.target_modules),
               lora_dropout=float(spec.dropout), init_lora_weights=True)

