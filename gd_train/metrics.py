"""What a run reports: TensorBoard scalars and sample videos under `<run_dir>/tb`, one JSON object per
logged step in `<run_dir>/metrics.jsonl`. Only rank 0 writes; the values it writes are already
reduced over ranks by the trainer.

Tags are `group/name`, and a custom-scalars layout groups them so the dashboard opens sorted into
loss (one chart per objective), optimisation, progress, throughput, system, data (damage
counters) and RL; every scalar group logged has its place in it (tested). On resume the writer purges
events at or after the resumed step (`purge_step`) and `metrics.jsonl` is cut back to the checkpoint,
so curves continue without a fork.
"""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

TB_DIR = "tb"
METRICS_FILE = "metrics.jsonl"

# One chart per objective: stage 1's flow-matching loss and stage 2's RL loss measure different things.
LOSS_TAGS = {"loss/stage1_next_chunk": "stage 1: next-chunk flow matching (Eq. 6)",
             "loss/stage2_rl": "stage 2: RL fine-tuning, DMD-style (Eq. 10)"}
LAYOUT = {
    "loss": {title: ["Multiline", [rf"^{tag}$"]] for tag, title in LOSS_TAGS.items()},
    "optimisation": {"learning rate": ["Multiline", [r"optimisation/lr.*"]],
                     "gradient norm": ["Multiline", [r"optimisation/grad_norm"]],
                     "skipped (non-finite loss)": ["Multiline", [r"optimisation/skipped.*"]]},
    "progress": {"epoch": ["Multiline", [r"^progress/epoch$"]],
                 "samples seen": ["Multiline", [r"^progress/samples_seen$"]]},
    "throughput": {"samples and tokens per second": ["Multiline", [r"throughput/(samples|tokens)_per_s"]],
                   "step time": ["Multiline", [r"throughput/step_time_s"]],
                   "data wait": ["Multiline", [r"throughput/data_wait_fraction"]],
                   "evaluation time": ["Multiline", [r"throughput/eval_seconds"]]},
    "throughput by clip length": {"tokens per second": ["Multiline", [r"throughput_by_length/F\d+/tokens_per_s"]],
                                  "samples per second": ["Multiline", [r"throughput_by_length/F\d+/samples_per_s"]],
                                  "steps since the last log line": ["Multiline", [r"throughput_by_length/F\d+/steps"]]},
    "system": {"memory": ["Multiline", [r"system/.*memory.*"]]},
    "data": {"damage (summed over ranks)": ["Multiline", [r"data/(?!bucket_steps).*"]],
             "steps per epoch by clip length (latent frames)": ["Multiline", [r"data/bucket_steps_per_epoch/.*"]]},
    "RL": {"chunk f and step t": ["Multiline", [r"rl/(f|t)$"]],
           "scores": ["Multiline", [r"rl/(score|mu|gen).*"]],
           "critic's flow-matching loss (train.rl_fake_score=critic)": ["Multiline", [r"^rl/critic_loss$"]]},
    "eval": {"held-out scores (train.eval_every)": ["Multiline", [r"^eval/"]]},
}


def truncate_jsonl(path: Path, max_step: int) -> None:
    """Keep the lines whose `step` is <= max_step (what a resumed run will not write again)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= max_step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


class Metrics:
    def __init__(self, run_dir: str | os.PathLike, *, enabled: bool, resumed_step: int):
        self.enabled = enabled
        self.writer = None
        self.jsonl = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        run_dir = Path(run_dir)
        truncate_jsonl(run_dir / METRICS_FILE, resumed_step)
        # purge_step: events of steps >= resumed_step + 1 written before the interruption are dropped.
        self.writer = SummaryWriter(log_dir=str(run_dir / TB_DIR),
                                    purge_step=resumed_step + 1 if resumed_step > 0 else None)
        if resumed_step == 0:
            self.writer.add_custom_scalars(LAYOUT)
        self.jsonl = open(run_dir / METRICS_FILE, "a", buffering=1)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)
        record = {"step": step, **{tag: _plain(value) for tag, value in scalars.items()}}
        loss = [tag for tag in scalars if tag in LOSS_TAGS]
        if loss:  # under one name in both stages, for scripts that read either
            record["loss"] = record[loss[0]]
        self.jsonl.write(json.dumps(record, sort_keys=True) + "\n")
        self.writer.flush()

    def log_text(self, tag: str, text: str, step: int) -> None:
        if self.enabled:
            self.writer.add_text(tag, text, step)

    def log_video(self, tag: str, frames_thwc: np.ndarray, step: int, fps: int) -> None:
        """An animated GIF in TensorBoard's image dashboard — what `SummaryWriter.add_video` writes.

        Not `add_video` itself: it encodes through `moviepy.editor`, which moviepy 2 removed, and without
        it writes an empty image with only a printed warning. Pillow (a diffusers dependency) encodes the
        same GIF, and the summary proto is the one `add_video` builds."""
        if not self.enabled:
            return
        from PIL import Image
        from tensorboard.compat.proto.summary_pb2 import Summary

        frames = [Image.fromarray(np.ascontiguousarray(f)) for f in frames_thwc]
        buffer = io.BytesIO()
        frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:],
                       duration=max(1, round(1000 / fps)), loop=0)
        T, H, W, C = frames_thwc.shape
        image = Summary.Image(height=H, width=W, colorspace=C, encoded_image_string=buffer.getvalue())
        self.writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()


def _plain(value: Any) -> Any:
    value = float(value)
    return value if math.isfinite(value) else str(value)


def read_scalars(tb_dir: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of a run's event files, read back with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def read_layout(tb_dir: str | os.PathLike) -> dict[str, dict[str, list[str]]]:
    """The custom-scalars layout as the event files hold it: {category: {chart: [tag regexes]}}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2

    acc = EventAccumulator(str(tb_dir), size_guidance={"tensors": 0})
    acc.Reload()
    if "custom_scalars__config__" not in acc.Tags()["tensors"]:
        return {}
    layout = layout_pb2.Layout.FromString(acc.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    return {c.title: {chart.title: list(chart.multiline.tag) for chart in c.chart} for c in layout.category}


def tags_outside_layout(tb_dir: str | os.PathLike) -> list[str]:
    """Scalar tags of a run that no chart of its layout shows (TensorBoard matches a chart's regexes
    with a search, as `re.search` does)."""
    import re

    patterns = [p for charts in read_layout(tb_dir).values() for tags in charts.values() for p in tags]
    return sorted(tag for tag in read_scalars(tb_dir) if not any(re.search(p, tag) for p in patterns))


def memory_gib() -> dict[str, float]:
    """Peak memory of this process: resident set (CPU) and, on CUDA, allocated device memory."""
    import resource

    import torch

    out = {"system/peak_rss_memory_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if torch.cuda.is_available():
        out["system/peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out
