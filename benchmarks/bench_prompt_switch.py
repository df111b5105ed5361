"""Cost of a prompt switch mid-stream (docs/design.md, "Prompt switches"): time per chunk without
switches, time of the chunks that carry a switch (the ETM window and the SDD context re-encoded), their
ratio, and the process's peak RSS after a short and a long switching stream (flat: nothing grows).

    python benchmarks/bench_prompt_switch.py                 # mid-size CPU model, 48 frames, a switch every 8
    python benchmarks/bench_prompt_switch.py --size tiny --frames 96 --every 4
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_stream import SIZES  # noqa: E402  (the same model sizes as the streaming benchmark)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="mid", choices=sorted(SIZES))
    p.add_argument("--frames", type=int, default=48)
    p.add_argument("--every", type=int, default=8, help="a switch every N latent frames")
    args = p.parse_args()

    import torch

    from gd_train.config import load_config
    from gd_train.infer.stream import PromptSchedule, StreamingGenerator, StreamSettings
    from gd_train.model.student import GreedyDistillStudent

    torch.manual_seed(0)
    cfg = load_config(ROOT / "configs/model/tiny.yaml", SIZES[args.size])
    student = GreedyDistillStudent.from_config(cfg).eval()
    prompts = [torch.randn(1, 64, cfg.model.transformer.text_dim) for _ in range(2)]
    gen = StreamingGenerator(student, StreamSettings.from_config(cfg))

    def run(frames: int, every: int | None) -> tuple[list[float], set[int]]:
        schedule = PromptSchedule()
        switch_at = set(range(every, frames, every)) if every else set()
        for f in switch_at:
            schedule.switch(f, prompts[(f // every) % 2])
        times, tick = [], time.perf_counter()
        for _ in gen.stream(prompts[0], frames, 0, schedule=schedule):
            now = time.perf_counter()
            times.append(now - tick)
            tick = now
        return times, switch_at

    run(8, 4)  # warm-up
    rss_short = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    steady = lambda times, skip: [t for f, t in enumerate(times) if f > student.window + 1 and f not in skip]  # noqa: E731
    plain, _ = run(args.frames, None)
    switching, at = run(args.frames, args.every)
    rss_long = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    base_ms = statistics.median(steady(plain, set())) * 1e3
    other_ms = statistics.median(steady(switching, at)) * 1e3
    switch_ms = statistics.median(switching[f] for f in sorted(at)) * 1e3
    print(f"size {args.size}, {args.frames} latent frames, a switch every {args.every} ({len(at)} switches), "
          f"w = {student.window}, T = {len(gen.s.sigmas) - 1}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print("| stream | ms / chunk (median) |")
    print("|---|---:|")
    print(f"| no switches | {base_ms:.2f} |")
    print(f"| with switches: chunks without one | {other_ms:.2f} |")
    print(f"| with switches: chunks with one | {switch_ms:.2f} |")
    print(f"switch chunk / plain chunk: {switch_ms / base_ms:.2f}x (a switch adds w + 3 = {student.window + 3} "
          f"single-chunk passes to the chunk's {len(gen.s.sigmas) + 1})")
    print(f"peak RSS after warm-up {rss_short:.0f} MB, after both streams {rss_long:.0f} MB "
          f"(+{rss_long - rss_short:.1f} MB)")


if __name__ == "__main__":
    main()
