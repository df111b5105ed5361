"""Teacher-data generation as a Ray job: OpenVidHD prompts -> Wan teacher latents -> WebDataset shards.

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python data_pipeline/gen_teacher.py --config configs/datagen.yaml \\
        prompts_csv=/data/OpenVidHD.csv output_dir=/shared/teacher_shards [KEY=VALUE ...]

Any config key can be overridden as KEY=VALUE (e.g. `datagen.num_workers=0 pretrained_path=/models/wan`;
see configs/datagen.yaml). Under `ray job submit` (RAY_ADDRESS is set) the job joins that cluster;
run directly, it starts a private local Ray instance. On a cluster, `output_dir` must be an absolute
path on a filesystem every node sees (checked: a worker that cannot see it is retired).

What it guarantees:
- each prompt gets a length from `datagen.lengths` (data_pipeline/lengths.py: fixed, weighted choices,
  or the source clip's duration), a function of its key / CSV row only; prompts are grouped by length
  (shortest first, CSV order inside a length) and each group is cut into shards (`samples_per_shard`
  each), so every shard holds one length, and the layout and, through key-derived seeds, the samples
  are the same on every run;
- a shard appears under its final name only when complete, and `manifest.json` lists the finished ones
  (counts, size, checksums); a rerun of the same command skips them and writes only what is missing;
- a worker that dies mid-shard (Ray restarts it) or fails has the shard retried, at most
  `datagen.max_attempts` times, then reported; the exit status is 1 while any shard is unfinished;
- progress lines (shards done/total, samples/s, ETA) while it runs, a summary at the end, and
  `gen_teacher_report.json` (status, bad rows, failures) in `output_dir`;
- SIGTERM (`ray job stop`) or SIGINT stops it cleanly: no new shards; in-flight ones finish within
  `datagen.stop_wait_s` or are abandoned (their workers killed, their partial files removed); the
  manifest lists exactly the finished shards, the report says "stopped", the exit status is 3, and
  the same command again writes the rest.
One job per output_dir at a time: it removes the `.partial` files dead attempts left behind.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import signal
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import OmegaConf

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `python data_pipeline/gen_teacher.py` puts only data_pipeline/ on the path
    sys.path.insert(0, str(REPO_ROOT))

from data_pipeline.lengths import LengthPlanner, cost_units, latent_frames, reference_latent_frames  # noqa: E402
from data_pipeline.prompts import Prompt, PromptReport, read_prompts  # noqa: E402
from data_pipeline.teacher import (  # noqa: E402
    STORAGE_DTYPES,
    ShardResult,
    ShardTask,
    TeacherWorker,
    describe_worker_error,
    sampling_settings,
)
from gd_train.config import ConfigError, as_container, check_pretrained_folder, load_config  # noqa: E402
from gd_train.data.shards import PARTIAL_SUFFIX, Manifest, ShardFormatError, keys_digest  # noqa: E402

REPORT_NAME = "gen_teacher_report.json"
VISIBILITY_MARKER = ".gen_teacher_output_dir"
EXIT_FAILED, EXIT_CONFIG, EXIT_STOPPED = 1, 2, 3


def log(message: str) -> None:
    print(f"[gen_teacher] {message}", flush=True)


# --------------------------------------------------------------------------------------------------
# Plan and output folder
# --------------------------------------------------------------------------------------------------
def plan_shards(prompts: Sequence[Prompt], samples_per_shard: int) -> list[ShardTask]:
    """Shards of one length each: prompts grouped by planned length (shortest first; CSV order inside
    a length), each group cut into shards of `samples_per_shard`. One length (mode fixed) gives the
    CSV-order layout of folders written before per-sample lengths."""
    groups: dict[Optional[int], list[Prompt]] = {}
    for prompt in prompts:
        groups.setdefault(prompt.num_frames, []).append(prompt)
    tasks: list[ShardTask] = []
    for length in sorted(groups, key=lambda n: (n is not None, n or 0)):
        group = groups[length]
        tasks += [ShardTask(index=len(tasks) + i, prompts=tuple(group[begin:begin + samples_per_shard]))
                  for i, begin in enumerate(range(0, len(group), samples_per_shard))]
    return tasks


def task_latent_frames(cfg, task: ShardTask) -> int:
    return latent_frames(task.num_frames or cfg.video.num_frames)


def task_cost(cfg, task: ShardTask) -> float:
    return cost_units({task_latent_frames(cfg, task): len(task.prompts)}, reference_latent_frames(cfg))


def length_histogram(cfg, tasks: Sequence[ShardTask]) -> dict[int, int]:
    """{latent frames: samples} of the tasks, shortest first."""
    histogram: dict[int, int] = {}
    for task in tasks:
        f = task_latent_frames(cfg, task)
        histogram[f] = histogram.get(f, 0) + len(task.prompts)
    return dict(sorted(histogram.items()))


def cost_line(cfg, histogram: dict[int, int]) -> str:
    """The plan's rough teacher cost, in teacher-frame-equivalents (data_pipeline/lengths.py)."""
    ref = reference_latent_frames(cfg)
    units = cost_units(histogram, ref)
    lengths = ", ".join(f"{f}: {n}" for f, n in histogram.items())
    return (f"cost: {units:,.0f} teacher-frame-equivalents (a clip of F latent frames counts F^2/{ref}, "
            f"{ref} = the latent frames of video.num_frames={cfg.video.num_frames}; = {units / ref:,.1f} clips of "
            f"{cfg.video.num_frames} frames) for {sum(histogram.values())} samples by latent frames {{{lengths}}}")


