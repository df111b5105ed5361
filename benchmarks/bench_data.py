"""Data-pipeline benchmark: teacher-job throughput with 1 vs 2 Ray actors, the shard reader's decode
throughput vs what a training step consumes, and the shard bytes per sample at the real 1.3B config.

    python benchmarks/bench_data.py [--prompts 48] [--real-samples 24] [--keep DIR]
    python benchmarks/bench_data.py --integrity-only [--real-samples 24]   # only the verification cost

Everything runs for real: gen_teacher.py as a subprocess that starts its own local Ray, the reader
with DataLoader worker processes, a tiny stage-1 forward+backward, `write_shard` on full-size tensors.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from gd_train.config import load_config  # noqa: E402
from gd_train.data.reader import ShardReader  # noqa: E402
from gd_train.data.shards import SHARD_NAME, Manifest, TeacherSample, write_shard  # noqa: E402

REAL_LATENTS = (16, 21, 60, 104)  # 81 frames at 480x832 (DESIGN §1)
REAL_TEXT = (512, 4096)  # UMT5-XXL, max tokens


def write_csv(path: Path, count: int) -> None:
    header = "video,caption,aesthetic score,motion score,temporal consistency score,camera motion,frame,fps,seconds\n"
    rows = [f'bench_{i:05d}.mp4,"clip {i}: a red fox running through fresh snow, cinematic light",5.5,3.0,0.9,static,81,16,5'
            for i in range(count)]
    path.write_text(header + "\n".join(rows) + "\n")


def run_job(csv: Path, out: Path, workers: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "disabled"
    cmd = [sys.executable, "data_pipeline/gen_teacher.py", "--config", "configs/datagen.yaml", f"prompts_csv={csv}",
           f"output_dir={out}", f"datagen.num_workers={workers}", "datagen.samples_per_shard=4"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, start_new_session=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"gen_teacher failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    report = json.loads((out / "gen_teacher_report.json").read_text())
    return {"workers": workers, "samples": report["samples_in_finished_shards"], "wall_s": wall,
            "steady_samples_per_s": report["samples_per_s"]}


def reader_throughput(shards: str, *, micro_batch_size: int, num_workers: int, max_text_tokens: int,
                      epochs: int = 3) -> tuple[float, float, int]:
    """(median, best) samples/s over `epochs` full epochs, and the samples per epoch. On a shared
    machine the best epoch is the closest to what the code itself costs."""
    reader = ShardReader(shards, rank=0, world_size=1, micro_batch_size=micro_batch_size, num_workers=num_workers,
                         seed=0, max_text_tokens=max_text_tokens, shuffle_buffer=micro_batch_size * 4)
    rates = []
    for epoch in range(epochs):
        samples, start = 0, time.perf_counter()
        for batch in reader.epoch(epoch):
            samples += batch.latents.shape[0]
        rates.append(samples / (time.perf_counter() - start))
    return statistics.median(rates), max(rates), samples


def training_consumption(cfg, micro_batch_size: int, steps: int = 10) -> tuple[float, float]:
    """(median, best) samples/s a tiny stage-1 step (teacher-forced ETM + SDD pass, forward +
    backward, AdamW) consumes."""
    from gd_train.flow import add_noise, velocity_target
    from gd_train.model.student import GreedyDistillStudent

    torch.manual_seed(0)
    student = GreedyDistillStudent.from_config(cfg)
    optimizer = torch.optim.AdamW(student.trainable_parameters(), lr=1e-5)
    C, F, H, W = 16, 6, 8, 12
    clip = torch.randn(micro_batch_size, C, F, H, W)
    embeds = torch.randn(micro_batch_size, cfg.model.max_text_tokens, cfg.model.transformer.text_dim)
    times = []
    for step in range(steps + 1):
        start = time.perf_counter()
        noise = torch.randn_like(clip)
        sigmas = torch.rand(micro_batch_size, F)
        noisy = add_noise(clip, noise, sigmas[:, None, :, None, None])
        out = student.parallel_forward(clip, noisy, sigmas, embeds)
        loss = torch.nn.functional.mse_loss(out.velocity, velocity_target(clip, noise)[:, :, out.first_noisy:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:  # the first step warms up
            times.append(time.perf_counter() - start)
    return micro_batch_size / statistics.median(times), micro_batch_size / min(times)


def real_size_shard(folder: Path, samples: int, tokens: int, dtype: torch.dtype) -> tuple[int, str]:
    """A shard of full-size samples (random values: no compression applies anyway) -> bytes per sample."""
    gen = torch.Generator().manual_seed(0)
    items = [TeacherSample(key=f"real_{i:04d}", latents=torch.randn(REAL_LATENTS, generator=gen).to(dtype),
                           prompt_embeds=torch.randn(tokens, REAL_TEXT[1], generator=gen).to(dtype),
                           meta={"caption": "x" * 200, "seed": i, "settings": {"num_inference_steps": 50}})
             for i in range(samples)]
    name = SHARD_NAME.format(index=0)
    record = write_shard(folder / name, items, attempt_tag="bench")
    Manifest(settings={"latent_shape": list(REAL_LATENTS)}, total_shards=1, shards={name: record}).save(folder)
    return record.bytes // samples, str(folder)


def integrity_cost(shard_folder: str, root: Path, epochs: int = 3) -> list[tuple[str, float, float, int]]:
    """The reader on the same full-size shard three ways: per-sample digests (what write_shard records
    now), the whole file's sha256 only (older manifests), no manifest (nothing to verify against)."""
    name = SHARD_NAME.format(index=0)
    manifest = Manifest.load(shard_folder)
    rows = []
    for label, keep in (("no manifest: no verification", None), ("whole-file sha256 (older manifests)", "file"),
                        ("per-sample digests (default)", "sample")):
        folder = root / f"integrity_{keep}"
        folder.mkdir(exist_ok=True)
        if not (folder / name).exists():
            os.link(Path(shard_folder) / name, folder / name)  # same bytes, same page cache
        if keep is not None:
            record = manifest.shards[name]
            if keep == "file":
                record = type(record)(record.samples, record.bytes, record.sha256, record.keys_sha256)
            Manifest(settings=manifest.settings, total_shards=1, shards={name: record}).save(folder)
        median, best, samples = reader_throughput(str(folder), micro_batch_size=1, num_workers=2,
                                                  max_text_tokens=512, epochs=epochs)
        rows.append((label, median, best, samples))
    return rows


