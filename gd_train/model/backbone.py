"""The diffusers Wan parts: loaded from a local Wan2.1-T2V-1.3B-Diffusers folder, or built tiny.

Nothing here re-implements a model: the transformer is `diffusers.WanTransformer3DModel`, the VAE
`diffusers.AutoencoderKLWan`, the text encoder `transformers.UMT5EncoderModel`, and prompt encoding
goes through `diffusers.WanPipeline.encode_prompt`. Only the parts a command uses are loaded.

The tiny model is the same classes with random weights drawn from `model.init_seed`, so every process
that builds it (Ray data workers, each training rank, the generator) holds identical weights. Its
tokenizer is a byte-level one built with `tokenizers` (the real UMT5 vocabulary cannot be shipped).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
from omegaconf import DictConfig

from gd_train.config import ConfigError, as_container, check_pretrained_folder, transformer_arch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def torch_dtype(cfg: DictConfig) -> torch.dtype:
    return DTYPES[cfg.model.dtype]


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Draw random weights from `seed` without disturbing the caller's RNG stream."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _cast(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast a freshly built model, keeping the modules its class marks fp32-only in fp32 (what
    `from_pretrained(torch_dtype=...)` does for loaded weights)."""
    if dtype == torch.float32:
        return model
    model.to(dtype)
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    for name, module in model.named_modules():
        if any(part in keep for part in name.split(".")):
            module.to(torch.float32)
    return model


def _pretrained_part(cfg: DictConfig, part: str) -> Optional[Path]:
    if cfg.pretrained_path is None:
        return None
    return check_pretrained_folder(cfg.pretrained_path, parts=(part,)) / part


def _weights_present(folder: Path, root: str) -> None:
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.safetensors.index.json")):
        raise ConfigError(
            f"pretrained_path '{root}': {folder.name}/ holds no *.safetensors weights "
            "(only safetensors are loaded: pickle checkpoints can run code)")


def load_transformer(cfg: DictConfig, dtype: Optional[torch.dtype] = None):
    """`WanTransformer3DModel` from `<pretrained_path>/transformer`, or the tiny random one."""
    from diffusers import WanTransformer3DModel

    dtype = dtype or torch_dtype(cfg)
    folder = _pretrained_part(cfg, "transformer")
    if folder is not None:
        _weights_present(folder, cfg.pretrained_path)
        model = WanTransformer3DModel.from_pretrained(folder, torch_dtype=dtype, use_safetensors=True)
    else:
        with _seeded(cfg.model.init_seed):
            model = _cast(WanTransformer3DModel(**transformer_arch(cfg)), dtype)
    model.requires_grad_(False)
    return model.eval()


def load_vae(cfg: DictConfig, dtype: torch.dtype = torch.float32):
    """`AutoencoderKLWan` from `<pretrained_path>/vae`, or the tiny random one (kept in fp32: it is
    cheap and the Wan VAE is numerically touchy in bf16)."""
    from diffusers import AutoencoderKLWan

    folder = _pretrained_part(cfg, "vae")
    if folder is not None:
        _weights_present(folder, cfg.pretrained_path)
        vae = AutoencoderKLWan.from_pretrained(folder, torch_dtype=dtype, use_safetensors=True)
    else:
        with _seeded(cfg.model.init_seed + 1):
            vae = _cast(AutoencoderKLWan(**as_container(cfg.model.vae)), dtype)
    vae.requires_grad_(False)
    return vae.eval()


def load_text_encoder(cfg: DictConfig, dtype: Optional[torch.dtype] = None):
    from transformers import UMT5Config, UMT5EncoderModel

    dtype = dtype or torch_dtype(cfg)
    folder = _pretrained_part(cfg, "text_encoder")
    if folder is not None:
        _weights_present(folder, cfg.pretrained_path)
        encoder = UMT5EncoderModel.from_pretrained(folder, torch_dtype=dtype, use_safetensors=True)
    else:
        arch = as_container(cfg.model.text_encoder)
        arch_cfg = UMT5Config(vocab_size=len(_byte_vocab()), pad_token_id=0, eos_token_id=1,
                              decoder_start_token_id=0, **arch)
        with _seeded(cfg.model.init_seed + 2):
            encoder = _cast(UMT5EncoderModel(arch_cfg), dtype)
    encoder.requires_grad_(False)
    return encoder.eval()


def load_tokenizer(cfg: DictConfig):
    from transformers import AutoTokenizer

    if cfg.pretrained_path is not None:
        root = check_pretrained_folder(cfg.pretrained_path, parts=("tokenizer",))
        return AutoTokenizer.from_pretrained(root / "tokenizer")
    return _byte_tokenizer()


def _byte_vocab() -> dict[str, int]:
    from tokenizers import pre_tokenizers

    specials = ["<pad>", "</s>", "<unk>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    return {tok: i for i, tok in enumerate(specials + alphabet)}


def _byte_tokenizer():
    """A real fast tokenizer (byte-level, no merges, `</s>` appended like T5) for the tiny encoder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = _byte_vocab()
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", vocab["</s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def load_scheduler(flow_shift: float):
    """Wan's recommended sampler for the teacher (UniPC, flow prediction) with an explicit shift."""
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                   num_train_timesteps=1000, flow_shift=flow_shift)


class PromptEncoder:
    """Text -> UMT5 embeddings through `WanPipeline.encode_prompt` (its cleaning, padding, truncation)."""

    def __init__(self, cfg: DictConfig, device: torch.device | str = "cpu"):
        from diffusers import WanPipeline

        self.max_tokens = cfg.model.max_text_tokens
        self.pipe = WanPipeline(tokenizer=load_tokenizer(cfg), text_encoder=load_text_encoder(cfg).to(device),
                                vae=None, scheduler=load_scheduler(1.0), transformer=None)
        self.device = torch.device(device)

    @torch.no_grad()
    def encode_padded(self, prompts: Sequence[str]) -> torch.Tensor:
        """(B, max_tokens, text_dim), zero past each prompt's tokens (what Wan was trained with)."""
        embeds, _ = self.pipe.encode_prompt(list(prompts), do_classifier_free_guidance=False,
                                            max_sequence_length=self.max_tokens, device=self.device)
        return embeds

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> list[torch.Tensor]:
        """One (tokens_i, text_dim) tensor per prompt, unpadded (how shards store them)."""
        padded = self.encode_padded(prompts)
        lengths = self.token_counts(prompts)
        return [row[:n].clone() for row, n in zip(padded, lengths)]

    def token_counts(self, prompts: Sequence[str]) -> list[int]:
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        ids = self.pipe.tokenizer([prompt_clean(p) for p in prompts], padding="max_length", truncation=True,
                                  max_length=self.max_tokens, add_special_tokens=True,
                                  return_attention_mask=True, return_tensors="pt")
        return ids.attention_mask.sum(dim=1).tolist()


def pad_prompt_embeds(embeds: Sequence[torch.Tensor], max_tokens: int) -> torch.Tensor:
    """Stack unpadded (tokens_i, D) embeddings into (B, max_tokens, D) with zeros, as WanPipeline does."""
    out = embeds[0].new_zeros(len(embeds), max_tokens, embeds[0].shape[-1])
    for i, e in enumerate(embeds):
        n = min(e.shape[0], max_tokens)
        out[i, :n] = e[:n]
    return out
