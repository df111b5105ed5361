"""The reference experiment (docs/experiment.md): the paper's Table 3 at toy scale, on a teacher that
knows something, through the real pipeline — one command:

    make reproduce          # = .venv/bin/python benchmarks/reproduce_ablation.py --out runs/reproduce

    toy teacher (scripts/train_toy_teacher.py, cached) -> world prompts (CSV)
      -> local Ray head + `ray job submit` data_pipeline/gen_teacher.py (the toy teacher's sampler, CFG)
         : training shards, held-out shards (full steps) and held-out shards at 4 steps
      -> per seed: stage 1 (ETM), stage 1 without ETM (student.etm_window=0), stage 2 from stage 1, and
         stage 2 with a separate critic (train.rl_fake_score=critic) (gd-train on 2 CPU ranks)
         -> `gd-train ckpt export`
      -> streaming generation (gd_train.pipeline, what gd-generate runs) on the held-out prompts with the
         teacher's seeds, at the training length and 4x / 16x longer -> world metrics
      -> <out>/table.md, <out>/position_error.png, <out>/results.json

Budgets (steps, lr) are those of configs/toy/*.yaml, chosen once before any comparison was looked at.
A step that finished is recorded in <out>/.done/ and reused by a rerun. `--reduced` is a smaller run
(fewer prompts and seeds, same budgets), labelled as such in its outputs.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "scripts"))

ROWS = [  # (name, how it is made)
    ("teacher (20 steps)", "teacher"),
    ("teacher (4 steps)", "teacher4"),
    ("student before training", "untrained"),
    ("stage 1 without ETM", "stage1_noetm"),
    ("stage 1", "stage1"),
    ("stage 1 + stage 2 (SDD as fake score)", "stage2"),
    ("stage 1 + stage 2 (separate critic)", "stage2_critic"),
    # Diagnostic rows (not in the paper's table): stage 1 on ground-truth world clips instead of teacher
    # samples, same budgets, same base and held-out prompts — whether the ETM helps when the data's motion
    # is exact, apart from how well the toy teacher follows its prompts.
    ("stage 1 on world clips", "world_stage1"),
    ("stage 1 on world clips without ETM", "world_stage1_noetm"),
]
NO_ETM_ROWS = ("stage1_noetm", "world_stage1_noetm")
TRAIN_FRAMES = 8  # the teacher's training length: the first frames whose motion a stream must continue


def motion_scores(positions, length: int) -> dict:
    """The clip's own motion (metrics.motion_continuation): fitted on the first TRAIN_FRAMES frames,
    continued to `length` (no continuation error at the training length itself)."""
    from gd_train.eval import metrics

    out = metrics.motion_continuation(positions[:length], TRAIN_FRAMES)
    if length <= TRAIN_FRAMES:
        del out["continuation_error"]
    return out


def teacher_forced(forcing, student, sample, spec, text, seed: int) -> dict:
    """Teacher-forced next frame on a held-out teacher clip (WorldMetrics.next_frame_error): against the
    prompt's motion, and against the clip's own measured next frame (what the student should reproduce,
    whatever the prompt said)."""
    from gd_train.eval import metrics

    own = metrics.fit_frames(sample.latents, spec.kind).positions
    return {"forced_error_prompt": forcing.next_frame_error(student, sample, spec, text, seed),
            "forced_error_own": forcing.next_frame_error(student, sample, spec, text, seed, truth=own)}


def _mean(rows: list[dict]) -> dict:
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def run(command: list[str]) -> None:
    print("$ " + " ".join(shlex.quote(c) for c in command), flush=True)
    if subprocess.run(command, cwd=REPO_ROOT).returncode != 0:
        raise SystemExit(f"reproduce: step failed: {' '.join(command[:5])} ...")


class Experiment:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.out).resolve()
        self.done = self.out / ".done"
        self.done.mkdir(parents=True, exist_ok=True)

    def step(self, name: str, action) -> None:
        marker = self.done / (name.replace(" ", "_").replace("/", "_") + ".json")
        if marker.is_file():
            print(f"[{name}] done earlier, reused", flush=True)
            return
        say(name)
        t0 = time.monotonic()
        action()
        marker.write_text(json.dumps({"seconds": round(time.monotonic() - t0, 1)}))

    # -- data ---------------------------------------------------------------------------------------
    def teacher(self) -> Path:
        from train_toy_teacher import ensure_teacher

        from gd_train.eval.toy_teacher import TeacherBudget

        return ensure_teacher(Path(self.args.cache), TeacherBudget(**({"steps": self.args.teacher_steps}
                                                                       if self.args.teacher_steps else {})))

    def data(self, teacher: Path) -> None:
        from gd_train.eval.world_shards import write_prompts_csv
        from launch.ray_head import LocalRayHead, free_ports, ray_env

        write_prompts_csv(self.out / "prompts" / "train.csv", self.args.train_prompts, seed=100, key_prefix="t")
        write_prompts_csv(self.out / "prompts" / "heldout.csv", self.args.heldout, seed=200, key_prefix="h")
        head = LocalRayHead(num_cpus=2, dashboard_port=free_ports(1)[0])
        head.start()
        try:
            for csv, folder, extra in (("train", "shards", []), ("heldout", "heldout", []),
                                       ("heldout", "heldout-4step", ["datagen.num_inference_steps=4"])):
                run_env = ray_env()
                command = head.submit_command(["python", "data_pipeline/gen_teacher.py", "--config",
                                               "configs/toy/datagen.yaml", f"pretrained_path={teacher}",
                                               f"prompts_csv={self.out / 'prompts' / (csv + '.csv')}",
                                               f"output_dir={self.out / 'data' / folder}", *extra,
                                               *self.args.datagen_overrides])
                print("$ " + " ".join(shlex.quote(c) for c in command), flush=True)
                if subprocess.run(command, cwd=REPO_ROOT, env=run_env).returncode != 0:
                    raise SystemExit("reproduce: the data job failed")
        finally:
            head.stop()

    def world_data(self, teacher: Path) -> None:
        """Ground-truth clips of the same prompts as the teacher data (seeds 100/200 as the CSVs)."""
        from gd_train.config import CONFIG_DIR, load_config
        from gd_train.eval.world_shards import write_world_shards

        cfg = load_config(CONFIG_DIR / "toy" / "stage1.yaml", [f"pretrained_path={teacher}"])
        write_world_shards(self.out / "data" / "world-shards", cfg, self.args.train_prompts, TRAIN_FRAMES, seed=100,
                           key_prefix="wt", samples_per_shard=16)
        write_world_shards(self.out / "data" / "world-heldout", cfg, self.args.heldout, TRAIN_FRAMES, seed=200,
                           key_prefix="wh", samples_per_shard=16)

    # -- training -----------------------------------------------------------------------------------
    def train(self, teacher: Path, seed: int, row: str) -> None:
        run_dir = self.out / f"seed{seed}" / row
        prefix = "world-" if row.startswith("world_") else ""
        common = [f"pretrained_path={teacher}", f"seed={seed}", f"output_dir={run_dir}",
                  f"data.shards={self.out / 'data' / (prefix + 'shards')}",
                  f"data.eval_shards={self.out / 'data' / (prefix + 'heldout')}", *self.args.train_overrides]
        if row in ("stage1", "stage1_noetm", "world_stage1", "world_stage1_noetm"):
            extra = ["student.etm_window=0"] if row in NO_ETM_ROWS else []
            run([sys.executable, "-m", "gd_train.cli", "stage1", "--config", "configs/toy/stage1.yaml", "--nproc", "2",
                 *common, *extra])
        else:
            extra = ["train.rl_fake_score=critic"] if row == "stage2_critic" else []  # same budgets otherwise
            run([sys.executable, "-m", "gd_train.cli", "stage2", "--config", "configs/toy/stage2.yaml", "--nproc", "2",
                 *common, f"train.init_from={self.out / f'seed{seed}' / 'stage1'}", *extra])
        run([sys.executable, "-m", "gd_train.cli", "ckpt", "export", str(run_dir), "--out", str(run_dir / "adapters")])

    # -- scoring ------------------------------------------------------------------------------------
    def score_student(self, teacher: Path, seed: int, row: str, forced_only: bool = False) -> dict:
        import torch

        from gd_train.config import CONFIG_DIR, load_config
        from gd_train.eval import metrics, world
        from gd_train.eval.evaluators import WorldMetrics, read_samples
        from gd_train.flow import few_step_sigmas
        from gd_train.model.backbone import pad_prompt_embeds
        from gd_train.pipeline import GreedyDistillPipeline

        overrides = [f"pretrained_path={teacher}"] + (["student.etm_window=0"] if row in NO_ETM_ROWS else [])
        cfg = load_config(CONFIG_DIR / "toy" / "stage1.yaml", overrides)  # the student's LoRA ranks, as trained
        adapters = None if row == "untrained" else self.out / f"seed{seed}" / row / "adapters"
        pipe = GreedyDistillPipeline(cfg, adapters=adapters, text_encoder=False, vae=False)
        samples = read_samples(str(self.out / "data" / "heldout"), self.args.heldout)
        lengths = [8 * m for m in self.args.length_multiples]
        per_len = {L: [] for L in lengths}
        curves, distance, chunk_s, forced = [], [], [], []
        forcing = WorldMetrics(few_step_sigmas(list(cfg.student.denoising_steps), cfg.student.flow_shift))
        if forced_only:
            for sample in samples:
                spec = world.parse_prompt(sample.caption)
                text = pad_prompt_embeds([sample.prompt_embeds.float()], int(cfg.model.max_text_tokens))
                forced.append(teacher_forced(forcing, pipe.student, sample, spec, text, int(sample.meta["seed"]) + seed))
            return _mean(forced)
        for sample in samples:
            spec = world.parse_prompt(sample.caption)
            text = pad_prompt_embeds([sample.prompt_embeds.float()], int(cfg.model.max_text_tokens))
            t0 = time.perf_counter()
            latents = torch.cat(list(pipe.latent_stream(text, max(lengths), seed=int(sample.meta["seed"]) + seed)), dim=2)
            chunk_s.append((time.perf_counter() - t0) / max(lengths))
            whole = metrics.score_clip(latents, spec)
            for L in lengths:
                per_len[L].append({**metrics.score_clip(latents[:, :, :L], spec).scalars(),
                                   **motion_scores(whole.positions, L)})
            curves.append(whole.position_error.tolist())
            n = sample.latents.shape[1]
            distance.append(float(((latents[0, :, :n].float() - sample.latents.float()) ** 2).mean()))
            forced.append(teacher_forced(forcing, pipe.student, sample, spec, text, int(sample.meta["seed"]) + seed))
        per_len[lengths[0]] = [{**r, **f} for r, f in zip(per_len[lengths[0]], forced)]
        return {"by_length": {str(L): _mean(rows) for L, rows in per_len.items()},
                "teacher_distance": float(np.mean(distance)), "chunk_ms": 1000 * float(np.median(chunk_s)),
                "curve": np.mean(np.array(curves), axis=0).tolist()}

    def score_teacher(self, folder: str) -> dict:
        from gd_train.eval import metrics, world
        from gd_train.eval.evaluators import read_samples

        samples = read_samples(str(self.out / "data" / folder), self.args.heldout)
        full = read_samples(str(self.out / "data" / "heldout"), self.args.heldout)
        rows, curves, distance = [], [], []
        for s, ref in zip(samples, full):
            score = metrics.score_clip(s.latents, world.parse_prompt(s.caption))
            rows.append({**score.scalars(), **motion_scores(score.positions, TRAIN_FRAMES)})
            curves.append(score.position_error.tolist())
            distance.append(float(((s.latents.float() - ref.latents.float()) ** 2).mean()))
        return {"by_length": {"8": _mean(rows)},
                "teacher_distance": float(np.mean(distance)), "chunk_ms": None,
                "curve": np.mean(np.array(curves), axis=0).tolist()}

    # -- the whole thing ----------------------------------------------------------------------------
    def run(self) -> None:
        start = time.monotonic()
        teacher = self.teacher()
        self.step("teacher data (Ray job)", lambda: self.data(teacher))
        self.step("world data", lambda: self.world_data(teacher))
        smoke = bool(self.args.teacher_steps or self.args.datagen_overrides or self.args.train_overrides)
        results = {"command": " ".join(sys.argv), "reduced": self.args.reduced, "smoke": smoke, "seeds": self.args.seeds,
                   "heldout": self.args.heldout, "train_prompts": self.args.train_prompts, "rows": {}}
        results_path = self.out / "results.json"
        if results_path.is_file():
            results["rows"] = json.loads(results_path.read_text())["rows"]
        for name, row in ROWS:
            if "not_run" in results["rows"].get(name, {}):  # recorded by an earlier version of this script
                del results["rows"][name]
            if row in ("teacher", "teacher4"):
                if name not in results["rows"]:
                    say(f"scoring {name}")
                    results["rows"][name] = {"per_seed": [self.score_teacher("heldout" if row == "teacher" else "heldout-4step")]}
                continue
            entry = results["rows"].setdefault(name, {"per_seed": []})
            for done in entry["per_seed"]:  # scored before the teacher-forced columns existed
                if "forced_error_own" not in done["by_length"][str(8 * self.args.length_multiples[0])]:
                    say(f"teacher-forced next frame, {name}, seed {done['seed']}")
                    done["by_length"][str(8 * self.args.length_multiples[0])].update(
                        self.score_student(teacher, done["seed"], row, forced_only=True))
            for seed in self.args.seeds[len(entry["per_seed"]):]:
                if row != "untrained":
                    self.step(f"seed {seed}: {row}", lambda: self.train(teacher, seed, row))
                say(f"scoring {name}, seed {seed}")
                entry["per_seed"].append({"seed": seed, **self.score_student(teacher, seed, row)})
                results_path.write_text(json.dumps(results, indent=1))
        results_path.write_text(json.dumps(results, indent=1))
        (self.out / "table.md").write_text(table(results, self.args.length_multiples))
        plot(results, self.out / "position_error.png")
        say(f"finished in {(time.monotonic() - start) / 60:.1f} min: {self.out / 'table.md'}, "
            f"{self.out / 'position_error.png'}, {results_path}")
        print((self.out / "table.md").read_text())


def _cell(values: list[float]) -> str:
    if not values:
        return "–"
    return f"{np.mean(values):.2f} ± {np.std(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"


def table(results: dict, multiples: list[int]) -> str:
    longer = [m for m in multiples if m > 1]
    head = (["row"] + [f"pos. err @{8 * m}" for m in multiples] + [f"cont. err @{8 * m}" for m in longer]
            + ["next-frame err (own)", "next-frame err (prompt)", "final err @8", "direction", "speed @8",
               "motion resid. @8", "shape err", "identity", "dist. to teacher", "ms / chunk"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, entry in results["rows"].items():
        if "not_run" in entry:
            lines.append(f"| {name} | " + " | ".join(["not run"] * (len(head) - 1)) + " |")
            continue
        seeds = entry["per_seed"]

        def get(length, key):
            return [s["by_length"][str(length)][key] for s in seeds if key in s["by_length"].get(str(length), {})]

        cells = [_cell(get(8 * m, "position_error")) for m in multiples]
        cells += [_cell(get(8 * m, "continuation_error")) for m in longer]
        cells += [_cell(get(8, k)) for k in ("forced_error_own", "forced_error_prompt")]
        cells += [_cell(get(8, k)) for k in ("final_position_error", "direction_cosine", "fitted_speed", "motion_residual",
                                             "shape_error", "identity")]
        cells += [_cell([s["teacher_distance"] for s in seeds]),
                  _cell([s["chunk_ms"] for s in seeds if s["chunk_ms"] is not None])]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    note = (f"\nMean ± std over seeds {results['seeds']} of the per-seed mean over {results['heldout']} held-out "
            f"prompts; position errors in latent px (grid 8 x 12), mean over frames 1..L-1, against the prompt's "
            f"motion from the clip's frame 0. 'cont. err': against the clip's own motion fitted on frames 0..7 and "
            f"continued (frames 8..L-1); 'speed' and 'motion resid.': that fit's speed (px/frame) and RMS residual. "
            f"'next-frame err': teacher-forced (x_f from the held-out teacher clip's own x_0..x_f-1, every f) against "
            f"that clip's own measured x_f, and against the prompt's motion."
            + (" REDUCED RUN." if results["reduced"] else "")
            + (" SMOKE RUN (changed budgets: not results)." if results.get("smoke") else "") + f"\nCommand: `{results['command']}`\n")
    return "\n".join(lines) + "\n" + note


def plot(results: dict, path: Path) -> None:
    """Position error against frame index for every row (PIL: no plotting library in the stack)."""
    from PIL import Image, ImageDraw

    curves = {n: np.mean([s["curve"] for s in e["per_seed"]], axis=0) for n, e in results["rows"].items() if "per_seed" in e}
    W, H, pad = 900, 520, 60
    img = Image.new("RGB", (W, H + 30 * len(curves)), "white")
    d = ImageDraw.Draw(img)
    n = max(len(c) for c in curves.values())
    top = max(float(np.max(c)) for c in curves.values()) or 1.0
    d.rectangle([pad, pad // 2, W - pad // 2, H - pad], outline="black")
    for frac in (0, 0.25, 0.5, 0.75, 1.0):
        y = H - pad - frac * (H - 1.5 * pad)
        d.text((5, y - 6), f"{frac * top:.1f}", fill="black")
    for f in range(0, n, max(1, n // 8)):
        d.text((pad + f / max(1, n - 1) * (W - 1.5 * pad) - 5, H - pad + 5), str(f), fill="black")
    d.text((W // 2 - 80, H - 25), "latent frame (training length 8)", fill="black")
    colours = ["black", "gray", "red", "orange", "blue", "green", "purple", "brown", "cyan"]
    for i, (name, c) in enumerate(curves.items()):
        pts = [(pad + f / max(1, n - 1) * (W - 1.5 * pad), H - pad - v / top * (H - 1.5 * pad)) for f, v in enumerate(c)]
        d.line(pts, fill=colours[i % len(colours)], width=2)
        d.text((pad, H + 5 + 30 * i), f"-- {name}", fill=colours[i % len(colours)])
    img.save(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/reproduce")
    p.add_argument("--cache", default=str(REPO_ROOT / ".cache"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--train-prompts", type=int, default=256)
    p.add_argument("--heldout", type=int, default=16)
    p.add_argument("--length-multiples", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--reduced", action="store_true", help="one seed, 64 training prompts, 8 held-out (labelled)")
    # For checking the driver itself (a smoke run, not results): a shorter teacher and extra overrides.
    p.add_argument("--teacher-steps", type=int, default=None)
    p.add_argument("--datagen-overrides", nargs="*", default=[])
    p.add_argument("--train-overrides", nargs="*", default=[])
    args = p.parse_args(argv)
    if args.reduced:
        args.seeds, args.train_prompts, args.heldout = args.seeds[:1], 64, 8
    Experiment(args).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
