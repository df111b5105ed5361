"""The synthetic world and its metrics (gd_train.eval): ground-truth clips score perfectly, clips that
break the physics or the prompt score badly, and the world really needs more than two frames."""

import numpy as np
import pytest
import torch

from gd_train.eval import metrics, world
from gd_train.eval.world import MotionSpec


def _clip(spec, frames, start):
    pos = world.trajectory(np.asarray(start, float), spec.velocity, frames)
    return pos, world.render(spec.kind, pos)


@pytest.mark.parametrize("spec", world.all_specs())
def test_ground_truth_clip_scores_zero_error(spec):
    clip = world.sample_clip(spec, 24, np.random.default_rng(hash(spec.prompt) % 1000))  # bounces included
    score = metrics.score_clip(clip.latents, spec)
    assert score.position_error.max() < 2e-3
    assert score.velocity_error < 2e-3
    assert score.direction_cosine > 0.999
    assert score.shape_error < 1e-6
    assert abs(score.amplitude_ratio - 1) < 1e-3
    assert score.identity == 1.0
    assert np.abs(score.positions - clip.positions).max() < 2e-3  # the fit recovers the true centres


def test_frozen_reversed_wrong_object_and_noise_score_badly():
    spec = MotionSpec("red", "right", "quickly")
    lo, hi = world.bounds()
    pos, clip = _clip(spec, 4, (4.0, lo[1]))  # 3 px to the right, no wall reached: no bounce
    frozen = world.render(spec.kind, np.repeat(pos[:1], 4, axis=0))
    s = metrics.score_clip(frozen, spec)
    assert s.direction_cosine == 0.0 and s.velocity_error > 0.99
    assert np.allclose(s.position_error, np.arange(4), atol=2e-3)  # falls behind by 1 px a frame
    # Time-reversed: it moves left where the prompt says right (a clip that bounced inside its window
    # can be a valid clip reversed, so this one does not bounce, nor would its truth).
    s = metrics.score_clip(clip.flip(1), spec)
    assert s.direction_cosine < -0.99 and s.position_error[-1] == pytest.approx(6.0, abs=1e-2)
    s = metrics.score_clip(world.render("blue", pos), spec)  # the other object
    assert s.identity == 0.0 and s.shape_error == pytest.approx(1.0)
    noise = torch.randn(16, 4, world.HEIGHT, world.WIDTH, generator=torch.Generator().manual_seed(0))
    s = metrics.score_clip(noise, spec)
    assert s.shape_error > 0.9 and s.amplitude_ratio < 0.3
    two = clip + world.render("red", np.repeat([[4.0, hi[1]]], 4, axis=0))  # a second object
    assert metrics.score_clip(two, spec).shape_error > 0.3


def test_bounces_are_elastic_and_stay_inside():
    lo, hi = world.bounds()
    for spec in world.all_specs():
        pos = world.trajectory(lo + 0.3 * (hi - lo), spec.velocity, 200)
        assert (pos >= lo - 1e-9).all() and (pos <= hi + 1e-9).all()
        speed = np.linalg.norm(np.diff(pos, axis=0), axis=1)
        assert speed.max() <= world.SPEEDS[spec.speed] + 1e-9  # a turn shortens one step, never lengthens it
        assert world.bounce_count(spec, lo + 0.3 * (hi - lo), 200) >= 200 * world.SPEEDS[spec.speed] / (2 * (hi - lo).max()) - 1


def test_two_frames_do_not_determine_the_next_one():
    """From x_0 and x_{f-1} alone (f unknown) the next position is ambiguous: the same pair of
    positions occurs before a bounce (moving on) and after it (coming back)."""
    spec = MotionSpec("red", "right", "quickly")
    lo, hi = world.bounds()
    start = np.array([4.0, lo[1] + 2.0])
    pos = world.trajectory(start, spec.velocity, 40)
    x0, later = pos[0], pos[1:]
    # frames whose position equals an earlier frame's (same x_0, same x_{f-1}) but whose next step differs
    pairs = [(a, b) for a in range(1, 39) for b in range(a + 1, 39)
             if np.allclose(later[a - 1], later[b - 1]) and not np.allclose(pos[a + 1] - pos[a], pos[b + 1] - pos[b])]
    assert pairs, "every (x_0, x_{f-1}) pair would determine x_f"
    assert np.allclose(x0, start)


def test_prompts_round_trip_and_bad_captions_are_named():
    for spec in world.all_specs():
        assert world.parse_prompt(spec.prompt) == spec
    assert len({s.prompt for s in world.all_specs()}) == len(world.all_specs()) == 16
    with pytest.raises(world.PromptParseError, match="'green ball moving left slowly'"):
        world.parse_prompt("green ball moving left slowly")


