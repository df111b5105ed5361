"""OpenVidHD CSV at its real size: read, filter and plan 433,000 rows, time and memory.

    python benchmarks/bench_csv.py [--rows 433000] [--keep DIR]

A synthetic CSV in OpenVidHD's layout is written once (captions of 40-160 words with commas, some with
newlines and doubled quotes, ~0.1% bad rows, ~1% duplicate captions, a few cp1252 bytes), then each
case runs in its own subprocess: `read_prompts` with the filters of `configs/datagen.yaml` (the same as
`datagen-wan1.3b.yaml`'s; loaded through OmegaConf as the job does) + `plan_shards` into shards of 64. Memory is the subprocess's peak RSS minus
its RSS before reading, next to the bytes of the captions it kept.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

HEADER = "video,caption,aesthetic score,motion score,temporal consistency score,camera motion,frame,fps,seconds\n"
WORDS = ("the a camera slowly pans across wide shot of an old wooden boat drifting on calm water while golden "
         "sunlight reflects off small waves and birds fly overhead in the distance close-up woman with long "
         "dark hair smiles walks through busy street market colorful stalls people bustling background "
         "cinematic lighting soft focus tracking shot mountain landscape snow covered peaks clouds moving "
         "quickly time-lapse city skyline night lights traffic flowing highway aerial view forest river").split()


def write_csv(path: Path, rows: int, seed: int = 0) -> int:
    rng = random.Random(seed)
    with open(path, "wb") as out:
        out.write(HEADER.encode())
        chunk: list[bytes] = []
        for i in range(1, rows + 1):
            words = rng.choices(WORDS, k=rng.randint(40, 160))
            caption = " ".join(words).replace(" while", ", while").replace(" in the", ", in the")
            if i % 97 == 0:
                caption = caption.replace(" and ", ' and "quoted" ', 1).replace('"', '""')
            if i % 211 == 0:
                caption += "\nsecond line of the caption"
            if i % 100 == 0 and i > 5:  # ~1% repeat an earlier caption
                caption = f"repeated caption number {i % 7}"
            raw = f'clip_{i:07d}.mp4,"{caption}",{rng.uniform(3.5, 6.5):.3f},{rng.uniform(0, 8):.3f},0.9,pan,81,16,5'
            data = raw.encode()
            if i % 5003 == 0:
                data = data.replace(b"boat", b"caf\xe9", 1)  # cp1252 byte
            if i % 1009 == 0:
                data = f"clip_{i:07d}.mp4,too few fields".encode()
            chunk.append(data)
            if len(chunk) == 10000:
                out.write(b"\n".join(chunk) + b"\n")
                chunk = []
        if chunk:
            out.write(b"\n".join(chunk) + b"\n")
    return path.stat().st_size


def rss_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def run_case(csv: str, overrides: list[str]) -> dict:
    """In the subprocess: load the config as gen_teacher does, read + filter + plan, report."""
    from data_pipeline.gen_teacher import plan_shards
    from data_pipeline.prompts import read_prompts
    from gd_train.config import load_config

    cfg = load_config(REPO_ROOT / "configs" / "datagen.yaml",
                      [f"prompts_csv={csv}", "datagen.samples_per_shard=64", *overrides])
    before = rss_kb()
    cpu0 = time.process_time()
    start = time.perf_counter()
    prompts, report = read_prompts(cfg.prompts_csv, cfg.datagen.filters)
    read_s = time.perf_counter() - start
    tasks = plan_shards(prompts, cfg.datagen.samples_per_shard)
    total_s = time.perf_counter() - start
    cpu_s = time.process_time() - cpu0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"rows": report.rows, "kept": report.kept, "bad": len(report.bad_rows),
            "filtered": sum(report.filtered.values()), "shards": len(tasks), "read_s": read_s, "total_s": total_s, "cpu_s": cpu_s,
            "peak_growth_mb": (peak - before) / 1024, "after_mb": (rss_kb() - before) / 1024,
            "caption_mb": sum(len(p.caption) for p in prompts) / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=433_000)
    parser.add_argument("--keep", type=Path, default=None, help="folder for the CSV (kept, reused if present)")
    parser.add_argument("--case", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case is not None:
        print(json.dumps(run_case(args.case[0], args.case[1:])))
        return

    folder = args.keep or Path(tempfile.mkdtemp(prefix="bench_csv_"))
    folder.mkdir(parents=True, exist_ok=True)
    csv = folder / f"openvid_like_{args.rows}.csv"
    if not csv.is_file():
        start = time.perf_counter()
        write_csv(csv, args.rows)
        print(f"wrote {csv} in {time.perf_counter() - start:.1f} s")
    size_mb = csv.stat().st_size / 2**20
    print(f"# bench_csv.py  {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC  {platform.node()}  "
          f"{os.cpu_count()} CPU(s)  load average {os.getloadavg()[0]:.2f}  CSV {args.rows:,} rows, {size_mb:.0f} MiB")
    print("\n| filters (on top of configs/datagen.yaml) | rows | kept | bad | filtered | shards | "
          "read + filter (s) | + plan (s) | CPU time (s) | rows/s | peak memory growth (MiB) | kept captions (MiB) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    cases = [("dedupe (the config's)", []),
             ("+ min_aesthetic_score=5.5", ["datagen.filters.min_aesthetic_score=5.5"]),
             ("+ max_prompts=10000", ["datagen.filters.max_prompts=10000"])]
    for name, overrides in cases:
        proc = subprocess.run([sys.executable, __file__, "--case", str(csv), *overrides], cwd=REPO_ROOT,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"case {name} failed:\n{proc.stderr[-3000:]}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"| {name} | {r['rows']:,} | {r['kept']:,} | {r['bad']:,} | {r['filtered']:,} | {r['shards']:,} | "
              f"{r['read_s']:.2f} | {r['total_s']:.2f} | {r['cpu_s']:.2f} | {r['rows'] / r['total_s']:,.0f} | {r['peak_growth_mb']:.0f} | "
              f"{r['caption_mb']:.0f} |", flush=True)
    if args.keep is None:
        csv.unlink()
        folder.rmdir()
    print(f"\nload average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
