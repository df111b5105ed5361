"""Self-attention for the student: chunk masks (Eq. 1 and the SDD block mask), RoPE at chosen frame
positions, a pre-allocated KV cache, and the attention processor that ties them together.

Why a processor of our own: `WanTransformerBlock` always calls its processors with
`attention_mask=None` and never forwards `attention_kwargs`, and `WanTransformer3DModel.rope` always
numbers frames from 0. So the mask, the key positions and the cache are *state the processor holds*
(`AttnState`), set by `gd_train.model.forward` before each block runs — and passed explicitly into
checkpointed calls so that backward recomputation sees the same state (DESIGN §3.6).

Masks are described at chunk granularity (`ChunkMask`: which query chunk sees which key chunk; one
chunk = one latent frame = L tokens). The same description yields a dense boolean mask for SDPA (CPU,
and training anywhere flex has no backward) and a flex-attention `BlockMask` on CUDA.

Positions (DESIGN §2, "write the choice down"): cached keys are stored *un-rotated*, and RoPE is
applied at attention time with positions that stay bounded — ETM keys get window-relative frame
indices in [0, w], SDD context frames fixed ones (x_0 -> 0, x_{f-1} -> 1, noisy x_f -> 2). Because
RoPE scores depend only on position differences, the training pass (absolute frame indices) and the
streaming pass (window-relative indices) compute the same attention.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

# --------------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------------


def sliding_window_visibility(num_chunks: int, window: int, device=None) -> torch.Tensor:
    """Eq. (1) at chunk level: chunk i sees chunk j iff i - w <= j <= i.  (num_chunks, num_chunks) bool."""
    i = torch.arange(num_chunks)[:, None]
    j = torch.arange(num_chunks)[None, :]
    return ((j >= i - window) & (j <= i)).to(device)


def sdd_visibility(num_context: int, first_noisy: int, num_noisy: int, device=None) -> torch.Tensor:
    """The SDD's block mask in one training pass over [clean x_0..x_{C-1} ; noisy x_a..x_{a+N-1}].

    A clean context frame sees only itself (its keys/values are then exactly what streaming caches
    for it); noisy x_f sees clean x_0, clean x_{f-1} and itself; noisy x_0 (a = 0) sees only itself.
    """
    n = num_context + num_noisy
    vis = torch.zeros(n, n, dtype=torch.bool)
    ctx = torch.arange(num_context)
    vis[ctx, ctx] = True
    for k in range(num_noisy):
        f = first_noisy + k
        q = num_context + k
        vis[q, q] = True
        if f >= 1:
            vis[q, 0] = True
            vis[q, f - 1] = True
    return vis.to(device)


class ChunkMask:
    """Which query chunk sees which key chunk; every chunk holds `tokens_per_chunk` tokens. The dense
    and flex forms are built on first use and kept, so a mask obtained from `etm_mask`/`sdd_mask`
    (cached by layout) is built once per process, not once per step."""

    def __init__(self, visible: torch.Tensor, tokens_per_chunk: int):
        self.visible = visible  # (q_chunks, k_chunks) bool
        self.tokens_per_chunk = tokens_per_chunk
        self._dense: Optional[torch.Tensor] = None
        self._block = None

    def dense(self) -> torch.Tensor:
        """(q_tokens, k_tokens) bool mask for SDPA (True = attend)."""
        if self._dense is None:
            L = self.tokens_per_chunk
            self._dense = self.visible.repeat_interleave(L, dim=0).repeat_interleave(L, dim=1)
        return self._dense

    def block_mask(self):
        """A flex-attention BlockMask with the same pattern."""
        if self._block is None:
            self._block = _flex_block_mask(self.visible, self.tokens_per_chunk)
        return self._block


@functools.lru_cache(maxsize=32)
def etm_mask(num_chunks: int, window: int, tokens_per_chunk: int, device: torch.device) -> ChunkMask:
    return ChunkMask(sliding_window_visibility(num_chunks, window, device), tokens_per_chunk)


@functools.lru_cache(maxsize=32)
def sdd_mask(num_context: int, first_noisy: int, num_noisy: int, tokens_per_chunk: int,
             device: torch.device) -> ChunkMask:
    return ChunkMask(sdd_visibility(num_context, first_noisy, num_noisy, device), tokens_per_chunk)


def _flex_block_mask(visible: torch.Tensor, tokens_per_chunk: int):
    from torch.nn.attention.flex_attention import create_block_mask

    L = tokens_per_chunk
    vis = visible.contiguous()

    def mask_mod(b, h, q_idx, kv_idx):
        return vis[q_idx // L, kv_idx // L]

    q_len, k_len = vis.shape[0] * L, vis.shape[1] * L
    return create_block_mask(mask_mod, None, None, q_len, k_len, device=vis.device)


def eq1_reference(i: int, j: int, k: int, w: int) -> bool:
    """Eq. (1) read literally, token indices i (query) and j (key), chunk size k, window w."""
    import math

    return math.floor(i / k - w) <= math.floor(j / k) <= math.floor(i / k)


# --------------------------------------------------------------------------------------------------
# RoPE at chosen frame positions
# --------------------------------------------------------------------------------------------------


def rope_at_frames(rope: torch.nn.Module, frame_positions: Sequence[int], grid_hw: tuple[int, int]):
    """(cos, sin) of shape (1, n*h*w, 1, head_dim) for chunks at the given frame positions.

    Same tables and layout as `WanRotaryPosEmbed.forward`, which can only number frames 0..n-1.
    Positions are host integers (known without a device sync).
    """
    pph, ppw = grid_hw
    n = len(frame_positions)
    if max(frame_positions) >= rope.max_seq_len or min(frame_positions) < 0:
        raise ValueError(f"RoPE frame position out of range [0, {rope.max_seq_len}): {list(frame_positions)}")
    split = [rope.t_dim, rope.h_dim, rope.w_dim]
    index = torch.tensor(list(frame_positions), device=rope.freqs_cos.device)
    out = []
    for table in (rope.freqs_cos, rope.freqs_sin):
        t_tab, h_tab, w_tab = table.split(split, dim=1)
        t = t_tab[index].view(n, 1, 1, -1).expand(n, pph, ppw, -1)
        h = h_tab[:pph].view(1, pph, 1, -1).expand(n, pph, ppw, -1)
        w = w_tab[:ppw].view(1, 1, ppw, -1).expand(n, pph, ppw, -1)
        out.append(torch.cat([t, h, w], dim=-1).reshape(1, n * pph * ppw, 1, -1))
    return out[0], out[1]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's interleaved rotation (the same arithmetic as `WanAttnProcessor`, which keeps it inline)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


# --------------------------------------------------------------------------------------------------
# KV cache
# --------------------------------------------------------------------------------------------------


class KVCache:
    """Pre-allocated, un-rotated keys/values of every self-attention layer, addressed by token offset.

    Allocated once for a fixed number of chunk slots; streaming writes a chunk's keys/values into a
    slot and attends over a contiguous slot range, so no step allocates or concatenates.
    """

    def __init__(self, num_layers: int, batch: int, slots: int, tokens_per_chunk: int, heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device):
        shape = (num_layers, batch, slots * tokens_per_chunk, heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.tokens_per_chunk = tokens_per_chunk
        self.slots = slots
        # The prompt's cross-attention keys/values per layer, computed on the stream's first pass: a
        # cache belongs to one stream, one prompt batch and one adapter, so they change only when the
        # stream switches prompt (which clears them).
        self.text_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def write(self, layer: int, slot: int, k: torch.Tensor, v: torch.Tensor) -> None:
        start = slot * self.tokens_per_chunk
        self.k[layer, :, start:start + k.shape[1]].copy_(k)
        self.v[layer, :, start:start + v.shape[1]].copy_(v)

    def view(self, layer: int, first_slot: int, num_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
        a = first_slot * self.tokens_per_chunk
        b = (first_slot + num_slots) * self.tokens_per_chunk
        return self.k[layer, :, a:b], self.v[layer, :, a:b]

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2


# --------------------------------------------------------------------------------------------------
# The processor
# --------------------------------------------------------------------------------------------------


@dataclass
class CacheOps:
    """What a streaming pass does with the cache: write the new chunk's K/V into `write_slot` (or not),
    then attend over slots [read_first, read_first + read_slots)."""

    cache: KVCache
    write_slot: Optional[int]
    read_first: int
    read_slots: int


@dataclass
class AttnState:
    """Everything a self-attention layer needs besides its weights, for one pass."""

    q_rope: tuple[torch.Tensor, torch.Tensor]
    k_rope: tuple[torch.Tensor, torch.Tensor]  # for the keys actually attended (cache slots or new)
    mask: Optional[ChunkMask] = None  # None: every query sees every key
    cache_ops: Optional[CacheOps] = None
    backend: str = "sdpa"  # sdpa | flex


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    # Compiled once per process; eager flex materialises the full score matrix (and warns).
    return torch.compile(flex_attention, dynamic=False) if torch.cuda.is_available() else flex_attention


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: AttnState) -> torch.Tensor:
    """(B, S, H, D) in, (B, S, H, D) out."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if state.mask is None:
        out = F.scaled_dot_product_attention(q, k, v)
    elif state.backend == "flex":
        out = _compiled_flex()(q, k, v, block_mask=state.mask.block_mask())
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=state.mask.dense())
    return out.transpose(1, 2)