def test_sampling_is_seeded_and_balanced():
    a = world.sample_clip(world.all_specs()[3], 8, np.random.default_rng(5))
    b = world.sample_clip(world.all_specs()[3], 8, np.random.default_rng(5))
    assert torch.equal(a.latents, b.latents)
    specs = world.sample_specs(32, np.random.default_rng(1))
    assert sorted(s.prompt for s in specs) == sorted(2 * [s.prompt for s in world.all_specs()])


def test_summary_and_next_frame_error():
    spec = MotionSpec("blue", "down", "slowly")
    pos, clip = _clip(spec, 4, (2.0, 5.0))
    assert metrics.next_frame_error(clip[:, 3:4], spec, pos[3]) < 2e-3
    assert metrics.next_frame_error(clip[:, 3:4], spec, pos[3] + [0.0, 1.0]) == pytest.approx(1.0, abs=2e-3)
    assert np.allclose(metrics.reference_positions(clip, spec), pos, atol=2e-3)
    s = metrics.summarise([{"a": 1.0}, {"a": 3.0}])
    assert s == {"a": {"mean": 2.0, "std": 1.0, "n": 2}}


def test_motion_continuation_scores_the_clips_own_motion_whatever_the_prompt():
    lo, hi = world.bounds()
    for spec in world.all_specs():
        start = lo + np.array([0.3, 0.6]) * (hi - lo)
        pos = world.trajectory(start, spec.velocity, 32)  # bounces after the fitted 8 frames included
        fit = metrics.fit_motion(pos[:8])
        assert np.abs(fit[0] - spec.velocity).max() < 1e-6 and fit[1] < 1e-6
        m = metrics.motion_continuation(pos, 8)
        assert m["continuation_error"] < 1e-6 and m["motion_residual"] < 1e-6
        assert m["fitted_speed"] == pytest.approx(world.SPEEDS[spec.speed])
        # Measured on rendered latents: the matched filter's positions, the same verdict.
        assert metrics.motion_continuation(metrics.score_clip(world.render(spec.kind, pos), spec).positions, 8)[
            "continuation_error"] < 5e-3
    spec = MotionSpec("red", "right", "slowly")
    pos = world.trajectory(lo + 0.2 * (hi - lo), spec.velocity, 24)
    # A consistent motion in a wrong direction continues perfectly (the prompt is not its reference).
    wrong = world.trajectory(pos[0], (0.5, 0.0), 24)
    assert metrics.motion_continuation(wrong, 8)["continuation_error"] < 1e-6
    stopped = np.concatenate([pos[:8], np.repeat(pos[7:8], 16, axis=0)])  # stops after the fitted frames
    assert metrics.motion_continuation(stopped, 8)["continuation_error"] > 1.0
    turned = np.concatenate([pos[:8], pos[7:8] + (pos[7] - pos[8:24])])  # turns back mid-field: no wall
    assert metrics.motion_continuation(turned, 8)["continuation_error"] > 1.0
    frozen = np.repeat(pos[:1], 24, axis=0)  # a frozen clip fits at speed 0: the residual alone cannot tell
    m = metrics.motion_continuation(frozen, 8)
    assert m["fitted_speed"] < 1e-9 and m["continuation_error"] < 1e-9
    jitter = pos + np.random.default_rng(0).normal(0, 1.0, pos.shape)
    assert metrics.motion_continuation(jitter, 8)["motion_residual"] > 0.5
    assert np.isnan(metrics.motion_continuation(pos[:8], 8)["continuation_error"])
    with pytest.raises(ValueError, match="fitted_frames: expected 2 .. 8"):
        metrics.motion_continuation(pos[:8], 9)


def test_the_toy_data_job_samples_every_prompt_at_the_worlds_one_length():
    """configs/toy/datagen.yaml includes the tiny datagen defaults, which mix lengths; the toy teacher
    was trained at one length and the experiment scores at it."""
    from data_pipeline.lengths import LengthPlanner
    from gd_train.config import load_config

    planner = LengthPlanner.from_config(load_config("configs/toy/datagen.yaml"))
    assert planner.possible_lengths == (1 + 4 * (8 - 1),)


def test_direction_probe_sees_a_word_only_when_the_model_reads_its_text():
    """toy_teacher.direction_probe (the teacher's check during training): a model whose cross-attention
    output is zeroed cannot see its prompt, so every word swap changes nothing; a random one does."""
    from diffusers import WanTransformer3DModel

    from gd_train.eval import toy_teacher
    from gd_train.model.backbone import PromptEncoder

    torch.manual_seed(0)
    model = WanTransformer3DModel(**toy_teacher.ARCH).eval()
    probe = toy_teacher.direction_probe(PromptEncoder(toy_teacher.toy_config()), clips=8, sigmas=(0.9,))
    assert probe(0, model)["0.9"]["kind"] != 0.0
    with torch.no_grad():
        for block in model.blocks:
            block.attn2.to_out[0].weight.zero_()
            block.attn2.to_out[0].bias.zero_()
    gaps = probe(0, model)["0.9"]
    assert gaps["true"] > 0 and gaps["kind"] == gaps["direction"] == gaps["speed"] == 0.0
