"""Helpers of the training tests: real tiny shard folders, running `gd-train` as a user does (in its own
process group, so a test can signal or kill the whole run), and reading a run folder back."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from gd_train.config import latent_shape, load_config, transformer_arch
from gd_train.data.shards import SHARD_NAME, TeacherSample, encode_sample

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY_STAGE1 = "configs/tiny/stage1.yaml"
TINY_STAGE2 = "configs/tiny/stage2.yaml"
CLI = [sys.executable, "-m", "gd_train.cli"]


def write_tiny_shards(folder: Path, num_samples: int, samples_per_shard: int = 4, *, seed: int = 0,
                      nan_keys: Sequence[str] = (), config: str = TINY_STAGE1,
                      lengths: Sequence[int] = ()) -> list[str]:
    """Real WebDataset tars in the teacher-shard format, with latents of the tiny config's shape.

    The latents are smooth in time and space (a random field plus a slow drift), not white noise, so a
    model has something to learn; keys listed in `nan_keys` get NaN latents (bad data). `lengths`: the
    latent frames of shard i are lengths[i % len(lengths)] (one length per shard, as data_pipeline
    writes them; default: the config's video.num_frames)."""
    import webdataset as wds

    cfg = load_config(config)
    C, F_config, H, W = latent_shape(cfg)
    text_dim = transformer_arch(cfg)["text_dim"]
    gen = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    keys = []
    for shard in range((num_samples + samples_per_shard - 1) // samples_per_shard):
        F = lengths[shard % len(lengths)] if lengths else F_config
        with wds.TarWriter(str(folder / SHARD_NAME.format(index=shard))) as sink:
            for i in range(shard * samples_per_shard, min(num_samples, (shard + 1) * samples_per_shard)):
                key = f"sample-{i:05d}"
                base = torch.randn(C, 1, H // 2, W // 2, generator=gen)
                drift = torch.randn(C, 1, H // 2, W // 2, generator=gen) * 0.2
                frames = torch.cat([base + drift * f for f in range(F)], dim=1)
                latents = torch.nn.functional.interpolate(frames[None], size=(F, H, W), mode="trilinear")[0]
                if key in nan_keys:
                    latents = torch.full_like(latents, float("nan"))
                tokens = 3 + i % 7
                sample = TeacherSample(key=key, latents=latents.contiguous(),
                                       prompt_embeds=torch.randn(tokens, text_dim, generator=gen),
                                       meta={"caption": f"tiny prompt number {i}", "seed": i})
                sink.write(encode_sample(sample))
                keys.append(key)
    return keys


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def run_cli(*args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT, env=cli_env())
    if check and proc.returncode != 0:
        raise AssertionError(f"gd-train {' '.join(args)} failed ({proc.returncode}):\n"
                             f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def start_cli(*args: str, log: Path) -> subprocess.Popen:
    """`gd-train ARGS` in the background, in a new session (its own process group)."""
    fh = open(log, "w")
    return subprocess.Popen([*CLI, *args], stdout=fh, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=cli_env(),
                            start_new_session=True)


def wait_for(predicate, timeout: float, what: str, proc: Optional[subprocess.Popen] = None, log: Optional[Path] = None,
             poll_s: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"run ended ({proc.returncode}) before {what}:\n{log.read_text()[-5000:] if log else ''}")
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}:\n{log.read_text()[-5000:] if log else ''}")


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Signal the run's launcher process group (the workers die with their launcher: PR_SET_PDEATHSIG)."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def trace(run_dir: Path) -> dict[int, list[dict]]:
    out = {}
    for path in sorted((run_dir / "trace").glob("rank-*.jsonl")):
        out[int(path.stem.split("-")[1])] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return out


def latest(run_dir: Path) -> Optional[str]:
    path = run_dir / "checkpoints" / "latest"
    return path.read_text().strip() if path.is_file() else None
