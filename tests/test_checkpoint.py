"""Checkpoints of a ZeRO-3 run (parameters sharded over 2 ranks, activation checkpointing on, a sample
video at step 2): the exported adapters are the trained weights (not the empty shards ZeRO-3 holds),
load with plain `peft` on a plain `diffusers.WanTransformer3DModel` and reproduce the student's
full-mask outputs; the checkpoint CLI lists, shows and exports; a checkpoint folder is complete or
ignored. The per-parameter state resumes on another world size and ZeRO stage bit for bit (the real
trainer, 2 -> 1 -> 2 -> 1 ranks, ZeRO-3 -> 2 -> 2 -> 3), and no load path runs a pickle planted in
the checkpoint folder."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from train_utils import REPO_ROOT, TINY_STAGE1, TINY_STAGE2, cli_env, latest, run_cli, write_tiny_shards


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("zero3")
    write_tiny_shards(root / "shards", 16, samples_per_shard=4, seed=2)
    run_dir = root / "run"
    run_cli("stage1", "--config", TINY_STAGE1, "--nproc", "2", f"output_dir={run_dir}", f"data.shards={root / 'shards'}",
            "train.zero_stage=3", "train.zero3_param_persistence_threshold=0", "student.gradient_checkpointing=true",
            "train.max_steps=3", "train.checkpoint_every=2", "train.keep_last=1", "train.video_every=2")
    return run_dir


def test_zero3_run_keeps_only_the_last_complete_checkpoint(zero3_run):
    folders = sorted(p.name for p in (zero3_run / "checkpoints").iterdir() if p.is_dir())
    assert folders == ["step-00000003"] and latest(zero3_run) == "step-00000003"
    manifest = json.loads((zero3_run / "checkpoints" / "step-00000003" / "checkpoint.json").read_text())
    assert (manifest["zero_stage"], manifest["world_size"], manifest["reason"]) == (3, 2, "final")
    assert manifest["samples_seen"] == 12
    # A sample video streamed with the parameters sharded (gathered for it) reached TensorBoard.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(zero3_run / "tb"), size_guidance={"images": 0})
    acc.Reload()
    assert [e.step for e in acc.Images("samples/stream")] == [2]
    # The frozen base is not in the checkpoint: a few hundred kB of LoRA + optimizer state.
    assert sum(f.stat().st_size for f in (zero3_run / "checkpoints").rglob("*.pt")) < 5 * 2**20


def test_exported_adapters_load_with_plain_peft_and_reproduce_the_student(zero3_run, tmp_path):
    from diffusers import WanTransformer3DModel
    from peft import PeftModel

    from gd_train.config import load_config
    from gd_train.model.backbone import load_transformer
    from gd_train.model.student import GreedyDistillStudent

    out = tmp_path / "export"
    proc = run_cli("ckpt", "export", str(zero3_run), "--out", str(out))
    assert "exported step-00000003" in proc.stdout

    # The ZeRO-3 shards were gathered: every LoRA weight has its full shape and B is no longer zero.
    sdd = load_file(str(out / "sdd" / "adapter_model.safetensors"))
    assert sdd and all(v.numel() > 0 for v in sdd.values())
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in sdd.items())

    cfg = load_config(TINY_STAGE1)
    student = GreedyDistillStudent.from_config(cfg)
    student.load_adapters(out)
    plain = load_transformer(cfg)  # the tiny teacher: a plain WanTransformer3DModel, weights from model.init_seed
    assert type(plain) is WanTransformer3DModel
    model = PeftModel.from_pretrained(plain, str(out / "sdd"), adapter_name="sdd")
    model.load_adapter(str(out / "etm"), adapter_name="etm")

    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 16, 3, 8, 12, generator=gen)
    text = torch.randn(1, 9, 32, generator=gen)
    timestep = torch.tensor([620.0])
    for adapter in ("etm", "sdd"):
        model.set_adapter(adapter)
        with torch.no_grad():
            expected = model(hidden_states=latents, timestep=timestep, encoder_hidden_states=text).sample
            ours = student.runner(latents, timestep, [0, 1, 2], text, adapter=adapter).velocity
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad(), model.disable_adapter():  # and the trained adapter does change the output
        assert not torch.allclose(model(hidden_states=latents, timestep=timestep, encoder_hidden_states=text).sample,
                                  expected, atol=1e-4)

    # The c_f projection: plain safetensors into a plain LayerNorm + Linear.
    dim = student.dim
    proj = torch.nn.Sequential(torch.nn.LayerNorm(dim, elementwise_affine=False), torch.nn.Linear(dim, dim))
    proj.load_state_dict(load_file(str(out / "cf_proj.safetensors")))
    hidden = torch.randn(2, 24, dim, generator=gen)
    torch.testing.assert_close(proj(hidden), student.project_cond(hidden))
    assert proj[1].weight.abs().sum() > 0  # trained away from its zero initialisation


def test_ckpt_ls_and_show(zero3_run):
    listing = run_cli("ckpt", "ls", str(zero3_run)).stdout
    assert "* step-00000003" in listing and "final" in listing
    shown = run_cli("ckpt", "show", str(zero3_run)).stdout
    assert '"step": 3' in shown and "adapter sdd: rank 4" in shown and "trainer/rank-00001.json" in shown
    assert "with AdamW moments (step 3), written by 2 rank(s) under ZeRO-3; resumes on any world size" in shown


def test_checkpoint_folder_resolution_is_strict(zero3_run, tmp_path):
    from gd_train.checkpoint import CheckpointError, resolve

    assert resolve(zero3_run).name == "step-00000003"
    assert resolve(zero3_run / "checkpoints" / "step-00000003").name == "step-00000003"
    run = tmp_path / "run"
    (run / "checkpoints" / ".partial-step-00000005").mkdir(parents=True)
    (run / "config.yaml").write_text("seed: 0\n")
    with pytest.raises(CheckpointError, match="no complete checkpoint yet"):
        resolve(run)
    with pytest.raises(CheckpointError, match="half-written"):
        resolve(run / "checkpoints" / ".partial-step-00000005")
    (run / "checkpoints" / "step-00000004").mkdir()
    (run / "checkpoints" / "latest").write_text("step-00000004\n")
    with pytest.raises(CheckpointError, match=r"step-00000004 is incomplete \(no checkpoint.json .*no earlier complete"):
        resolve(run)
    proc = run_cli("ckpt", "export", str(run), check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "no checkpoint.json" in proc.stderr


def test_fp32_state_holds_each_trained_weight_once_and_no_deepspeed_pickles(zero3_run):
    """The checkpoint's own fp32 state replaces DeepSpeed's files and its zero_to_fp32.py: each weight
    the student has once, whole (gathered from the ZeRO-3 shards), equal to the PEFT export."""
    from gd_train.checkpoint import trainable_state

    root = zero3_run / "checkpoints"
    assert not list(root.rglob("*.pt")) and not (root / "zero_to_fp32.py").exists()
    tensors, meta = trainable_state(root / "step-00000003")
    adapters = root / "step-00000003" / "adapters"
    expected = {f"cf_proj.{k}": v for k, v in load_file(str(adapters / "cf_proj.safetensors")).items()}
    for name in ("etm", "sdd"):  # PEFT's file drops the adapter name from the key
        for key, value in load_file(str(adapters / name / "adapter_model.safetensors")).items():
            expected["peft." + key.replace(".weight", f".{name}.weight")] = value
    assert sorted(k.removeprefix("fp32/") for k in tensors if k.startswith("fp32/")) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(tensors[f"fp32/{key}"], value), key
    assert sorted(meta["params"]) == sorted(expected) and {p["step"] for p in meta["params"].values()} == {3}
    assert meta["engine"]["global_steps"] == 3 and meta["lr_scheduler"]["last_epoch"] == 3


# --------------------------------------------------------------------------------------------------
# Another world size / ZeRO stage, and no pickle
# --------------------------------------------------------------------------------------------------
PICKLED = ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
           "zero_pp_rank_1_mp_rank_00_optim_states.pt", "state/trainable.pt", "adapters/etm/adapter_model.bin",
           "adapters/sdd/adapter_model.bin"]


class _Payload:
    """Unpickling it runs code: writes the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('a pickle ran')",)