def manifest_settings(cfg) -> dict[str, Any]:
    return {**sampling_settings(cfg), "samples_per_shard": cfg.datagen.samples_per_shard}


def open_output(output_dir: Path, cfg, tasks: Sequence[ShardTask]) -> tuple[Manifest, list[ShardTask]]:
    """The manifest (new or the previous run's, checked against this plan) and the tasks still to do."""
    settings = manifest_settings(cfg)
    manifest = Manifest.load(output_dir)
    if manifest is None:
        manifest = Manifest(settings=settings, total_shards=len(tasks))
    elif manifest.settings != settings:
        changed = sorted(k for k in set(settings) | set(manifest.settings) if settings.get(k) != manifest.settings.get(k))
        raise ConfigError(f"output_dir '{output_dir}': its shards were made with other settings "
                          f"({', '.join(f'{k}={manifest.settings.get(k)!r}' for k in changed)}); this run has "
                          f"({', '.join(f'{k}={settings.get(k)!r}' for k in changed)}): use a new output_dir")
    by_name = {t.name: t for t in tasks}
    for name, record in manifest.shards.items():
        task = by_name.get(name)
        if task is None or keys_digest(p.key for p in task.prompts) != record.keys_sha256:
            raise ConfigError(f"output_dir '{output_dir}': {name} holds other prompts than this run plans for it "
                              "(the CSV or the filters changed?): use a new output_dir")
    output_dir.mkdir(parents=True, exist_ok=True)
    for stale in output_dir.glob(f"*{PARTIAL_SUFFIX}"):  # what attempts of an earlier run left when they died
        stale.unlink()
    todo = []
    for task in tasks:
        record = manifest.shards.get(task.name)
        path = output_dir / task.name
        if record is not None and path.is_file() and path.stat().st_size == record.bytes:
            continue
        if record is not None:
            log(f"{task.name} is in the manifest but {'missing' if not path.is_file() else 'has another size'}: "
                "generating it again")
            del manifest.shards[task.name]
        todo.append(task)
    manifest.total_shards = len(tasks)
    manifest.shard_latent_frames = {t.name: task_latent_frames(cfg, t) for t in tasks}
    manifest.length_histogram = length_histogram(cfg, tasks)
    manifest.save(output_dir)
    return manifest, todo


def estimated_sample_bytes(cfg, latent_frames: Optional[int] = None) -> int:
    """Upper bound of one sample's size in a shard (at `latent_frames`, default video.num_frames'):
    latents + prompt embeddings padded to the full text length (stored unpadded, so usually less) +
    tar headers and JSON."""
    from gd_train.config import latent_shape, transformer_arch

    itemsize = STORAGE_DTYPES[cfg.datagen.storage_dtype].itemsize
    latents = math.prod(latent_shape(cfg, latent_frames)) * itemsize
    embeds = cfg.model.max_text_tokens * transformer_arch(cfg)["text_dim"] * itemsize
    return latents + embeds + 8192


