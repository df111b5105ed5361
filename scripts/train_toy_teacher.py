"""Train (or reuse) the toy teacher and report its own sample scores — the bar the student is held to.

    .venv/bin/python scripts/train_toy_teacher.py [--cache .cache] [--steps 3000] [--score 32] [--probe] [--force]

The folder is cached under `<cache>/toy-teacher/<digest>/` where the digest covers the budget, the
architecture and the world's constants: the same command again reuses it. Prints the folder path on
the last line. Scoring samples the folder through the data job's own teacher worker
(`data_pipeline.teacher.TeacherWorker`: WanPipeline, UniPC, Wan's negative prompt, CFG).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from gd_train.eval import toy_teacher, world  # noqa: E402

SCORE_FILE = "teacher_scores.json"


def teacher_folder(cache: Path, budget: toy_teacher.TeacherBudget) -> Path:
    ident = {"budget": asdict(budget), "arch": toy_teacher.ARCH, "world": [world.BLOB_SIGMA, world.AMPLITUDE,
             world.MARGIN, world.KINDS, world.DIRECTIONS, world.SPEEDS, world.HEIGHT, world.WIDTH]}
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return cache / "toy-teacher" / digest


def ensure_teacher(cache: Path, budget: toy_teacher.TeacherBudget, force: bool = False, probe_every: int = 0) -> Path:
    folder = teacher_folder(cache, budget)
    if (folder / toy_teacher.REPORT_FILE).is_file() and not force:
        print(f"toy teacher: reusing {folder}", flush=True)
        return folder
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    toy_teacher.train_toy_teacher(tmp, budget, every=bool(probe_every) or None, every_steps=probe_every or 500)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def score_teacher(folder: Path, count: int, steps: int, guidance: float, frames: int = 8) -> dict:
    """Sample `count` prompts (balanced classes) with the datagen worker and score them."""
    import numpy as np

    from data_pipeline.prompts import Prompt
    from data_pipeline.teacher import TeacherWorker
    from gd_train.config import as_container
    from gd_train.eval import metrics

    cfg = toy_teacher.toy_config([f"pretrained_path={folder}", f"datagen.num_inference_steps={steps}",
                                  f"datagen.guidance_scale={guidance}", f"video.num_frames={1 + 4 * (frames - 1)}",
                                  "seed=12345"])
    worker = TeacherWorker(as_container(cfg), str(folder))
    specs = world.sample_specs(count, np.random.default_rng(7))
    prompts = [Prompt(key=f"bar-{i:04d}", caption=s.prompt, row=i + 1, line=i + 2, video="") for i, s in enumerate(specs)]
    rows = []
    for p, spec in zip(prompts, specs):
        sample = worker.sample([p])[0]
        rows.append(metrics.score_clip(sample.latents, spec).scalars())
    return metrics.summarise(rows)


def print_sensitivity(probe: dict) -> None:
    print(f"velocity MSE with the true prompt, and its increase when one word is swapped ({probe['clips']} clips)")
    print("  sigma | teacher: true   +kind  +direction  +speed | Bayes-optimal: true   +kind  +direction  +speed"
          " | Bayes, motion words ignored")
    for sigma in probe["sigmas"]:
        t, b = probe["teacher"][sigma], probe["bayes"][sigma]
        print(f"  {sigma:5.2f} | {t['true']:13.4f} {t['kind']:+7.4f} {t['direction']:+11.4f} {t['speed']:+7.4f} "
              f"| {b['true']:19.4f} {b['kind']:+7.4f} {b['direction']:+11.4f} {b['speed']:+7.4f} "
              f"| {probe['bayes_kind_only'][sigma]:27.4f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache", default=str(REPO_ROOT / ".cache"))
    p.add_argument("--steps", type=int, default=toy_teacher.TeacherBudget.steps)
    p.add_argument("--score", type=int, default=32, help="samples to score (0: none)")
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--lr", type=float, default=toy_teacher.TeacherBudget.lr)
    p.add_argument("--high-sigma-fraction", type=float, default=toy_teacher.TeacherBudget.high_sigma_fraction,
                   help=f"share of each batch trained at sigma in [{toy_teacher.HIGH_SIGMA}, 1)")
    p.add_argument("--probe-every", type=int, default=0,
                   help="print the direction probe (toy_teacher.direction_probe) every N training steps")
    p.add_argument("--force", action="store_true")
    p.add_argument("--probe", action="store_true",
                   help="print how much each prompt word (kind, direction, speed) changes the teacher's prediction, "
                        "next to the world's Bayes-optimal denoiser (toy_teacher.prompt_sensitivity)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: torch's default; 1 is much faster on a machine shared with other jobs)")
    args = p.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    budget = toy_teacher.TeacherBudget(steps=args.steps, lr=args.lr, high_sigma_fraction=args.high_sigma_fraction)
    folder = ensure_teacher(Path(args.cache), budget, args.force, args.probe_every)
    if args.probe:
        print_sensitivity(toy_teacher.prompt_sensitivity(folder))
    if args.score:
        scores = score_teacher(folder, args.score, args.sample_steps, args.guidance)
        (folder / SCORE_FILE).write_text(json.dumps({"samples": args.score, "sample_steps": args.sample_steps,
                                                     "guidance": args.guidance, "scores": scores}, indent=2))
        for k, v in scores.items():
            print(f"  {k:22s} {v['mean']:.3f} ± {v['std']:.3f}")
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