@pytest.fixture(scope="module")
def planted(zero3_run, tmp_path_factory) -> tuple[Path, Path]:
    """A copy of the ZeRO-3 run whose checkpoint folder also holds pickles that run code when loaded,
    under the names DeepSpeed's loader (with `checkpoints/latest`) and PEFT's .bin fallback read."""
    run = tmp_path_factory.mktemp("planted") / "run"
    shutil.copytree(zero3_run, run)
    marker = run.parent / "PICKLE-RAN"
    folder = run / "checkpoints" / "step-00000003"
    for name in PICKLED:
        torch.save({"module": _Payload(marker)}, folder / name)
    return run, marker


def _reload(source: Path, out: Path, nproc: int, *overrides: str) -> None:
    """tests/reload_worker.py on `nproc` local ranks through the project's launcher (launch.local)."""
    code = ("import sys; from launch.local import run_node; from launch.rendezvous import local_node; "
            f"sys.exit(run_node(local_node({nproc}), ['tests/reload_worker.py', {str(source)!r}, {str(out)!r}, "
            f"*{list(overrides)!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO_ROOT,
                          env=cli_env())
    assert proc.returncode == 0, proc.stderr[-5000:]


def test_state_reloads_exactly_on_other_world_sizes_and_zero_stages(planted, tmp_path):
    """The real trainer resumes the 2-rank ZeRO-3 checkpoint (with the planted pickles beside it) on 1
    rank under ZeRO-2, that on 2 ranks (ZeRO-2), that on 1 rank under ZeRO-3; each saves what it
    loaded. Every parameter's fp32 weight, exp_avg and exp_avg_sq, every step count, the optimizer's
    groups, the lr schedule and DeepSpeed's counters come back exactly."""
    from gd_train.checkpoint import _config_seed, _unb64, derived_seed, resolve, seed_rng, trainable_state

    run, marker = planted
    saved, meta = trainable_state(resolve(run))
    assert (meta["world_size"], meta["zero_stage"]) == (2, 3)
    moments = [k for k in saved if k.startswith("exp_avg")]
    assert len(moments) == 2 * len([p for p in meta["params"].values() if p["step"] is not None]) > 0
    assert all(saved[k].abs().sum() > 0 for k in moments if k.startswith("exp_avg_sq/"))
    source = run
    for i, (nproc, stage) in enumerate([(1, 2), (2, 2), (1, 3)]):
        out = tmp_path / f"reload-{i}"
        _reload(source, out, nproc, f"train.zero_stage={stage}")
        folder = resolve(out)
        got, got_meta = trainable_state(folder)
        assert (got_meta["world_size"], got_meta["zero_stage"]) == (nproc, stage)
        assert sorted(got) == sorted(saved)
        different = [k for k, v in saved.items() if not torch.equal(got[k], v)]
        assert not different, f"reload {i} ({nproc} rank(s), ZeRO-{stage}): {different[:3]}"
        for part in ("params", "param_groups", "lr_scheduler", "engine"):
            assert got_meta[part] == meta[part], part
        # The weights the modules compute with were set too: the export is read from them.
        exported = resolve(run) / "adapters"
        for path in sorted(exported.rglob("*.safetensors")):
            want, have = load_file(str(path)), load_file(str(folder / "adapters" / path.relative_to(exported)))
            assert sorted(want) == sorted(have) and all(torch.equal(want[k], have[k]) for k in want), path
        # Another world size: RNG states seeded from (seed, step, rank), not taken from a saved rank.
        seed_rng(derived_seed(_config_seed(folder), 3, 0))
        rng = json.loads((folder / "trainer" / "rank-00000.json").read_text())["rng"]
        assert torch.equal(_unb64(rng["torch"]), torch.get_rng_state())
        source = out
    assert not marker.exists()


