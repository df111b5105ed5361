"""The exported adapters load with diffusers' own LoRA loaders — `WanTransformer3DModel.load_lora_adapter`
and `WanPipeline.load_lora_weights` on `export/<tag>/sdd` — and give exactly what PEFT gives.
alpha != rank here, so a file without diffusers' `lora_adapter_metadata` (alpha assumed = rank) fails."""

from __future__ import annotations

import json

import torch
from safetensors import safe_open

from conftest import randomize_trainable


def _forward(model, latents, timestep, text):
    with torch.no_grad():
        return model(hidden_states=latents, timestep=timestep, encoder_hidden_states=text, return_dict=False)[0]


def _lora_layer_count(model) -> int:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return sum(isinstance(m, BaseTunerLayer) for m in model.modules())


def test_exported_adapters_load_with_diffusers_loaders_and_match_peft(tmp_path):
    from diffusers import WanPipeline
    from peft import PeftModel

    from gd_train.checkpoint import export
    from gd_train.config import load_config
    from gd_train.model.backbone import load_scheduler, load_transformer
    from gd_train.model.student import GreedyDistillStudent

    cfg = load_config("configs/model/tiny.yaml", ["student.sdd_lora.alpha=8", "student.etm_lora.alpha=2"])
    student = GreedyDistillStudent.from_config(cfg)
    randomize_trainable(student, std=0.1)
    student.save_adapters(tmp_path / "ckpt" / "adapters")
    out = export(tmp_path / "ckpt", tmp_path / "export")

    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 16, 3, 8, 12, generator=gen)
    text = torch.randn(1, 9, 32, generator=gen)
    timestep = torch.tensor([500.0])
    base = _forward(load_transformer(cfg), latents, timestep, text)

    for name, alpha in (("sdd", 8), ("etm", 2)):
        folder = out / name
        with safe_open(str(folder / "pytorch_lora_weights.safetensors"), "pt") as fh:
            keys = list(fh.keys())
            meta = json.loads(fh.metadata()["lora_adapter_metadata"])
        assert keys and all(k.startswith("transformer.blocks.") for k in keys)
        assert (meta["transformer.r"], meta["transformer.lora_alpha"]) == (4, alpha)

        peft_model = PeftModel.from_pretrained(load_transformer(cfg), str(folder))
        expected = _forward(peft_model, latents, timestep, text)
        assert not torch.allclose(expected, base, atol=1e-4)  # the adapter does something

        model = load_transformer(cfg)
        model.load_lora_adapter(str(folder), prefix="transformer", adapter_name=name, use_safetensors=True)
        assert _lora_layer_count(model) == _lora_layer_count(peft_model) > 0
        torch.testing.assert_close(_forward(model, latents, timestep, text), expected, rtol=0, atol=0)

        pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=load_scheduler(1.0),
                           transformer=load_transformer(cfg))
        pipe.load_lora_weights(str(folder), adapter_name=name)
        torch.testing.assert_close(_forward(pipe.transformer, latents, timestep, text), expected, rtol=0, atol=0)
