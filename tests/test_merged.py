"""Merged-adapter inference (gd_train.model.merged): streaming through plain blocks with per-adapter
merged weights equals streaming through PEFT's LoRA layers, runs no LoRA layer at all, is rebuilt
when adapters change, and never touches training passes."""

from __future__ import annotations

import pytest
import torch
from peft.tuners.lora import LoraLayer

from gd_train.config import load_config
from gd_train.infer.stream import StreamingGenerator, StreamSettings
from gd_train.model.student import GreedyDistillStudent

from conftest import randomize_trainable

FRAMES = 5  # past the ETM window (w = 3): the ring of w + 1 slots wraps once


def _student(dtype: str = "float32", seed: int = 0) -> GreedyDistillStudent:
    cfg = load_config("configs/model/tiny.yaml", [f"model.dtype={dtype}"])
    torch.manual_seed(0)
    student = GreedyDistillStudent.from_config(cfg).eval()
    randomize_trainable(student, seed=seed, std=0.2)
    return student


def _text(student, seed: int = 1) -> torch.Tensor:
    return torch.randn(1, 10, 32, generator=torch.Generator().manual_seed(seed))


class _LoraCalls:
    """Counts forward calls of every PEFT LoRA layer of the model."""

    def __init__(self, student):
        self.count = 0
        self.handles = [m.register_forward_hook(self._hook) for m in student.transformer.modules()
                        if isinstance(m, LoraLayer)]

    def _hook(self, *_):
        self.count += 1

    def close(self):
        for h in self.handles:
            h.remove()


def _stream(student, merged: bool, kv_cache: bool = True, frames: int = FRAMES, seed: int = 3) -> torch.Tensor:
    settings = StreamSettings.from_config(student.cfg, kv_cache=kv_cache, merged_adapters=merged)
    return StreamingGenerator(student, settings).generate(_text(student), frames, seed=seed)


def _scale_close(a: torch.Tensor, b: torch.Tensor, rel: float) -> None:
    err = (a.float() - b.float()).abs().max().item()
    scale = b.float().abs().max().item()
    assert err <= rel * scale, f"max |diff| {err:.3g} > {rel} x max |ref| {scale:.3g}"


@pytest.mark.parametrize("kv_cache", [True, False])
def test_merged_streaming_equals_peft_streaming_in_fp32_and_runs_no_lora_layer(kv_cache):
    student = _student()
    calls = _LoraCalls(student)
    ref = _stream(student, merged=False, kv_cache=kv_cache)
    assert calls.count > 0
    calls.count = 0
    ours = _stream(student, merged=True, kv_cache=kv_cache)
    assert calls.count == 0  # every pass ran plain linears
    calls.close()
    assert ours.shape == ref.shape == (1, 16, FRAMES, 8, 12)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert student.runner.merged is not None and student.runner.merged.extra_bytes() > 0


def test_merged_streaming_in_bf16_is_within_bf16_rounding_of_peft():
    student = _student("bfloat16")
    ref = _stream(student, merged=False)
    ours = _stream(student, merged=True)
    assert ours.dtype == torch.bfloat16
    # The merged weight is rounded to bf16 once (PEFT adds an fp32 LoRA product to a bf16 output),
    # and 5 frames x 4 steps feed each other: 3% of the output's scale (measured 0.7%).
    _scale_close(ours, ref, 3e-2)
    assert not torch.equal(ours, ref)  # genuinely the other path


def test_adapters_loaded_or_updated_after_a_merge_are_merged_again(tmp_path):
    student = _student()
    first = _stream(student, merged=True)
    other = _student(seed=7)
    other.save_adapters(tmp_path / "adapters")
    student.load_adapters(tmp_path / "adapters")
    after_load = _stream(student, merged=True)
    assert not torch.allclose(after_load, first)
    torch.testing.assert_close(after_load, _stream(other, merged=False), rtol=1e-5, atol=1e-5)

    # An in-place update (what an optimizer step does) is seen through the tensors' version counters.
    with torch.no_grad():
        for p in student.trainable_parameters("sdd"):
            p.mul_(0.5)
    torch.testing.assert_close(_stream(student, merged=True), _stream(student, merged=False), rtol=1e-5, atol=1e-5)


def test_passes_with_grad_run_the_peft_layers_even_with_merged_views_on():
    student = _student()
    student.merged_inference(True)
    calls = _LoraCalls(student)
    clip = torch.randn(1, 16, 3, 8, 12, generator=torch.Generator().manual_seed(4))
    out = student.parallel_forward(clip, clip[:, :, 1:] * 0.5, torch.full((1, 2), 0.5), _text(student))
    out.velocity.square().mean().backward()
    calls.close()
    assert calls.count > 0
    assert all(p.grad is not None for p in student.trainable_parameters("sdd") if p.ndim == 2)
    with torch.no_grad():  # and the teacher (adapters off) through a view is the base model itself
        x = clip[:, :, :2]
        merged = student.teacher_velocity(x, 500.0, _text(student))
        student.merged_inference(False)
        torch.testing.assert_close(merged, student.teacher_velocity(x, 500.0, _text(student)), rtol=0, atol=0)
