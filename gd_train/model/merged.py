"""Inference without PEFT's wrappers: per-adapter merged copies of the adapted linears.

A PEFT LoRA linear computes `base(x) + B(A(x)) * s` — three GEMMs and a handful of small ops per call,
twice as many kernels as the plain linear, and Python dispatch on top (`lora.Linear.forward` checks
its adapters on every call). Streaming generation runs six passes per chunk with two different
adapters, so it would pay that ~300 times per pass at 1.3B. Here each block gets, per adapter, a
*view*: a shallow clone of the block whose adapted linears are plain `nn.Linear`s holding the merged
weight `W + s·B·A`; everything else (norms, the attention processors, biases, unadapted layers, the
base weights themselves for "adapters off") is the same object as in the PEFT model. A pass then runs
exactly the modules of a plain diffusers block.

Cost: one extra copy of every adapted weight per adapter (at Wan2.1-1.3B with the default targets,
q/k/v/out of both attentions and both FFN linears: 1.39 B of the 1.42 B parameters, i.e. ~2.8 GB per
adapter in bf16, ~5.6 GB for etm + sdd). Training never uses it: the views are used only when grad is
off and only where turned on (`WanPass.merged`), and they are rebuilt when any LoRA weight changed
(an optimizer step, `load_adapters`): PyTorch bumps a tensor's version on every in-place write.

Numerics: fp32 equals the PEFT path to rounding (~1e-6 relative). In bf16 the merged weight is rounded
to bf16 once, where PEFT adds an fp32 LoRA product to a bf16 base output: the two differ by bf16
rounding of the weights (tested to 2e-2 of the output's scale).
"""

from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch
from torch import nn


class MergedAdapters:
    """Per (block, adapter) views of a PEFT-wrapped `WanTransformer3DModel` with merged weights."""

    def __init__(self, transformer: nn.Module, adapters: Sequence[str]):
        from peft.tuners.lora import LoraLayer

        self.model = transformer
        self.adapters = tuple(adapters)
        # Per block: (path inside the block, the LoRA layer) of every adapted linear.
        self._layers: list[list[tuple[str, LoraLayer]]] = [
            [(name, m) for name, m in block.named_modules() if isinstance(m, LoraLayer)]
            for block in transformer.blocks]
        for block_layers in self._layers:
            for name, layer in block_layers:
                if not isinstance(layer.get_base_layer(), nn.Linear):
                    raise TypeError(f"merged inference: {name} wraps a {type(layer.get_base_layer()).__name__}, "
                                    "only nn.Linear can be merged")
                for a in self.adapters:
                    if a in getattr(layer, "lora_variant", {}):  # DoRA and friends: no plain merged weight
                        raise TypeError(f"merged inference: {name} uses a LoRA variant for '{a}'")
        self._views: dict[tuple[int, Optional[str]], nn.Module] = {}
        self._signature: Optional[tuple] = None

    # ----------------------------------------------------------------------------------------------
    def block(self, i: int, adapter: Optional[str]) -> nn.Module:
        """Block i as a plain diffusers block running `adapter` merged in (None: the base weights)."""
        if adapter is not None and adapter not in self.adapters:
            raise ValueError(f"adapter '{adapter}' requested; merged inference holds {', '.join(self.adapters)}")
        view = self._views.get((i, adapter))
        if view is None:
            view = self._views[(i, adapter)] = self._build(i, adapter)
        return view

    def refresh(self) -> bool:
        """Drop the views if a LoRA weight changed since they were built; True if they were dropped.

        Call it where the weights may have changed (the generator does, once per stream): it reads
        each LoRA tensor's version counter, ~1,200 tensors at 1.3B, well under a millisecond."""
        signature = self._current_signature()
        if signature == self._signature:
            return False
        self._views.clear()
        self._signature = signature
        return True

    def invalidate(self) -> None:
        self._views.clear()
        self._signature = None

    def extra_bytes(self) -> int:
        """Bytes held by merged weights right now (what the views cost on top of the PEFT model)."""
        seen, total = set(), 0
        for (_, adapter), view in self._views.items():
            if adapter is None:
                continue
            for m in view.modules():
                if isinstance(m, _MergedLinear) and id(m.weight) not in seen:
                    seen.add(id(m.weight))
                    total += m.weight.numel() * m.weight.element_size()
        return total

    # ----------------------------------------------------------------------------------------------
    def _current_signature(self) -> tuple:
        out = []
        for block_layers in self._layers:
            for _, layer in block_layers:
                for a in self.adapters:
                    if a in layer.lora_A:
                        for w in (layer.lora_A[a].weight, layer.lora_B[a].weight):
                            out.append((w.data_ptr(), w._version))
                        out.append(layer.scaling[a])
        return tuple(out)

    @torch.no_grad()
    def _build(self, i: int, adapter: Optional[str]) -> nn.Module:
        if self._signature is None:
            self._signature = self._current_signature()
        replacements: dict[str, nn.Module] = {}
        for name, layer in self._layers[i]:
            base = layer.get_base_layer()
            if adapter is None or adapter not in layer.lora_A:
                replacements[name] = base
            else:
                delta = layer.get_delta_weight(adapter)
                weight = (base.weight.float() + delta.float()).to(base.weight.dtype)
                replacements[name] = _MergedLinear(weight, base.bias)
        return _clone_along(self.model.blocks[i], replacements)


class _MergedLinear(nn.Module):
    """A plain linear over a merged weight (not an nn.Parameter: nothing may train it)."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor]):
        super().__init__()
        self.weight = weight
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias)


def _clone_along(module: nn.Module, replacements: dict[str, nn.Module]) -> nn.Module:
    """A shallow copy of `module` with the submodules at the given dotted paths replaced. Only the
    modules on those paths are copied (with their own child dicts); everything else is shared."""
    clone = copy.copy(module)
    clone._modules = dict(module._modules)
    children: dict[str, dict[str, nn.Module]] = {}
    for path, new in replacements.items():
        head, _, rest = path.partition(".")
        if rest:
            children.setdefault(head, {})[rest] = new
        else:
            clone._modules[head] = new
    for head, sub in children.items():
        clone._modules[head] = _clone_along(module._modules[head], sub)
    return clone
