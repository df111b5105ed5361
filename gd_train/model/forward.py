"""One pass of the diffusers Wan transformer over a chosen token layout.

`WanTransformer3DModel.forward` numbers frames from 0, takes one mask-less layout, gives no access to
the last block's hidden states and checkpoints blocks without any way to carry per-pass state. The
student needs all four, so `WanPass` drives the model's own submodules (patch embedding, condition
embedder, blocks, output norm/projection) in the order `forward` does — it re-implements no layer —
and a test holds it to bit-parity with `forward` (DESIGN §3.1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch.utils.checkpoint import checkpoint

from gd_train.model.attention import (
    AttnState, CacheOps, ChunkMask, StudentAttnProcessor, StudentCrossAttnProcessor, rope_at_frames)
from gd_train.model.merged import MergedAdapters


@dataclass
class PassOutput:
    velocity: Optional[torch.Tensor]  # (B, C, n, H, W) unpatchified prediction, or None
    hidden: Optional[torch.Tensor]  # (B, n*L, dim) last block's hidden states, or None


class WanPass:
    """Runs a (possibly LoRA-wrapped) `WanTransformer3DModel` with our self-attention processors."""

    def __init__(self, transformer: torch.nn.Module, backend: str = "sdpa"):
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.model = transformer
        self.backend = backend
        self.gradient_checkpointing = False
        self.patch = tuple(transformer.config.patch_size)
        self._rope_cache: dict = {}
        for i, block in enumerate(transformer.blocks):
            block.attn1.set_processor(StudentAttnProcessor(i))
            if block.attn2.add_k_proj is None:  # text-only cross-attention (T2V); I2V keeps diffusers'
                block.attn2.set_processor(StudentCrossAttnProcessor(i))
        self._lora_layers = [[m for m in block.modules() if isinstance(m, BaseTunerLayer)]
                             for block in transformer.blocks]
        # Set for inference (`GreedyDistillStudent.merged_inference`): passes without grad then run
        # plain blocks with the adapter merged in, not PEFT's wrappers (gd_train.model.merged).
        self.merged: Optional[MergedAdapters] = None

    # ----------------------------------------------------------------------------------------------
    def tokens_per_chunk(self, height: int, width: int) -> int:
        return (height // self.patch[1]) * (width // self.patch[2])

    def __call__(
        self,
        latents: torch.Tensor,  # (B, C, n, H, W): n chunks, one latent frame each
        timesteps: torch.Tensor,  # (B,) one per sample, or (B, n) one per chunk; values in [0, 1000]
        frame_positions: Sequence[int],  # RoPE frame index of each of the n chunks
        text: torch.Tensor,  # (B, T, text_dim) prompt embeddings
        *,
        adapter: Optional[str],  # "etm", "sdd" or None (adapters off: the teacher)
        mask: Optional[ChunkMask] = None,
        cache_ops: Optional[CacheOps] = None,
        key_positions: Optional[Sequence[int]] = None,  # frame index of each cache slot read
        added: Optional[torch.Tensor] = None,  # (B, n*L, dim) added after patch embedding (c_f)
        want_velocity: bool = True,
        want_hidden: bool = False,
    ) -> PassOutput:
        model = self.model
        B, _, n, H, W = latents.shape
        p_t, p_h, p_w = self.patch
        if p_t != 1:
            raise ValueError(f"chunked passes need a temporal patch of 1, the model has {p_t}")
        grid = (H // p_h, W // p_w)
        L = grid[0] * grid[1]

        x = model.patch_embedding(latents).flatten(2).transpose(1, 2).contiguous()
        if added is not None:
            x = x + added.to(x.dtype)

        temb, tproj, text_h = self._condition(timesteps, text, L)

        q_rope = self._rope(frame_positions, grid)
        k_rope = q_rope if key_positions is None else self._rope(key_positions, grid)
        state = AttnState(q_rope=q_rope, k_rope=k_rope, mask=mask, cache_ops=cache_ops, backend=self.backend)

        for i in range(len(model.blocks)):
            if self.gradient_checkpointing and torch.is_grad_enabled():
                if cache_ops is not None:
                    raise RuntimeError("KV-cache writes cannot run under activation checkpointing")
                # adapter and state are explicit arguments: the recompute in backward runs under the
                # same adapter/mask as the forward did, whatever pass ran last (DESIGN §3.6).
                x = checkpoint(self._run_block, i, adapter, state, x, text_h, tproj, use_reentrant=False)
            else:
                x = self._run_block(i, adapter, state, x, text_h, tproj)

        hidden = x if want_hidden else None
        velocity = self._output(x, temb, B, n, grid) if want_velocity else None
        return PassOutput(velocity=velocity, hidden=hidden)

    # ----------------------------------------------------------------------------------------------
    def _rope(self, positions: Sequence[int], grid: tuple[int, int]):
        """RoPE tables by (positions, grid): streaming reuses a handful, so they are built once."""
        key = (tuple(int(p) for p in positions), grid)
        tables = self._rope_cache.get(key)
        if tables is None:
            tables = rope_at_frames(self.model.rope, key[0], grid)
            if len(self._rope_cache) < 256:
                self._rope_cache[key] = tables
        return tables

    def _condition(self, timesteps: torch.Tensor, text: torch.Tensor, tokens_per_chunk: int):
        """Time and text conditioning: one timestep per sample (Wan2.1's own path), or one per chunk,
        broadcast to its tokens (the path diffusers uses for Wan2.2 TI2V). Decided by shape, not by
        value, so that no device sync is needed."""
        emb = self.model.condition_embedder
        if timesteps.ndim == 2 and timesteps.shape[1] == 1:
            timesteps = timesteps[:, 0]
        if timesteps.ndim == 1:
            temb, tproj, text_h, _ = emb(timesteps, text, None)
            return temb, tproj.unflatten(1, (6, -1)), text_h
        n = timesteps.shape[1]
        temb, tproj, text_h, _ = emb(timesteps.flatten(), text, None, timestep_seq_len=n)
        temb = temb.repeat_interleave(tokens_per_chunk, dim=1)
        tproj = tproj.unflatten(2, (6, -1)).repeat_interleave(tokens_per_chunk, dim=1)
        return temb, tproj, text_h

    def _run_block(self, i: int, adapter: Optional[str], state: AttnState, x, text_h, tproj):
        if self.merged is not None and not torch.is_grad_enabled():
            block = self.merged.block(i, adapter)
        else:
            self.select_adapter(i, adapter)
            block = self.model.blocks[i]
        block.attn1.processor.state = state
        if isinstance(block.attn2.processor, StudentCrossAttnProcessor):
            block.attn2.processor.text_cache = state.cache_ops.cache if state.cache_ops is not None else None
        return block(x, text_h, tproj, None)

    def select_adapter(self, i: int, adapter: Optional[str]) -> None:
        """Make `adapter` the only active LoRA of block i (None: all off), keeping requires_grad as it
        was — PEFT's set_adapter would freeze the other adapter, which the other pass still trains."""
        layers = self._lora_layers[i]
        if not layers:
            if adapter is not None:
                raise ValueError(f"adapter '{adapter}' requested but the model carries no LoRA")
            return
        first = layers[0]  # the layers of a block are always switched together
        if (first.disable_adapters if adapter is None
                else not first.disable_adapters and first.active_adapters == [adapter]):
            return  # already so: streaming runs several passes in a row with one adapter
        grads = [(p, p.requires_grad) for m in layers for p in m.parameters()]
        for m in layers:
            if adapter is None:
                m.enable_adapters(False)
            else:
                m.enable_adapters(True)
                m.set_adapter(adapter)
        for p, flag in grads:
            p.requires_grad_(flag)

    def _output(self, x: torch.Tensor, temb: torch.Tensor, B: int, n: int, grid: tuple[int, int]):
        model = self.model
        p_t, p_h, p_w = self.patch
        if temb.ndim == 3:
            shift, scale = (model.scale_shift_table.unsqueeze(0) + temb.unsqueeze(2)).chunk(2, dim=2)
            shift, scale = shift.squeeze(2), scale.squeeze(2)
        else:
            shift, scale = (model.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
        x = (model.norm_out(x.float()) * (1 + scale) + shift).type_as(x)
        x = model.proj_out(x)
        x = x.reshape(B, n, grid[0], grid[1], p_t, p_h, p_w, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.flatten(6, 7).flatten(4, 5).flatten(2, 3)