def check_free_disk(cfg, output_dir: Path, to_write: dict[int, int]) -> None:
    """Refuse at start, not days later: the samples still to write ({latent frames: samples}, each at
    its own size) plus the configured headroom must fit."""
    samples_to_write = sum(to_write.values())
    data_bytes = sum(n * estimated_sample_bytes(cfg, f) for f, n in to_write.items())
    needed = data_bytes + int(cfg.datagen.min_free_disk_gb * 2**30)
    probe = output_dir if output_dir.exists() else next(p for p in output_dir.parents if p.exists())
    free = shutil.disk_usage(probe).free
    if free < needed:
        remedies = "free space or use another output_dir"
        if cfg.datagen.storage_dtype != "bfloat16":  # only a remedy when the config does not already store bf16
            remedies = "free space, use another output_dir, or store datagen.storage_dtype=bfloat16 (half the bytes)"
        raise ConfigError(
            f"output_dir '{output_dir}': {free / 2**30:.1f} GiB free, but {samples_to_write} samples need up to "
            f"{data_bytes / 2**30:.1f} GiB plus datagen.min_free_disk_gb="
            f"{cfg.datagen.min_free_disk_gb:g} GiB headroom; {remedies}")


def check_datagen(cfg) -> None:
    d = cfg.datagen
    problems = [(d.samples_per_shard >= 1, "datagen.samples_per_shard", ">= 1"),
                (d.max_attempts >= 1, "datagen.max_attempts", ">= 1"),
                (d.batch_size >= 1, "datagen.batch_size", ">= 1"),
                (d.max_worker_restarts >= 0, "datagen.max_worker_restarts", ">= 0"),
                (d.stop_wait_s >= 0, "datagen.stop_wait_s", ">= 0"),
                (0.0 <= d.preview_fraction <= 1.0, "datagen.preview_fraction", "in [0, 1]"),
                (d.storage_dtype in STORAGE_DTYPES, "datagen.storage_dtype", " | ".join(STORAGE_DTYPES))]
    for ok, key, expected in problems:
        if not ok:
            raise ConfigError(f"key '{key}': expected {expected}, got {OmegaConf.select(cfg, key)!r}")
    LengthPlanner.from_config(cfg)  # datagen.lengths, one line naming the key
    if cfg.prompts_csv is None:
        raise ConfigError("key 'prompts_csv': not set (give prompts_csv=PATH to an OpenVidHD-layout CSV)")


# --------------------------------------------------------------------------------------------------
# Ray
# --------------------------------------------------------------------------------------------------
def joins_cluster() -> bool:
    """`ray job submit` runs the entry point with RAY_ADDRESS set to its cluster."""
    return bool(os.environ.get("RAY_ADDRESS"))


def connect_ray() -> str:
    import ray

    if joins_cluster():
        ray.init(address="auto", logging_level=logging.WARNING)
        return f"joined the Ray cluster at {os.environ['RAY_ADDRESS']}"
    # address="local": never attach to some other cluster that happens to run on this machine.
    pythonpath = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    # Ray's fixed metrics ports (44217, 44227; set only through the environment) and the metrics export
    # port from a block of our own, so that two direct runs on one machine do not clash (launch/ports.py).
    # Ray picks its other ports free itself; for control over every port, start a head (launch/ray_head.py).
    from launch.ports import reserve

    block = reserve(3, purpose="the private Ray instance of a direct gen_teacher run")
    os.environ["AUTOSCALER_METRIC_PORT"], os.environ["DASHBOARD_METRIC_PORT"] = str(block.base), str(block.base + 1)
    ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING,
             _metrics_export_port=block.base + 2, runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
    return "started a local Ray instance (no RAY_ADDRESS)"