def test_no_load_path_runs_a_planted_pickle(planted, tmp_path, capsys):
    from gd_train.checkpoint import adapters_folder
    from gd_train.cli import main
    from gd_train.config import load_config
    from gd_train.model.student import GreedyDistillStudent

    run, marker = planted
    folder = run / "checkpoints" / "step-00000003"
    # The payload is live: DeepSpeed's way of loading (torch.load, weights_only=False) runs it.
    torch.load(folder / PICKLED[0], weights_only=False)
    assert marker.read_text() == "a pickle ran"
    marker.unlink()

    assert main(["ckpt", "show", str(run)]) == 0 and "mp_rank_00_model_states.pt" in capsys.readouterr().out
    assert main(["ckpt", "export", str(run), "--out", str(tmp_path / "export")]) == 0
    assert main(["resume", str(run), "--nproc", "1", "--dry-run"]) == 0  # another world size: accepted
    assert main(["stage2", "--config", TINY_STAGE2, "--dry-run", f"output_dir={tmp_path / 's2'}",
                 f"train.init_from={run}"]) == 0
    student = GreedyDistillStudent.from_config(load_config(TINY_STAGE1))
    student.load_adapters(adapters_folder(run))
    assert not marker.exists()

    # A checkpoint of the old format (optimizer state only in DeepSpeed's pickles) is refused in one
    # line; its adapters (safetensors) still start a new run.
    old = tmp_path / "v1"
    shutil.copytree(run, old)
    manifest = old / "checkpoints" / "step-00000003" / "checkpoint.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "format": "gd-train/checkpoint/v1"}))
    capsys.readouterr()
    assert main(["resume", str(old), "--nproc", "2", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "no longer loads" in err and "train.init_from=" in err
    assert main(["ckpt", "show", str(old)]) == 0 and "(gd-train/checkpoint/v1): not resumable" in capsys.readouterr().out
    student.load_adapters(adapters_folder(old))
    assert not marker.exists()
