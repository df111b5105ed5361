"""docs/data.md's shard format, checked against real shards: the tiny teacher writes them as a Ray worker
does (`TeacherWorker.generate_shard`, the job's own writer), and the document's plain-WebDataset reader
runs exactly as printed there, in a fresh interpreter with nothing of gd-train imported."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from datagen_utils import REPO_ROOT, write_prompts_csv
from gd_train.config import latent_shape, load_config, transformer_arch
from gd_train.data.shards import decode_sample
from gd_train.model.backbone import pad_prompt_embeds

sys.path.insert(0, str(REPO_ROOT))
from data_pipeline.gen_teacher import as_container, plan_shards  # noqa: E402
from data_pipeline.prompts import read_prompts  # noqa: E402
from data_pipeline.teacher import TeacherWorker  # noqa: E402

DOC = REPO_ROOT / "docs" / "data.md"
SAMPLES, PER_SHARD = 3, 2  # two shards; the doc's batch of 4 crosses the shard boundary, partial


def doc_reader() -> str:
    text = DOC.read_text()
    section = text[text.index("## The shard format (for a loader of your own)"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("doc_reader")
    csv = root / "prompts.csv"
    write_prompts_csv(csv)
    cfg = load_config("configs/datagen.yaml", [f"prompts_csv={csv}", "datagen.storage_dtype=bfloat16",
                                               f"datagen.filters.max_prompts={SAMPLES}"])
    out = root / "teacher_shards"
    out.mkdir()
    worker = TeacherWorker(as_container(cfg), str(out))
    for task in plan_shards(read_prompts(csv, cfg.datagen.filters)[0], PER_SHARD):
        worker.generate_shard(task, attempt=1)
    (out / "shard-000002.tar.attempt1-host-1.partial").write_bytes(b"half a shard")  # must be ignored
    return root, cfg


def test_the_documented_members_and_tensors_are_what_a_shard_holds(shards):
    root, cfg = shards
    C, F, H, W = latent_shape(cfg)
    text_dim = transformer_arch(cfg)["text_dim"]
    with tarfile.open(root / "teacher_shards" / "shard-000000.tar") as tar:
        names = tar.getnames()
        key = names[0].split(".")[0]
        assert names[:2] == [f"{key}.json", f"{key}.safetensors"] or names[:2] == [f"{key}.safetensors", f"{key}.json"]
        assert {n.split(".", 1)[1] for n in names} == {"json", "safetensors"}
        meta = json.loads(tar.extractfile(f"{key}.json").read())
        from safetensors.torch import load

        tensors = load(tar.extractfile(f"{key}.safetensors").read())
    assert set(meta) == {"key", "caption", "seed", "source_row", "source_line", "video", "num_frames", "latent_frames",
                         "settings"}
    assert (meta["num_frames"], meta["latent_frames"]) == (cfg.video.num_frames, F)
    assert set(tensors) == {"latents", "prompt_embeds"}
    assert tensors["latents"].shape == (C, F, H, W) == (16, (cfg.video.num_frames - 1) // 4 + 1,
                                                       cfg.video.height // 8, cfg.video.width // 8)
    tokens, dim = tensors["prompt_embeds"].shape
    assert dim == text_dim and 0 < tokens < cfg.model.max_text_tokens  # unpadded
    assert tensors["latents"].dtype == tensors["prompt_embeds"].dtype == torch.bfloat16


def test_the_documented_reader_runs_as_written(shards):
    root, cfg = shards
    code = doc_reader()
    # As a user runs it: its own interpreter, in the folder that holds teacher_shards/.
    run = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.strip().splitlines()
    C, F, H, W = latent_shape(cfg)
    D = transformer_arch(cfg)["text_dim"]
    assert [line.split(") ")[0] + ")" for line in lines] == [f"({b}, {C}, {F}, {H}, {W})" for b in (3,)]
    assert all(f"({b}, {cfg.model.max_text_tokens}, {D}) torch.bfloat16" in line for b, line in zip((3,), lines))

    # Its batches are what the project's decoder and padding make of the same samples.
    namespace: dict = {}
    import os

    cwd = os.getcwd()
    os.chdir(root)
    try:
        exec(compile(code, str(DOC), "exec"), namespace)
        batches = list(namespace["loader"])
    finally:
        os.chdir(cwd)
    import webdataset as wds

    raw = wds.tarfile_samples([{"url": str(p)} for p in sorted((root / "teacher_shards").glob("shard-*.tar"))])
    samples = [decode_sample(r) for r in raw]
    assert len(samples) == SAMPLES
    latents = torch.cat([b[0] for b in batches])
    embeds = torch.cat([b[1] for b in batches])
    assert torch.equal(latents, torch.stack([s.latents for s in samples]))
    assert torch.equal(embeds, pad_prompt_embeds([s.prompt_embeds for s in samples], cfg.model.max_text_tokens))
    assert [c for b in batches for c in b[2]] == [s.caption for s in samples]
