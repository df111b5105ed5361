"""Latents -> pixels -> mp4: the streaming VAE decode equals the whole-clip decode; mp4s decode back."""

import numpy as np
import pytest
import torch

from gd_train.media import Mp4Writer, StreamingDecoder, decode_latents, read_mp4, write_mp4
from gd_train.model.backbone import load_vae


def test_streaming_decode_equals_whole_clip_decode(tiny_cfg):
    vae = load_vae(tiny_cfg)
    z = torch.randn(2, 16, 5, 8, 12, generator=torch.Generator().manual_seed(0))
    whole = decode_latents(vae, z)
    decoder = StreamingDecoder(vae)
    parts = [decoder.decode(z[:, :, i:i + 1]) for i in range(5)]
    assert [p.shape[1] for p in parts] == [1, 4, 4, 4, 4]
    assert np.array_equal(np.concatenate(parts, axis=1), whole)
    assert whole.shape == (2, 17, 64, 96, 3) and whole.dtype == np.uint8


def test_mp4_round_trip_keeps_frame_count_and_content(tmp_path):
    ramp = np.linspace(0, 255, 96, dtype=np.uint8)[None, None, :, None].repeat(64, 1).repeat(3, 3)
    frames = np.concatenate([ramp] * 9)  # (9, 64, 96, 3)
    path = write_mp4(frames, tmp_path / "v.mp4", fps=16)
    back = read_mp4(path)
    assert back.shape == frames.shape
    assert np.abs(back.astype(int) - frames.astype(int)).mean() < 4  # lossy, but close
    assert not (tmp_path / "v.mp4.partial").exists()


def test_mp4_writer_rejects_odd_sizes_and_leaves_no_file(tmp_path):
    with pytest.raises(ValueError, match="even frame sizes"):
        with Mp4Writer(tmp_path / "odd.mp4", fps=8) as writer:
            writer.write(np.zeros((2, 63, 96, 3), dtype=np.uint8))
    assert not list(tmp_path.iterdir())