def worker_count(cfg) -> int:
    import ray

    d = cfg.datagen
    if d.num_workers > 0:
        return d.num_workers
    resources = ray.cluster_resources()
    if d.num_gpus_per_worker > 0:
        return max(1, int(resources.get("GPU", 0) // d.num_gpus_per_worker))
    return max(1, int(resources.get("CPU", 1) // max(d.num_cpus_per_worker, 1e-9)))


@dataclass
class Attempt:
    shard: str
    attempt: int
    error: str
    node: str = ""  # Ray node id of the worker the attempt ran on, when known


@dataclass
class Outcome:
    written: list[ShardResult] = field(default_factory=list)
    failed_attempts: list[Attempt] = field(default_factory=list)
    failed_shards: list[str] = field(default_factory=list)
    retired_workers: list[str] = field(default_factory=list)
    abandoned_shards: list[str] = field(default_factory=list)  # in flight when a stop came, cut off
    not_started: list[str] = field(default_factory=list)  # still queued when a stop came


class StopRequest:
    """SIGTERM (what `ray job stop` sends the driver, then SIGKILL after RAY_JOB_STOP_WAIT_TIME_S) and
    SIGINT only set a flag; the driver's loop sees it within a second and winds down. A second signal
    cuts the wait for in-flight shards short. Installed after `ray.init`, which sets its own SIGTERM
    handler (`sys.exit`: no report, no manifest update for a shard just finished)."""

    def __init__(self) -> None:
        self.signal: Optional[str] = None
        self.count = 0
        self.at = 0.0

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.count += 1
        if self.signal is None:
            self.signal, self.at = signal.Signals(signum).name, time.monotonic()

    @property
    def requested(self) -> bool:
        return self.signal is not None


class Progress:
    """Progress lines. The ETA divides the cost still to do by the cost rate so far (teacher-frame-
    equivalents, not samples: with mixed lengths a long clip costs many short ones)."""

    def __init__(self, total_shards: int, done_shards: int, total_samples: int, done_samples: int, every_s: float,
                 todo_cost: float = 0.0):
        self.total_shards, self.done_shards = total_shards, done_shards
        self.total_samples, self.done_samples = total_samples, done_samples
        self.every_s, self.start = every_s, None  # the clock starts when the first worker is ready
        self.new_samples, self.failed, self.retried = 0, 0, 0
        self.todo_cost, self.new_cost = todo_cost, 0.0
        self.last = 0.0

    def add(self, samples: int, cost: float) -> None:
        self.done_shards += 1
        self.done_samples += samples
        self.new_samples += samples
        self.new_cost += cost

    def start_clock(self) -> None:
        self.start = self.start or time.monotonic()

    def rate(self) -> float:
        """Samples per second written by this run since a worker first had the teacher loaded."""
        return 0.0 if self.start is None else self.new_samples / max(time.monotonic() - self.start, 1e-9)

    def maybe_print(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < self.every_s:
            return
        self.last = now
        rate, left = self.rate(), self.total_samples - self.done_samples
        if self.new_cost > 0 and self.todo_cost > 0:
            elapsed = time.monotonic() - self.start
            eta = _duration(max(self.todo_cost - self.new_cost, 0.0) * elapsed / self.new_cost)
        else:
            eta = _duration(left / rate) if rate > 0 else "?"
        log(f"shards {self.done_shards}/{self.total_shards} done ({self.failed} failed, {self.retried} retried) | "
            f"samples {self.done_samples}/{self.total_samples} | {rate:.2f} samples/s | ETA {eta}")


def _duration(seconds: float) -> str:
    seconds = int(math.ceil(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def run_workers(cfg, output_dir: Path, manifest: Manifest, todo: Sequence[ShardTask], progress: Progress,
                stop: Optional[StopRequest] = None) -> Outcome:
    """Hand the shards to Ray actors (one teacher each) until every shard is written or has failed
    `max_attempts` times. The driver owns retries: Ray restarts a dead actor (`max_worker_restarts`)
    but never re-runs a task by itself (`max_task_retries=0`), so attempts are counted here."""
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    d = cfg.datagen
    outcome = Outcome()
    (output_dir / VISIBILITY_MARKER).write_text("written by the gen_teacher driver\n")
    actor_cls = ray.remote(TeacherWorker).options(
        num_cpus=d.num_cpus_per_worker, num_gpus=d.num_gpus_per_worker,
        max_restarts=d.max_worker_restarts, max_task_retries=0)
    config = as_container(cfg)
    workers = min(worker_count(cfg), len(todo))
    actors = [actor_cls.remote(config, str(output_dir)) for _ in range(workers)]
    log(f"{workers} worker(s) x (num_gpus={d.num_gpus_per_worker}, num_cpus={d.num_cpus_per_worker}) for "
        f"{len(todo)} shard(s)")

    # Longest clips first: the costliest shards do not all land at the end, where they would leave most
    # workers idle while a few finish (the plan and the shard contents do not depend on this order).
    queue = deque(sorted(todo, key=lambda t: -task_latent_frames(cfg, t)))
    attempts: dict[str, int] = {}
    waiting_ready = {actors[i].ready.remote(VISIBILITY_MARKER): i for i in range(workers)}
    running: dict[Any, tuple[int, ShardTask, int]] = {}
    idle: list[int] = []
    alive = set(range(workers))

    stop = stop or StopRequest()
    stopping = False

    nodes: dict[int, str] = {}  # worker index -> Ray node id

    def fail_attempt(task: ShardTask, attempt: int, error: str, node: str = "") -> None:
        outcome.failed_attempts.append(Attempt(task.name, attempt, error, node))
        for leftover in output_dir.glob(f"{task.name}.attempt{attempt}-*{PARTIAL_SUFFIX}"):
            leftover.unlink(missing_ok=True)  # what a dead attempt wrote (hundreds of MB at 480p)
        if stopping:
            outcome.abandoned_shards.append(task.name)
        elif attempt < d.max_attempts:
            progress.retried += 1
            log(f"{task.name} attempt {attempt}/{d.max_attempts} failed ({error}); retrying")
            queue.appendleft(task)
        else:
            progress.failed += 1
            outcome.failed_shards.append(task.name)
            log(f"{task.name} FAILED after {attempt} attempt(s) ({error})")

    def retire(index: int, why: str) -> None:
        alive.discard(index)
        outcome.retired_workers.append(f"worker {index}: {why}")
        log(f"worker {index} retired: {why}")
        ray.kill(actors[index], no_restart=True)

    def record(result: ShardResult, task: ShardTask, attempt: int) -> None:
        planned = keys_digest(p.key for p in task.prompts)
        if (result.record.keys_sha256 != planned or result.record.samples != len(task.prompts)
                or result.record.latent_frames != task_latent_frames(cfg, task)):
            # Never expected; checked because the manifest is what "exactly once" rests on.
            (output_dir / task.name).unlink(missing_ok=True)
            fail_attempt(task, attempt, f"wrote {result.record.samples} samples of {result.record.latent_frames} "
                                        "latent frames / other keys or length than planned", result.node)
            return
        manifest.shards[result.name] = result.record
        manifest.save(output_dir)
        outcome.written.append(result)
        progress.add(result.record.samples, task_cost(cfg, task))
        progress.maybe_print(force=progress.done_shards == progress.total_shards)

    # Short waits, so that a stop signal is seen within a second (Ray's wait does not return on one).
    poll_s = min(d.progress_every_s, 0.5)
    while (queue or running) and (alive or running):
        if stop.requested and not stopping:
            stopping = True
            log(f"{stop.signal}: stopping: no new shards; {len(running)} in flight "
                + (f"may finish within datagen.stop_wait_s={d.stop_wait_s:g} s" if d.stop_wait_s > 0 else "are abandoned"))
        if stopping and (not running or stop.count > 1 or time.monotonic() >= stop.at + d.stop_wait_s):
            break
        while idle and queue and not stopping:
            index, task = idle.pop(), queue.popleft()
            attempts[task.name] = attempts.get(task.name, 0) + 1
            running[actors[index].generate_shard.remote(task, attempts[task.name])] = (index, task, attempts[task.name])
        pending = list(running) + ([] if stopping else list(waiting_ready))
        done, _ = ray.wait(pending, num_returns=1, timeout=poll_s)
        progress.maybe_print()
        for ref in done:
            if ref in waiting_ready:
                index = waiting_ready.pop(ref)
                try:
                    info = ray.get(ref)
                except (RayActorError, RayTaskError) as exc:
                    retire(index, f"could not start ({describe_worker_error(exc)})")
                    continue
                if not info["sees_output_dir"]:
                    retire(index, f"on {info['host']} it cannot see {output_dir} (not on a shared filesystem?)")
                    continue
                nodes[index] = info["node"]
                log(f"worker {index} ready on {info['host']} (node {info['node'][:12]}, pid {info['pid']}, {info['device']})")
                progress.start_clock()
                idle.append(index)
                continue
            index, task, attempt = running.pop(ref)
            try:
                result: ShardResult = ray.get(ref)
            except RayActorError as exc:  # the process died: Ray restarts it, we wait until it is back
                fail_attempt(task, attempt, f"worker {index} died: {describe_worker_error(exc)}", nodes.get(index, ""))
                waiting_ready[actors[index].ready.remote(VISIBILITY_MARKER)] = index
                continue
            except RayTaskError as exc:  # an exception in the task; the actor itself is fine
                fail_attempt(task, attempt, describe_worker_error(exc), nodes.get(index, ""))
                idle.append(index)
                continue
            idle.append(index)
            record(result, task, attempt)
        if not alive and not running:
            break
    if stopping:
        abandon(ray, actors, running, record, output_dir, manifest)
        outcome.abandoned_shards += [task.name for _, task, _ in running.values()]
        outcome.abandoned_shards = sorted(set(outcome.abandoned_shards) - set(manifest.shards))
        outcome.not_started = [task.name for task in queue]
        queue.clear()
    for task in queue:  # no worker left to run them
        outcome.failed_shards.append(task.name)
        outcome.failed_attempts.append(Attempt(task.name, attempts.get(task.name, 0), "no worker left"))
    (output_dir / VISIBILITY_MARKER).unlink(missing_ok=True)
    for leftover in output_dir.glob(f"*{PARTIAL_SUFFIX}"):  # no attempt runs any more
        leftover.unlink(missing_ok=True)
    return outcome


def abandon(ray, actors, running: dict, record, output_dir: Path, manifest: Manifest) -> None:
    """End the attempts still running when a stop came, so that no worker renames a shard after the
    driver is gone: kill the workers and wait until Ray reports each attempt over. An attempt that
    finished in the meantime is recorded; a shard file no attempt can vouch for is removed (a rerun
    writes it again), so the folder's shards are exactly the manifest's."""
    from ray.exceptions import RayActorError, RayTaskError

    for actor in actors:
        ray.kill(actor, no_restart=True)
    refs = list(running)
    done, _ = ray.wait(refs, num_returns=len(refs), timeout=2.0) if refs else ([], [])
    for ref in done:
        _, task, attempt = running.pop(ref)
        try:
            record(ray.get(ref), task, attempt)
        except (RayActorError, RayTaskError):
            running[ref] = (None, task, attempt)
    for _, task, _ in running.values():
        if task.name not in manifest.shards:
            (output_dir / task.name).unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------
def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config, e.g. configs/datagen.yaml")
    parser.add_argument("--check", action="store_true",
                        help="validate the config, the weights folder, the CSV and the free disk; start nothing")
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE config overrides (prompts_csv=..., output_dir=...)")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    try:
        cfg = load_config(args.config, args.overrides)
        check_datagen(cfg)
        output_dir = Path(cfg.output_dir)
        if joins_cluster() and not output_dir.is_absolute():
            raise ConfigError(f"key 'output_dir': '{cfg.output_dir}' is relative; on a Ray cluster give an absolute "
                              "path on a filesystem every node sees (the job runs in a temporary copy of the working dir)")
        prompts, prompt_report = read_prompts(cfg.prompts_csv, cfg.datagen.filters, LengthPlanner.from_config(cfg))
        for line in prompt_report.summary_lines():
            log(line)
        if not prompts:
            raise ConfigError(f"prompts_csv '{cfg.prompts_csv}': no usable prompt ({prompt_report.rows} rows, "
                              f"{len(prompt_report.bad_rows)} bad, {sum(prompt_report.filtered.values())} filtered)")
        tasks = plan_shards(prompts, cfg.datagen.samples_per_shard)
        log(cost_line(cfg, length_histogram(cfg, tasks)))
        if args.check:  # what a cluster script runs before it starts any node: no side effects
            if cfg.pretrained_path is not None:
                check_pretrained_folder(cfg.pretrained_path, parts=("transformer", "vae", "text_encoder", "tokenizer"))
            check_free_disk(cfg, output_dir.resolve(), length_histogram(cfg, tasks))
            log(f"check: {len(prompts)} prompts in {len(tasks)} shard(s) for {output_dir.resolve()}: ok")
            return 0
        manifest, todo = open_output(output_dir.resolve(), cfg, tasks)
        check_free_disk(cfg, output_dir.resolve(), length_histogram(cfg, todo))
    except (ConfigError, ShardFormatError) as exc:
        print(f"gen_teacher: error: {exc}", file=sys.stderr)
        return 2
    output_dir = output_dir.resolve()
    total_samples = len(prompts)
    already = len(tasks) - len(todo)
    log(f"plan: {total_samples} prompts in {len(tasks)} shard(s) of <= {cfg.datagen.samples_per_shard}, one length "
        f"each; {already} already finished, {len(todo)} to write into {output_dir}")
    progress = Progress(len(tasks), already, total_samples, manifest.total_samples, cfg.datagen.progress_every_s,
                        todo_cost=sum(task_cost(cfg, t) for t in todo))
    outcome = Outcome()
    stop = StopRequest()
    if todo:
        log(connect_ray())
        stop.install()
        outcome = run_workers(cfg, output_dir, manifest, todo, progress, stop)
    complete = not outcome.failed_shards and len(manifest.shards) == len(tasks)
    status = "complete" if complete else "stopped" if stop.requested else "failed"
    report = {
        "status": status,
        "stop": ({"signal": stop.signal, "abandoned": outcome.abandoned_shards, "not_started": len(outcome.not_started)}
                 if stop.requested else None),
        "prompts": prompt_report.to_json(),
        "shards": {"planned": len(tasks), "already_done": already, "written": len(outcome.written),
                   "failed": outcome.failed_shards, "finished": len(manifest.shards)},
        "samples_in_finished_shards": manifest.total_samples,
        "length_histogram": {str(f): n for f, n in manifest.length_histogram.items()},
        "failed_attempts": [asdict(a) for a in outcome.failed_attempts],
        "written_shards": [{"shard": r.name, "attempt": r.attempt, "host": r.host, "node": r.node,
                            "seconds": round(r.seconds, 2)} for r in outcome.written],
        "retired_workers": outcome.retired_workers,
        "previews": sum(r.previews for r in outcome.written),
        "seconds": round(time.monotonic() - started, 2),
        "samples_per_s": round(progress.rate(), 3),
    }
    (output_dir / REPORT_NAME).write_text(json.dumps(report, indent=1))
    print_summary(report, prompt_report, output_dir)
    return 0 if complete else EXIT_STOPPED if stop.requested else EXIT_FAILED


def print_summary(report: dict[str, Any], prompt_report: PromptReport, output_dir: Path) -> None:
    s = report["shards"]
    log("summary")
    for line in prompt_report.summary_lines():
        log(f"  {line}")
    log(f"  shards: {s['planned']} planned, {s['already_done']} already done, {s['written']} written, "
        f"{len(s['failed'])} failed{' (' + ', '.join(s['failed']) + ')' if s['failed'] else ''}; "
        f"{report['samples_in_finished_shards']} samples in {s['finished']} finished shard(s)")
    for attempt in report["failed_attempts"]:
        log(f"  failed attempt: {attempt['shard']} #{attempt['attempt']}: {attempt['error']}")
    for worker in report["retired_workers"]:
        log(f"  retired {worker}")
    log(f"  time {report['seconds']:.1f} s, {report['samples_per_s']:.2f} samples/s, {report['previews']} preview(s); "
        f"report: {output_dir / REPORT_NAME}")
    if report["status"] == "stopped":
        abandoned = report["stop"]["abandoned"]
        log(f"stopped by {report['stop']['signal']}: {s['finished']}/{s['planned']} shard(s) finished and in the "
            f"manifest; {len(abandoned)} in flight abandoned{' (' + ', '.join(abandoned) + ')' if abandoned else ''}, "
            f"{report['stop']['not_started']} not started; rerun the same command to write the rest")
    else:
        log(f"status: {report['status']}")


if __name__ == "__main__":
    sys.exit(main())