class StudentAttnProcessor:
    """Replaces `WanAttnProcessor` on a block's self-attention (attn1). Cross-attention keeps diffusers'."""

    def __init__(self, layer: int):
        self.layer = layer
        self.state: Optional[AttnState] = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        state = self.state
        if state is None:
            raise RuntimeError("StudentAttnProcessor called without an AttnState (run blocks through "
                               "gd_train.model.forward.WanPass)")
        query = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))

        ops = state.cache_ops
        if ops is not None:
            if ops.write_slot is not None:
                ops.cache.write(self.layer, ops.write_slot, key, value)
            key, value = ops.cache.view(self.layer, ops.read_first, ops.read_slots)

        query = apply_rope(query, *state.q_rope)
        key = apply_rope(key, *state.k_rope)
        out = attend(query, key, value, state).flatten(2, 3).type_as(query)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


class StudentCrossAttnProcessor:
    """Text cross-attention (attn2) of the T2V model, as `WanAttnProcessor` computes it, with the
    prompt's keys/values kept in the stream's `KVCache` after the first pass (`text_cache`), so a
    streamed chunk projects 512 text tokens once per stream instead of once per pass."""

    def __init__(self, layer: int):
        self.layer = layer
        self.text_cache: Optional[KVCache] = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        query = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        cached = self.text_cache.text_kv.get(self.layer) if self.text_cache is not None else None
        if cached is None:
            key = attn.norm_k(attn.to_k(encoder_hidden_states)).unflatten(2, (attn.heads, -1))
            value = attn.to_v(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            if self.text_cache is not None:
                self.text_cache.text_kv[self.layer] = (key, value)
        else:
            key, value = cached
        out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2))
        out = out.transpose(1, 2).flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))
