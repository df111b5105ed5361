"""An exported adapter in diffusers' LoRA layout, next to PEFT's own files.

`WanPipeline.load_lora_weights(DIR)` / `WanTransformer3DModel.load_lora_adapter(DIR)` look in DIR for
`pytorch_lora_weights.safetensors` with `transformer.`-prefixed diffusers module names and, in the
safetensors metadata `lora_adapter_metadata`, the LoRA config (without it diffusers assumes
alpha = rank). A PEFT file (`base_model.model.` keys) loads 0 layers there, with only a warning. The
file is written by diffusers' own `WanPipeline.save_lora_weights`, from the PEFT export.

A plain `WanPipeline` with the `sdd` LoRA is NOT the streaming student: the SDD only makes sense with
its chunk layout (x_0, x_{f-1} as clean context, fixed RoPE frames), c_f from the ETM and the KV caches
of `gd_train.infer.stream`. The diffusers layout is for inspecting, merging or fine-tuning the weights
with diffusers tools.
"""

from __future__ import annotations

from pathlib import Path

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE


def write_diffusers_lora(adapter_dir: str | Path) -> Path:
    """`adapter_dir/pytorch_lora_weights.safetensors` from `adapter_dir/adapter_model.safetensors` and
    its `adapter_config.json` (same tensors, renamed; the LoRA config as diffusers' metadata)."""
    from diffusers import WanPipeline
    from peft import LoraConfig
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    peft_weights = load_file(str(adapter_dir / PEFT_WEIGHTS))
    layers = {}
    for key, value in peft_weights.items():
        if not key.startswith(PEFT_PREFIX):
            raise ValueError(f"{adapter_dir / PEFT_WEIGHTS}: key '{key}' lacks the PEFT prefix '{PEFT_PREFIX}'")
        layers[key[len(PEFT_PREFIX):]] = value
    config = LoraConfig.from_pretrained(str(adapter_dir)).to_dict()
    WanPipeline.save_lora_weights(str(adapter_dir), transformer_lora_layers=layers, weight_name=DIFFUSERS_WEIGHTS,
                                  safe_serialization=True, transformer_lora_adapter_metadata=config)
    return adapter_dir / DIFFUSERS_WEIGHTS
