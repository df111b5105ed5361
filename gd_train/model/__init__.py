"""The student model: `GreedyDistillStudent` (frozen Wan base + `etm`/`sdd` LoRA + c_f projection) and
the diffusers parts it is built from. Names resolve on first use, so `import gd_train.model` stays cheap."""

from gd_train._lazy import lazy_exports

_EXPORTS = {
    "GreedyDistillStudent": "gd_train.model.student",
    "ParallelOutput": "gd_train.model.student",
    "WanPass": "gd_train.model.forward",
    "KVCache": "gd_train.model.attention",
    "PromptEncoder": "gd_train.model.backbone",
    "load_transformer": "gd_train.model.backbone",
    "load_vae": "gd_train.model.backbone",
    "load_text_encoder": "gd_train.model.backbone",
    "pad_prompt_embeds": "gd_train.model.backbone",
    "write_diffusers_lora": "gd_train.model.diffusers_lora",
}
__all__, __getattr__, __dir__ = lazy_exports("gd_train.model", _EXPORTS)
