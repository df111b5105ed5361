"""Image-to-video and prompt switches on the tiny model: through the streaming generator (cache on and
off), the Python pipeline and gd-generate."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import randomize_trainable

IMAGE = "assets/first_frame.png"


class CountingRunner:
    """The student's `WanPass`, counting passes by adapter (forwarding everything else)."""

    def __init__(self, runner):
        self.inner, self.calls = runner, []

    def __call__(self, *args, **kwargs):
        self.calls.append(kwargs["adapter"])
        return self.inner(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.fixture(scope="module")
def pipe():
    from gd_train import GreedyDistillPipeline

    pipe = GreedyDistillPipeline.from_pretrained()
    randomize_trainable(pipe.student, std=0.1)
    return pipe


def _passes_per_frame(pipe, stream) -> list[int]:
    runner = pipe.student.runner
    counting = pipe.student.runner = CountingRunner(runner)
    counts, before = [], 0
    try:
        for _ in stream:
            counts.append(len(counting.calls) - before)
            before = len(counting.calls)
    finally:
        pipe.student.runner = runner
    return counts


def test_image_to_video_starts_from_the_image_and_streams_at_constant_cost(pipe):
    from gd_train.media import decode_latents, encode_frame, read_image

    image = read_image(IMAGE, 96, 64)
    x0 = encode_frame(pipe.vae, image)
    out = pipe("a snowy valley at dusk", num_frames=3, seed=0, image=IMAGE)
    torch.testing.assert_close(out.latents[:, :, :1], x0, rtol=0, atol=0)  # x_0 is the encoded image
    first = out.frames[0][0] * 255.0
    roundtrip = decode_latents(pipe.vae, x0)[0, 0].astype(np.float32)  # the VAE's own encode -> decode
    vae_error = np.abs(roundtrip - image).mean()
    assert np.abs(first - image).mean() <= vae_error + 0.5  # within the VAE's reconstruction error
    # The tiny VAE has random weights, so that error is large; the decoded first frame *is* its round
    # trip of the image (to uint8 rounding), which a frame generated from noise is not.
    assert np.abs(first - roundtrip).max() <= 1.0
    unconditioned = pipe("a snowy valley at dusk", num_frames=1, seed=0).frames[0][0] * 255.0
    assert np.abs(unconditioned - roundtrip).mean() > 2.0

    prompt = pipe.encode_prompt("a snowy valley at dusk")
    with_image = _passes_per_frame(pipe, pipe.latent_stream(prompt, 6, 0, first_frame=x0))
    without = _passes_per_frame(pipe, pipe.latent_stream(prompt, 6, 0))
    steps = len(pipe.settings.sigmas) - 1
    # Frame f's passes are counted when it is yielded: its denoising plus frame f-1's two context passes.
    assert with_image[0] == 0 and without[0] == steps  # x_0 given: nothing denoised
    assert with_image[1:] == without[1:] == [steps + 2] * 5  # then the same constant cost per frame


def _switch_runs(student, cfg, at: int, kv_cache: bool, a, b, frames: int = 8):
    from gd_train.infer.stream import PromptSchedule, StreamingGenerator, StreamSettings

    gen = StreamingGenerator(student, StreamSettings.from_config(cfg, kv_cache=kv_cache))
    schedule = PromptSchedule()
    if at is not None:
        schedule.switch(at, b)
    return gen.generate(a, frames, 3, schedule=schedule)


def test_prompt_switch_changes_the_following_frames_only_and_cache_equals_recompute(tiny_cfg):
    from gd_train.infer.stream import PromptSchedule, StreamingGenerator, StreamSettings
    from gd_train.model.student import GreedyDistillStudent

    student = GreedyDistillStudent.from_config(tiny_cfg).eval()
    randomize_trainable(student, std=0.1)
    gen = torch.Generator().manual_seed(0)
    shape = (1, tiny_cfg.model.max_text_tokens, 32)
    a, b = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    base = _switch_runs(student, tiny_cfg, None, True, a, b)
    w = student.window
    for at in (2, w + 3):  # inside the first window, and with the window full
        on = _switch_runs(student, tiny_cfg, at, True, a, b)
        off = _switch_runs(student, tiny_cfg, at, False, a, b)
        assert torch.equal(on[:, :, :at], base[:, :, :at])  # frames before the switch: untouched
        for f in range(at, on.shape[2]):
            assert not torch.allclose(on[:, :, f], base[:, :, f], atol=1e-3), f
        torch.testing.assert_close(on, off, rtol=1e-5, atol=1e-5)

    # The API call between frames (the stream running) does the same as a schedule given up front.
    streamer = StreamingGenerator(student, StreamSettings.from_config(tiny_cfg))
    schedule = PromptSchedule()
    counting = student.runner = CountingRunner(student.runner)
    frames, passes = [], []
    try:
        for f, x in enumerate(streamer.stream(a, 8, 3, schedule=schedule)):
            passes.append(len(counting.calls))
            frames.append(x)
            if f == w + 2:
                schedule.switch(schedule.next_frame, b)
    finally:
        student.runner = counting.inner
    torch.testing.assert_close(torch.cat(frames, 2), _switch_runs(student, tiny_cfg, w + 3, True, a, b), rtol=0, atol=0)
    per_frame = np.diff(passes).tolist()
    steps = len(streamer.s.sigmas) - 1
    extra = (w + 1) + 2  # the switch: the ETM window anew and the SDD context (x_0, x_{f-1})
    assert per_frame == [steps + 2] * (w + 2) + [steps + 2 + extra] + [steps + 2] * (7 - w - 3)
    with pytest.raises(ValueError, match="already generated"):
        schedule.switch(1, b)


def test_prompt_schedule_forms_and_bad_entries(tmp_path):
    """gd-generate's --prompt-schedule (the README's Public interface test runs the CLI with it)."""
    from gd_train.pipeline import parse_prompt_schedule

    expected = {0: "a snowy valley at dusk", 2: "the valley at night"}
    assert parse_prompt_schedule("2:the valley at night; 0:a snowy valley at dusk") == expected
    file = tmp_path / "schedule.json"
    file.write_text('{"0": "a snowy valley at dusk", "2": "the valley at night"}')
    assert parse_prompt_schedule(str(file)) == expected
    for spec, message in [("0:a fox;x:a bird", "entry 'x': expected FRAME:PROMPT"),
                          ("0:a fox;0:a bird", "frame 0 is given twice"),
                          ("-1:a fox", "entry '-1'"), (str(tmp_path / "none.json"), "no such file")]:
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            parse_prompt_schedule(spec)
