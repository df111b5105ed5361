"""`make demo`: the whole system end to end on this machine, on the tiny random-weight default.

    local Ray head -> `ray job submit` data_pipeline/gen_teacher.py (tiny teacher, bundled prompts)
      -> stage 1 on 2 CPU ranks (the launcher the SLURM scripts use) -> stage 2 from stage 1
      -> export the adapters -> stream a video with gd-generate -> mp4

Every step is the command a user would type (printed before it runs), so the output doubles as a
walk-through. A step that finished is recorded in `<demo dir>/.done/`; a rerun skips it. A step that
did not finish is started again from a clean folder, together with every step after it, so a rerun
reuses what is done or starts clean, never a mix. `--clean` starts everything over.

    python -m gd_train.demo [--dir runs/demo] [--clean] [--stage1-steps 40] [--stage2-steps 8]
                            [--ray-port-base N] [--dashboard-port N] [--rdzv-port N]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

REPO_ROOT = Path(__file__).resolve().parent.parent


class DemoError(RuntimeError):
    pass


def _say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m" if sys.stdout.isatty() else f"\n== {text}", flush=True)


def _run(command: list[str], env: Optional[dict] = None) -> None:
    print("$ " + " ".join(shlex.quote(c) for c in command), flush=True)
    proc = subprocess.run(command, cwd=REPO_ROOT, env=env)
    if proc.returncode != 0:
        raise DemoError(f"step failed (exit status {proc.returncode}): {' '.join(command[:4])} ...")


def _python(*args: str) -> list[str]:
    return [sys.executable, *args]


class Demo:
    def __init__(self, root: Path, stage1_steps: int, stage2_steps: int, latent_frames: int,
                 dashboard_port: Optional[int] = None, ray_port_base: Optional[int] = None,
                 rdzv_port: Optional[int] = None):
        self.root = root.resolve()
        self.done_dir = self.root / ".done"
        self.stage1_steps, self.stage2_steps = stage1_steps, stage2_steps
        self.latent_frames = latent_frames
        self.dashboard_port, self.ray_port_base, self.rdzv_port = dashboard_port, ray_port_base, rdzv_port
        self.shards = self.root / "data" / "shards"
        self.stage1 = self.root / "stage1"
        self.stage2 = self.root / "stage2"
        self.adapters = self.root / "adapters"
        self.video = self.root / "video.mp4"
        self.latents = self.root / "video.safetensors"

    # ----------------------------------------------------------------------------------------------
    def steps(self) -> list[tuple[str, list[Path], Callable[[], None]]]:
        """(name, the folders/files it owns, how to run it), in order."""
        return [
            ("teacher data (Ray job)", [self.shards], self.generate_data),
            ("stage 1 (2 CPU ranks)", [self.stage1], self.train_stage1),
            ("stage 2 (2 CPU ranks)", [self.stage2], self.train_stage2),
            ("export adapters", [self.adapters], self.export),
            ("stream a video", [self.video, self.latents], self.stream_video),
        ]

    def run(self) -> None:
        start = time.monotonic()
        self.root.mkdir(parents=True, exist_ok=True)
        redo = False
        for index, (name, owned, action) in enumerate(self.steps(), start=1):
            marker = self.done_dir / f"{index}.json"
            if marker.is_file() and not redo:
                _say(f"[{index}/5] {name}: done in an earlier run, reused ({marker})")
                continue
            redo = True  # this step and every later one start clean
            for path in owned:
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
            for later in self.done_dir.glob("*.json"):
                if int(later.stem) >= index:
                    later.unlink()
            _say(f"[{index}/5] {name}")
            t0 = time.monotonic()
            action()
            self.done_dir.mkdir(exist_ok=True)
            marker.write_text(json.dumps({"step": name, "seconds": round(time.monotonic() - t0, 1)}))
        self.summary(time.monotonic() - start)

    # ----------------------------------------------------------------------------------------------
    def generate_data(self) -> None:
        from launch.ray_head import LocalRayHead

        head = LocalRayHead(num_cpus=2, dashboard_port=self.dashboard_port, port_base=self.ray_port_base)
        print(f"starting a local Ray head (dashboard {head.dashboard}) ...", flush=True)
        head.start()
        try:
            print(f"Ray head up (pid {head.proc.pid}); submitting the teacher-data job", flush=True)
            command = head.submit_command(["python", "data_pipeline/gen_teacher.py", "--config", "configs/datagen.yaml",
                                           "prompts_csv=assets/demo_prompts.csv", f"output_dir={self.shards}"])
            from launch.ray_head import ray_env

            _run(command, env=ray_env())
        finally:
            print(f"stopping the Ray head by PID ({head.proc.pid if head.proc else '-'})", flush=True)
            head.stop()

    def _train(self, stage: str, run_dir: Path, steps: int, extra: list[str]) -> None:
        # As many epochs as `steps` needs; a checkpoint half-way and at the end; one sample video at the end.
        ports = ["--rdzv-port", str(self.rdzv_port)] if self.rdzv_port is not None else []
        _run(_python("-m", "gd_train.cli", stage, "--config", f"configs/tiny/{stage}.yaml", "--nproc", "2", *ports,
                     f"output_dir={run_dir}", f"data.shards={self.shards}", "train.epochs=1000",
                     f"train.max_steps={steps}", f"train.checkpoint_every={max(steps // 2, 1)}",
                     f"train.video_every={steps}", *extra))

    def train_stage1(self) -> None:
        self._train("stage1", self.stage1, self.stage1_steps, [])

    def train_stage2(self) -> None:
        self._train("stage2", self.stage2, self.stage2_steps, [f"train.init_from={self.stage1}"])

    def export(self) -> None:
        _run(_python("-m", "gd_train.cli", "ckpt", "export", str(self.stage2), "--out", str(self.adapters)))

    def stream_video(self) -> None:
        _run(_python("-m", "gd_train.generate", "--config", "configs/model/tiny.yaml", "--adapters",
                     str(self.adapters), "--latent-frames", str(self.latent_frames), "--seed", "0",
                     "--prompt", "a red fox trots through fresh snow at dawn",
                     "--out", str(self.latents), "--mp4", str(self.video)))

    # ----------------------------------------------------------------------------------------------
    def summary(self, seconds: float) -> None:
        def rel(path: Path) -> str:  # short paths when under the current folder
            try:
                return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
            except ValueError:
                return str(path)

        _say(f"demo finished in {seconds / 60:.1f} min")
        print(f"""  teacher shards      {rel(self.shards)}/ (manifest.json, gen_teacher_report.json)
  stage-1 run         {rel(self.stage1)}/ (checkpoints/latest, tb/, metrics.jsonl, config.yaml)
  stage-2 run         {rel(self.stage2)}/
  exported adapters   {rel(self.adapters)}/ (etm/, sdd/: PEFT and diffusers LoRA safetensors; cf_proj.safetensors)
  video               {rel(self.video)} ({rel(self.latents)} holds the latents)

  TensorBoard:  {rel(Path(sys.executable).parent / 'tensorboard')} --logdir {rel(self.root)} --host 127.0.0.1 --port 6006
  Inspect:      {rel(Path(sys.executable).parent / 'gd-train')} ckpt ls {rel(self.stage2)}
  Rerun:        make demo   (reuses what is done; `python -m gd_train.demo --clean` starts over)""", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m gd_train.demo", description=__doc__.split("\n")[0])
    p.add_argument("--dir", default=os.environ.get("DEMO_DIR", "runs/demo"), help="where everything goes")
    p.add_argument("--clean", action="store_true", help="delete the demo folder first")
    p.add_argument("--stage1-steps", type=int, default=40)
    p.add_argument("--stage2-steps", type=int, default=8)
    p.add_argument("--latent-frames", type=int, default=12, help="length of the streamed video (latent frames)")
    # Ports: by default every one is picked free and held for the run (launch/ports.py), so two demos
    # run side by side; these pin them instead.
    env_dashboard = os.environ.get("RAY_DASHBOARD_PORT")
    p.add_argument("--dashboard-port", type=int, default=int(env_dashboard) if env_dashboard else None,
                   help="the Ray dashboard / job API port (default: in the head's block; env RAY_DASHBOARD_PORT)")
    from launch.ray_head import PORTS_PER_HEAD

    p.add_argument("--ray-port-base", type=int, default=None,
                   help=f"the Ray head uses exactly this port and the next {PORTS_PER_HEAD - 1} (default: a free block)")
    p.add_argument("--rdzv-port", type=int, default=None, help="the training runs' torchrun rendezvous port "
                                                                "(default: a free one)")
    args = p.parse_args(argv)
    root = Path(args.dir)
    if args.clean and root.exists():
        shutil.rmtree(root)
    try:
        Demo(root, args.stage1_steps, args.stage2_steps, args.latent_frames, args.dashboard_port, args.ray_port_base,
             args.rdzv_port).run()
    except DemoError as exc:
        print(f"\ndemo: error: {exc}\ndemo: rerun `make demo` to retry from that step (finished steps are kept)",
              file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 — one line for the user; the step printed its own details
        from launch.ray_head import RayHeadError

        if isinstance(exc, RayHeadError):
            print(f"\ndemo: error: {exc}", file=sys.stderr)
            return 1
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
