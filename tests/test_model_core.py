"""Invariants of the student model (DESIGN §3): teacher parity, Eq. (1), train/infer parity, the KV
cache, what trains, activation checkpointing, and clear errors on bad input."""

import random

import pytest
import torch

from gd_train.config import ConfigError, load_config
from gd_train.model.attention import (
    AttnState, ChunkMask, attend, eq1_reference, sdd_visibility, sliding_window_visibility)
from gd_train.model.backbone import load_transformer
from gd_train.model.student import GreedyDistillStudent
from gd_train.infer.stream import StreamingGenerator, StreamSettings

from conftest import randomize_trainable

B, C, H, W = 2, 16, 8, 12  # tiny latents: 4 x 6 = 24 tokens per chunk


def _text(batch=B, tokens=10, seed=1):
    return torch.randn(batch, tokens, 32, generator=torch.Generator().manual_seed(seed))


def _latents(frames, seed=2, batch=B):
    return torch.randn(batch, C, frames, H, W, generator=torch.Generator().manual_seed(seed))


# --- 1. teacher parity -------------------------------------------------------------------------
def test_teacher_matches_plain_diffusers_model(tiny_cfg, student):
    plain = load_transformer(tiny_cfg)  # same seed -> same weights, no LoRA, diffusers' own forward
    x, text = _latents(5), _text()
    t = torch.tensor([937.0, 120.0])
    with torch.no_grad():
        ref = plain(x, t, text, return_dict=False)[0]
        ours = student.teacher_velocity(x, t, text)  # adapters are random here but switched off
    assert ours.shape == x.shape
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)


def test_fresh_student_sdd_with_full_mask_is_the_teacher(tiny_cfg):
    """Zero LoRA (PEFT's B = 0) and zero c_f projection: the SDD adapter changes nothing."""
    plain = load_transformer(tiny_cfg)
    student = GreedyDistillStudent.from_config(tiny_cfg)
    x, text = _latents(4), _text()
    t = torch.full((B, 4), 400.0)
    cond = student.cf_proj(torch.randn(B, 4 * 24, student.dim))
    assert torch.count_nonzero(cond) == 0
    with torch.no_grad():
        ref = plain(x, t[:, 0], text, return_dict=False)[0]
        ours = student.runner(x, t, list(range(4)), text, adapter="sdd", added=cond).velocity
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)


# --- 2. masks ------------------------------------------------------------------------------------
def test_sliding_window_mask_equals_eq1_brute_force():
    rng = random.Random(0)
    for _ in range(60):
        F_, k, w = rng.randint(1, 9), rng.randint(1, 5), rng.randint(0, 5)
        dense = ChunkMask(sliding_window_visibility(F_, w), k).dense()
        brute = torch.tensor([[eq1_reference(i, j, k, w) for j in range(F_ * k)] for i in range(F_ * k)])
        assert torch.equal(dense, brute), (F_, k, w)


def test_sdd_mask_shape_of_context():
    vis = sdd_visibility(num_context=4, first_noisy=0, num_noisy=5)
    # clean frames see themselves only
    assert torch.equal(vis[:4, :4], torch.eye(4, dtype=torch.bool)) and not vis[:4, 4:].any()
    assert vis[4].nonzero().flatten().tolist() == [4]  # noisy x_0: itself
    assert vis[5].nonzero().flatten().tolist() == [0, 5]  # noisy x_1: x_0 (= x_{f-1}) and itself
    assert vis[7].nonzero().flatten().tolist() == [0, 2, 7]  # noisy x_3: x_0, x_2, itself


@pytest.mark.parametrize("kind", ["sliding", "sdd"])
def test_flex_and_sdpa_paths_agree(kind):
    torch.manual_seed(0)
    L = 16
    vis = sliding_window_visibility(6, 2) if kind == "sliding" else sdd_visibility(5, 0, 6)
    n = vis.shape[0]
    q, k, v = (torch.randn(1, n * L, 2, 16) for _ in range(3))
    rope = (torch.ones(1, 1, 1, 16), torch.zeros(1, 1, 1, 16))
    sdpa = attend(q, k, v, AttnState(rope, rope, mask=ChunkMask(vis, L), backend="sdpa"))
    flex = attend(q, k, v, AttnState(rope, rope, mask=ChunkMask(vis, L), backend="flex"))
    torch.testing.assert_close(flex, sdpa, rtol=1e-5, atol=1e-5)