def print_integrity(rows: list[tuple[str, float, float, int]], mb: float) -> None:
    base = rows[0][2]
    print(f"\n## Integrity check cost: reader on full-size 480p bf16 samples ({mb:.2f} MB each, page-cached, "
          f"2 DataLoader workers, micro-batch 1, {rows[0][3]} samples; median / best of 3 epochs)")
    print("| verification | samples/s median | samples/s best | best vs none |")
    print("|---|---|---|---|")
    for label, median, best, _ in rows:
        print(f"| {label} | {median:.1f} ({median * mb:.0f} MB/s) | {best:.1f} ({best * mb:.0f} MB/s) | "
              f"{best / base:.2f} |")
    payload = os.urandom(int(mb * 1e6))
    times = []
    for _ in range(10):
        start = time.perf_counter()
        hashlib.sha256(payload).digest()
        times.append(time.perf_counter() - start)
    print(f"\nsha256 of one sample's bytes on one core: best {min(times) * 1e3:.1f} ms ({mb / min(times):.0f} MB/s), "
          f"median {statistics.median(times) * 1e3:.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=160)
    parser.add_argument("--real-samples", type=int, default=24)
    parser.add_argument("--keep", type=Path, default=None, help="keep the shards here instead of a temp dir")
    parser.add_argument("--integrity-only", action="store_true", help="only the verification-cost table")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="bench_data_"))
    root.mkdir(parents=True, exist_ok=True)
    print(f"# bench_data.py  {time.strftime('%Y-%m-%d %H:%M')}  {platform.node()}  {os.cpu_count()} CPU(s)  "
          f"torch {torch.__version__}  load average at start {os.getloadavg()[0]:.2f}", flush=True)
    if args.integrity_only:
        folder = root / "real_bfloat16_512"
        folder.mkdir(exist_ok=True)
        per_sample, shards = real_size_shard(folder, args.real_samples, REAL_TEXT[0], torch.bfloat16)
        print_integrity(integrity_cost(shards, root), per_sample / 1e6)
        print(f"\nload average at end: {os.getloadavg()[0]:.2f} (other work on the machine skews every figure)")
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
        return

    csv = root / "prompts.csv"
    write_csv(csv, args.prompts)
    jobs = [run_job(csv, root / f"job_{n}actors", n) for n in (1, 2)]
    print("\n## Teacher job (tiny teacher, 4 steps, CFG 5.0, 64x96x21 video, local Ray started by the job)")
    print("| actors | samples | wall incl. Ray start + model load (s) | steady samples/s (after first actor ready) |")
    print("|---|---|---|---|")
    for job in jobs:
        print(f"| {job['workers']} | {job['samples']} | {job['wall_s']:.1f} | {job['steady_samples_per_s']:.2f} |")

    tiny_cfg = load_config("configs/datagen.yaml")
    B = 2
    tiny_reader = reader_throughput(str(root / "job_2actors"), micro_batch_size=B, num_workers=2,
                                    max_text_tokens=tiny_cfg.model.max_text_tokens)
    consumption = training_consumption(tiny_cfg, B)

    real_rows = []
    # 120 tokens: an illustrative unpadded OpenVidHD caption (shards store embeddings unpadded).
    for dtype, tokens in ((torch.bfloat16, REAL_TEXT[0]), (torch.float32, REAL_TEXT[0]), (torch.bfloat16, 120)):
        folder = root / f"real_{str(dtype).split('.')[-1]}_{tokens}"
        folder.mkdir(exist_ok=True)
        count = args.real_samples if (dtype, tokens) == (torch.bfloat16, REAL_TEXT[0]) else 2
        per_sample, shards = real_size_shard(folder, count, tokens, dtype)
        real_rows.append((dtype, tokens, per_sample, shards))
    real_reader = reader_throughput(real_rows[0][3], micro_batch_size=1, num_workers=2, max_text_tokens=512)
    real_mb = real_rows[0][2] / 1e6

    print("\n## Reader vs training step (2 DataLoader workers; median / best of 3 epochs or 10 steps)")
    print("| what | samples/s median | samples/s best |")
    print("|---|---|---|")
    print(f"| reader, tiny shards (micro-batch {B}, {tiny_reader[2]} samples per epoch) | {tiny_reader[0]:.0f} | "
          f"{tiny_reader[1]:.0f} |")
    print(f"| tiny stage-1 step consumes (micro-batch {B}: parallel_forward fwd+bwd + AdamW, CPU fp32) | "
          f"{consumption[0]:.1f} | {consumption[1]:.1f} |")
    print(f"| reader, full-size 480p bf16 samples, 512 tokens (micro-batch 1, {real_reader[2]} samples, "
          f"{real_mb:.2f} MB each, page-cached) | {real_reader[0]:.1f} ({real_reader[0] * real_mb:.0f} MB/s) | "
          f"{real_reader[1]:.1f} ({real_reader[1] * real_mb:.0f} MB/s) |")

    print_integrity(integrity_cost(real_rows[0][3], root), real_mb)

    print("\n## Shard bytes per sample at the real 1.3B config (latents 16x21x60x104; embeddings tokens x 4096)")
    print("| stored dtype | prompt tokens | bytes/sample (tar, incl. headers + json) | MiB | raw tensor bytes |")
    print("|---|---|---|---|---|")
    for dtype, tokens, per_sample, _ in real_rows:
        raw = (torch.Size(REAL_LATENTS).numel() + tokens * REAL_TEXT[1]) * torch.tensor([], dtype=dtype).element_size()
        print(f"| {str(dtype).split('.')[-1]} | {tokens} | {per_sample:,} | {per_sample / 2**20:.2f} | {raw:,} |")
    print(f"\nload average at end: {os.getloadavg()[0]:.2f} (other work on the machine skews every figure)")
    if args.keep is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
