"""Random Wan2.1-T2V-1.3B weights in the Diffusers layout, written once per machine and reused.

`wan_random_folder()` returns a folder that `pretrained_path=` accepts like the released checkpoint:
`transformer/` (the real architecture: 30 blocks, dim 1536, ffn 8960, text_dim 4096, freq_dim 256;
bf16 safetensors, 2.8 GB), `vae/` (the released AutoencoderKLWan architecture, fp32), `text_encoder/`
(UMT5 with d_model 4096, the width the transformer's text embedder expects, and otherwise the
smallest the config allows: 1 layer, 1 head, d_kv 8, d_ff 8) and `tokenizer/` (the byte-level
tokenizer of the tiny model). Weights are random but fixed (seeded); speed and memory do not depend
on their values. Built under a temporary name and renamed when complete, so an interrupted build is
never used. Cache: `$GD_FULL_ARCH_CACHE` or `<repo>/.cache/wan2.1-t2v-1.3b-random` (git-ignored).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
LAYOUT_VERSION = "1"  # bump when what is written changes
WAN_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
SMALLEST_TEXT_ENCODER = dict(d_model=4096, d_kv=8, d_ff=8, num_layers=1, num_heads=1,
                             relative_attention_num_buckets=8)


def cache_folder() -> Path:
    return Path(os.environ.get("GD_FULL_ARCH_CACHE", REPO_ROOT / ".cache" / "wan2.1-t2v-1.3b-random"))


def wan_random_folder() -> Path:
    root = cache_folder()
    marker = root / "gd_train_random_weights.json"
    if marker.is_file() and json.loads(marker.read_text()).get("version") == LAYOUT_VERSION:
        return root
    tmp = root.with_name(root.name + f".partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    _build(tmp)
    (tmp / marker.name).write_text(json.dumps({"version": LAYOUT_VERSION, "transformer": WAN_1_3B,
                                               "text_encoder": SMALLEST_TEXT_ENCODER}, indent=1))
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    return root


def _build(root: Path) -> None:
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from gd_train.model.backbone import _byte_tokenizer, _byte_vocab

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)  # drawn in bf16: 2.8 GB, never a 5.7 GB fp32 copy
        try:
            transformer = WanTransformer3DModel(**WAN_1_3B)
        finally:
            torch.set_default_dtype(previous)
        transformer.save_pretrained(root / "transformer", safe_serialization=True, max_shard_size="10GB")
        del transformer
        AutoencoderKLWan().save_pretrained(root / "vae", safe_serialization=True)
        encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(_byte_vocab()), pad_token_id=0, eos_token_id=1,
                                              decoder_start_token_id=0, **SMALLEST_TEXT_ENCODER))
        encoder.to(torch.bfloat16).save_pretrained(root / "text_encoder", safe_serialization=True)
    _byte_tokenizer().save_pretrained(root / "tokenizer")


# Overrides that run the 1.3B architecture at a tiny spatial size on CPU: 32x32 px (4 tokens per latent
# frame), 9 frames (3 latent frames), 16 text tokens; the model's own bf16, LoRA ranks and checkpointing.
TINY_SPACE = ["video.height=32", "video.width=32", "video.num_frames=9", "model.max_text_tokens=16",
              "data.min_frames=null"]  # 9 frames: below the paper configs' 81..301


def write_full_arch_shards(folder: Path, samples: int, overrides: list[str], config: str = "configs/stage1.yaml") -> None:
    """One real shard of synthetic teacher samples whose shapes fit `config` + `overrides`."""
    import webdataset as wds

    from gd_train.config import latent_shape, load_config, transformer_arch
    from gd_train.data.shards import SHARD_NAME, TeacherSample, encode_sample

    cfg = load_config(REPO_ROOT / config, overrides)
    C, F, H, W = latent_shape(cfg)
    text_dim = transformer_arch(cfg)["text_dim"]
    gen = torch.Generator().manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(folder / SHARD_NAME.format(index=0))) as sink:
        for i in range(samples):
            sink.write(encode_sample(TeacherSample(
                key=f"s{i:04d}", latents=torch.randn(C, F, H, W, generator=gen),
                prompt_embeds=torch.randn(5 + i % 3, text_dim, generator=gen),
                meta={"caption": f"prompt {i}", "seed": i})))