def test_flex_backend_student_pass_matches_sdpa(tiny_cfg):
    outs = {}
    clip, text = _latents(5), _text()
    sig = torch.full((B, 5), 0.5)
    for backend in ("sdpa", "flex"):
        cfg = load_config("configs/model/tiny.yaml", [f"model.attention_backend={backend}"])
        s = GreedyDistillStudent.from_config(cfg)
        randomize_trainable(s)
        with torch.no_grad():
            outs[backend] = s.parallel_forward(clip, clip, sig, text)
    torch.testing.assert_close(outs["flex"].velocity, outs["sdpa"].velocity, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(outs["flex"].cond, outs["sdpa"].cond, rtol=1e-4, atol=1e-5)


# --- 3. train/infer parity ----------------------------------------------------------------------
@pytest.mark.parametrize("window", [0, 1, 3])
def test_parallel_pass_equals_kv_cached_streaming(tiny_cfg, window):
    cfg = load_config("configs/model/tiny.yaml", [f"student.etm_window={window}"])
    s = GreedyDistillStudent.from_config(cfg)
    randomize_trainable(s)
    N = 7  # x_0..x_6: the window slides several times
    clip, noise, text = _latents(N), _latents(N, seed=3), _text()
    sig = torch.rand(1, N, generator=torch.Generator().manual_seed(4)).expand(B, N)
    noisy = (1 - sig[:, None, :, None, None]) * clip + sig[:, None, :, None, None] * noise
    with torch.no_grad():
        par = s.parallel_forward(clip, noisy, sig, text)
        etm_cache, sdd_cache = s.new_caches(B, H, W)
        cond = None
        for f in range(N):
            v = s.sdd_velocity_step(noisy[:, :, f:f + 1], float(sig[0, f]), f, cond, sdd_cache, text)
            torch.testing.assert_close(v, par.velocity[:, :, f:f + 1], rtol=1e-5, atol=1e-5)
            frame = clip[:, :, f:f + 1]
            s.sdd_context_step(frame, f, sdd_cache, text)
            cond = s.etm_step(frame, f, etm_cache, text)
            if f + 1 < N:
                torch.testing.assert_close(cond, par.cond[:, f], rtol=1e-5, atol=1e-5)


def test_parallel_pass_without_first_frame_term(tiny_cfg, student):
    N = 4
    clip, text = _latents(N), _text()
    sig = torch.full((B, N - 1), 0.3)
    with torch.no_grad():
        with_first = student.parallel_forward(clip, clip, torch.full((B, N), 0.3), text)
        without = student.parallel_forward(clip, clip[:, :, 1:], sig, text)
    assert without.first_noisy == 1 and without.velocity.shape[2] == N - 1
    torch.testing.assert_close(without.velocity, with_first.velocity[:, :, 1:], rtol=1e-5, atol=1e-5)


# --- 4. streaming with cache == streaming by recompute ------------------------------------------
@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_streaming_cache_equals_recompute(tiny_cfg, student, guidance):
    text, neg = _text(batch=1), _text(batch=1, seed=9)
    outs = []
    for kv in (True, False):
        settings = StreamSettings.from_config(tiny_cfg, kv_cache=kv)
        settings.guidance_scale = guidance
        outs.append(StreamingGenerator(student, settings).generate(text, 7, seed=11, negative_embeds=neg))
    assert outs[0].shape == (1, C, 7, H, W)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


def test_streaming_is_deterministic_under_seed(tiny_cfg, student):
    gen = StreamingGenerator(student, StreamSettings.from_config(tiny_cfg))
    a, b, c = (gen.generate(_text(batch=1), 4, seed=s) for s in (5, 5, 6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_stream_positions_stay_bounded_and_memory_is_constant():
    """Far more frames than RoPE has positions: indices never grow, caches never grow (§3.4)."""
    cfg = load_config("configs/model/tiny.yaml", ["model.transformer.rope_max_seq_len=6", "student.etm_window=2"])
    s = GreedyDistillStudent.from_config(cfg)
    randomize_trainable(s)
    gen = StreamingGenerator(s, StreamSettings.from_config(cfg, steps=[1000, 500]))
    seen = 0
    for frame in gen.stream(_text(batch=1), 20, seed=0):
        assert torch.isfinite(frame).all()
        seen += 1
    assert seen == 20
    etm_cache, sdd_cache = s.new_caches(1, H, W)
    assert etm_cache.k.shape[2] == (2 + 1) * 24 and sdd_cache.k.shape[2] == 3 * 24


def test_prompt_keys_values_are_computed_once_per_stream(student):
    """The stream's cache keeps the prompt's cross-attention K/V from its first pass: a later pass
    reuses them (the prompt of a stream is fixed), a fresh cache computes them anew."""
    x = _latents(1, batch=1)
    _, sdd_cache = student.new_caches(1, H, W)
    first = student.sdd_velocity_step(x, 0.5, 0, None, sdd_cache, _text(batch=1, seed=1))
    assert len(sdd_cache.text_kv) == student.transformer.config.num_layers
    again = student.sdd_velocity_step(x, 0.5, 0, None, sdd_cache, _text(batch=1, seed=2))
    assert torch.equal(first, again)
    _, fresh = student.new_caches(1, H, W)
    other = student.sdd_velocity_step(x, 0.5, 0, None, fresh, _text(batch=1, seed=2))
    assert not torch.allclose(first, other)


# --- 5. only adapters (and c_f) train; the base stays bit-identical ------------------------------
def test_only_adapters_and_cf_projection_require_grad(student):
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert trainable, "nothing trains"
    assert all(".lora_" in n or n.startswith("cf_proj.") for n in trainable), trainable
    assert any(".etm." in n for n in trainable) and any(".sdd." in n for n in trainable)
    assert {n for n in trainable if n.startswith("cf_proj.")} == {"cf_proj.1.weight", "cf_proj.1.bias"}


def test_training_step_leaves_base_weights_bit_identical(student):
    before = {n: p.detach().clone() for n, p in student.base_parameters().items()}
    lora_before = [p.detach().clone() for p in student.trainable_parameters()]
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    clip, text = _latents(4), _text()
    sig = torch.full((B, 4), 0.5)
    for _ in range(2):
        out = student.parallel_forward(clip, clip * 0.5, sig, text)
        loss = out.velocity.pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    for n, p in student.base_parameters().items():
        assert torch.equal(p, before[n]), f"base weight {n} changed"
    assert any(not torch.equal(a, b) for a, b in zip(lora_before, student.trainable_parameters()))


# --- 6. activation checkpointing changes no gradient ---------------------------------------------
def test_activation_checkpointing_changes_no_gradient(student):
    clip, text = _latents(5), _text()
    noise = _latents(5, seed=7)
    sig = torch.rand(B, 5, generator=torch.Generator().manual_seed(8))
    noisy = (1 - sig[:, None, :, None, None]) * clip + sig[:, None, :, None, None] * noise
    grads = []
    for ckpt in (False, True):
        student.set_gradient_checkpointing(ckpt)
        student.zero_grad(set_to_none=True)
        out = student.parallel_forward(clip, noisy, sig, text)
        (out.velocity - (noise - clip)).pow(2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in student.named_parameters() if p.requires_grad})
    student.set_gradient_checkpointing(False)
    assert grads[0].keys() == grads[1].keys()
    etm_grads = [g for n, g in grads[0].items() if ".etm." in n]
    assert any(g.abs().sum() > 0 for g in etm_grads), "the ETM receives no gradient"
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7, msg=n)


# --- 7. bad input ----------------------------------------------------------------------------------
def test_wrong_latent_shape_is_a_clear_error(student):
    with pytest.raises(ValueError, match=r"expected latents \(B, 16, F, H, W\)"):
        student.teacher_velocity(torch.randn(1, 8, 2, H, W), 500.0, _text(batch=1))
    with pytest.raises(ValueError, match="multiples of the patch size"):
        student.teacher_velocity(torch.randn(1, C, 2, 7, W), 500.0, _text(batch=1))
    with pytest.raises(ValueError, match="at least 1 latent frame"):
        student.teacher_velocity(torch.randn(1, C, 0, H, W), 500.0, _text(batch=1))


def test_frame_count_below_one_is_a_clear_error(tiny_cfg, student):
    gen = StreamingGenerator(student, StreamSettings.from_config(tiny_cfg))
    with pytest.raises(ValueError, match="num_frames: expected >= 1"):
        next(gen.stream(_text(batch=1), 0, seed=0))


def test_unknown_config_key_names_the_nearest_one(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("student:\n  etm_windw: 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key 'student.etm_windw' \(did you mean 'student.etm_window'\?\)"):
        load_config(bad)
    with pytest.raises(ConfigError, match="must|expected|could not be converted"):
        load_config(None, ["student.etm_window=three"])


def test_missing_or_wrong_weights_folder_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="no such folder; expected a Wan2.1-T2V-1.3B-Diffusers folder") as err:
        load_config("configs/model/tiny.yaml", [f"pretrained_path={tmp_path / 'nope'}"])
    assert "\n" not in str(err.value)
    (tmp_path / "w" / "transformer").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"missing transformer/config.json"):
        load_config("configs/model/tiny.yaml", [f"pretrained_path={tmp_path / 'w'}"])
