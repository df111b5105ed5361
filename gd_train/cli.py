"""`gd-train`: start, resume and inspect training runs.

    gd-train stage1 --config configs/stage1.yaml [--nproc N] [--dry-run] [KEY=VALUE ...]
    gd-train stage2 --config configs/stage2.yaml train.init_from=runs/stage1 [--nproc N] [KEY=VALUE ...]
    gd-train resume RUN_DIR [--nproc N] [--dry-run] [KEY=VALUE ...]
    gd-train ckpt ls RUN_DIR
    gd-train ckpt show RUN_DIR [--checkpoint TAG]
    gd-train ckpt export RUN_DIR [--checkpoint TAG] [--out DIR]

Everything that can be refused is refused here, in one line, before a process starts: the config,
the batch arithmetic for this launch's world size, the run folder's state, the checkpoint to resume
(present, complete — an incomplete latest falls back to the newest complete one, with a warning —
not of format v1; on any world size the global batch divides over), `train.init_from` adapters of
another LoRA rank, the shards (present, damaged ones under `data.on_damage=refuse`, latents of the
config's shape). Then every node hands over to `launch.local`: locally one node
of N processes; inside a SLURM allocation (one task per node under srun) the node's share of a
multi-node rendezvous derived from the allocation.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from gd_train.config import ConfigError, load_config

WORKER = ["-m", "gd_train.train.trainer"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gd-train", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def launch_options(q: argparse.ArgumentParser) -> None:
        q.add_argument("--nproc", type=int, default=None,
                       help="processes per node (default: the node's GPUs, or 1 on CPU)")
        q.add_argument("--local", action="store_true", help="one local node even inside a SLURM allocation")
        q.add_argument("--dry-run", action="store_true", help="print each node's command and exit")
        q.add_argument("--rdzv-port", "--master-port", type=int, default=None, dest="rdzv_port",
                       help="local runs: the torchrun rendezvous port (default: a free port no other local run "
                            "holds, from 10000-14999 or GD_TRAIN_PORT_RANGE=LO-HI); under SLURM it follows the job id")
        q.add_argument("--shutdown-timeout", type=int, default=None,
                       help="seconds workers get to checkpoint after a forwarded signal (default 110)")
        q.add_argument("overrides", nargs="*", help="config overrides KEY=VALUE (output_dir=..., train.max_steps=..., "
                                                     "train.checkpoint_every=..., data.shards=...)")

    for stage in ("stage1", "stage2"):
        q = sub.add_parser(stage, help=f"start {stage} training")
        q.add_argument("--config", required=True, help="YAML config, e.g. configs/stage1.yaml")
        launch_options(q)
    q = sub.add_parser("resume", help="continue a run from its latest complete checkpoint")
    q.add_argument("run_dir")
    launch_options(q)

    ckpt = sub.add_parser("ckpt", help="list, inspect or export checkpoints").add_subparsers(dest="ckpt_command", required=True)
    ls = ckpt.add_parser("ls", help="list a run's checkpoints")
    ls.add_argument("run_dir")
    for name, text in (("show", "print a checkpoint's manifest and contents"),
                       ("export", "copy a checkpoint's PEFT adapters (+ c_f projection) out of the run")):
        q = ckpt.add_parser(name, help=text)
        q.add_argument("run_dir")
        q.add_argument("--checkpoint", default=None, help="tag (e.g. step-00000100); default: latest")
        if name == "export":
            q.add_argument("--out", default=None, help="target folder (default RUN_DIR/export/TAG)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    from gd_train.checkpoint import CheckpointError
    from launch.rendezvous import RendezvousError

    parser = build_parser()
    # Overrides may come before and after options (`--nproc 2 KEY=V --dry-run KEY=V`), which a single
    # positional cannot take: collect the KEY=VALUE strays here.
    args, extra = parser.parse_known_args(argv)
    strays = [e for e in extra if e.startswith("-") or "=" not in e or not hasattr(args, "overrides")]
    if strays:
        parser.error(f"unrecognized arguments: {' '.join(strays)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        if args.command in ("stage1", "stage2"):
            return start(args)
        if args.command == "resume":
            return resume(args)
        return {"ls": ckpt_ls, "show": ckpt_show, "export": ckpt_export}[args.ckpt_command](args)
    except (ConfigError, CheckpointError, RendezvousError, FileNotFoundError) as exc:
        print(f"gd-train: error: {exc}", file=sys.stderr)
        return 2


# --------------------------------------------------------------------------------------------------
# Launching
# --------------------------------------------------------------------------------------------------
def _node_plans(args: argparse.Namespace):
    """(this node's plan or None for a dry run from outside the tasks, every node's plan)."""
    from launch.rendezvous import default_nproc, in_slurm, local_node, slurm_nodes, this_slurm_node

    nproc = args.nproc if args.nproc is not None else default_nproc()
    if nproc < 1:
        raise ConfigError(f"--nproc: expected >= 1, got {nproc}")
    if in_slurm() and not args.local:
        nodes = slurm_nodes(os.environ, nproc)
        mine = this_slurm_node(os.environ, nproc) if "SLURM_NODEID" in os.environ else None
        if mine is None and not args.dry_run:
            this_slurm_node(os.environ, nproc)  # raises: the launcher must run inside the tasks
        return mine, nodes
    if args.rdzv_port is not None and not 1024 <= args.rdzv_port <= 65535:
        raise ConfigError(f"--rdzv-port: expected a port in 1024-65535, got {args.rdzv_port}")
    node = local_node(nproc, rdzv_port=args.rdzv_port)
    return node, [node]


def _launch(args: argparse.Namespace, worker_argv: list[str], run_dir: Path) -> int:
    from gd_train.train.plan import PREEMPTED_FILE
    from launch.local import DEFAULT_SHUTDOWN_TIMEOUT_S, describe, run_node

    mine, nodes = args.plans
    timeout = args.shutdown_timeout or DEFAULT_SHUTDOWN_TIMEOUT_S
    if args.dry_run:
        for node in ([mine] if mine is not None else nodes):
            print(describe(node, worker_argv, timeout))
        return 0
    return run_node(mine, worker_argv, preempt_marker=run_dir / PREEMPTED_FILE, shutdown_timeout_s=timeout)


def start(args: argparse.Namespace) -> int:
    from gd_train import checkpoint
    from gd_train.train.plan import BatchPlan, validate_train_config

    stage = args.command
    cfg = load_config(args.config, [f"train.stage={stage}", *args.overrides])
    validate_train_config(cfg, command=stage)
    args.plans = _node_plans(args)
    world_size = args.plans[1][0].world_size
    BatchPlan.from_config(cfg.train, world_size)
    run_dir = Path(cfg.output_dir)
    if checkpoint.latest_tag(run_dir) is not None:
        raise ConfigError(f"key 'output_dir': {run_dir} already holds a run (checkpoint {checkpoint.latest_tag(run_dir)}); "
                          f"continue it with `gd-train resume {run_dir}` or choose another output_dir")
    if cfg.train.init_from is not None:
        checkpoint.check_adapter_specs(checkpoint.adapters_folder(cfg.train.init_from), cfg)
    if not args.dry_run:
        _check_data(cfg, world_size)  # one line now, not a traceback per rank later
    worker = [*WORKER, "--run-dir", str(run_dir), "--stage", stage, "--config", args.config, *args.overrides]
    return _launch(args, worker, run_dir)


def _check_data(cfg, world_size: int) -> None:
    """The shards against the config and this launch, before any rank starts: present, their damage
    under `data.on_damage=refuse` (one line per problem, then the refusal), the latent shape."""
    from gd_train.data.reader import check_batches, check_latent_shape, discover_shards, refuse_damaged

    shards, problems = discover_shards(cfg.data.shards)
    refuse_damaged({}, cfg.data.on_damage)  # the value itself
    if problems and cfg.data.on_damage == "refuse":
        for line in problems.values():
            print(f"gd-train: damaged data: {line}", file=sys.stderr)
        raise ConfigError(f"key 'data.on_damage': refuse, and {len(problems)} shard(s) of data.shards are damaged "
                          f"or missing (listed above); restore or regenerate them, or set data.on_damage=continue "
                          f"to train on the rest")
    check_latent_shape(cfg, shards)
    check_batches(cfg, shards, world_size)  # each length's global batch on this world size


def resume(args: argparse.Namespace) -> int:
    from gd_train import checkpoint
    from gd_train.train.plan import BatchPlan, load_run_config

    run_dir = Path(args.run_dir)
    folder = checkpoint.resolve(run_dir, warn=lambda line: print(f"gd-train: warning: {line}", file=sys.stderr))
    cfg = load_run_config(run_dir, None, None, True, args.overrides)
    args.plans = _node_plans(args)
    world_size = args.plans[1][0].world_size
    # Any world size resumes (per-parameter state, a global data position); the global batch must
    # still divide over it (one line from BatchPlan), and a v1 checkpoint is refused.
    checkpoint.check_resumable(folder, checkpoint.Manifest.read(folder))
    BatchPlan.from_config(cfg.train, world_size, resuming=True)
    if not args.dry_run:
        _check_data(cfg, world_size)
    worker = [*WORKER, "--run-dir", str(run_dir), "--resume", *args.overrides]
    return _launch(args, worker, run_dir)


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------
def _checkpoint_folder(run_dir: str, tag: Optional[str]) -> Path:
    from gd_train import checkpoint

    return checkpoint.resolve(checkpoint.checkpoints_dir(run_dir) / tag if tag else run_dir)


def ckpt_ls(args: argparse.Namespace) -> int:
    from gd_train import checkpoint

    listing = checkpoint.list_checkpoints(args.run_dir)
    if not listing:
        print(f"{args.run_dir}: no checkpoints")
        return 0
    print(f"{'':2}{'tag':<16}{'step':>8}{'epoch':>7}{'samples':>10}{'ranks':>7}  {'reason':<10}{'size':>10}  created")
    for item in listing:
        mark = "* " if item.is_latest else "  "
        m = item.manifest
        if m is None:
            print(f"{mark}{item.tag:<16}{'(incomplete: ignored)':>32}{'':>19}{item.size_bytes / 2**20:>8.1f}MB")
            continue
        print(f"{mark}{item.tag:<16}{m.step:>8}{m.epoch:>7}{m.samples_seen:>10}{m.world_size:>7}  {m.reason:<10}"
              f"{item.size_bytes / 2**20:>8.1f}MB  {m.created}")
    return 0


def ckpt_show(args: argparse.Namespace) -> int:
    from gd_train import checkpoint

    folder = _checkpoint_folder(args.run_dir, args.checkpoint)
    manifest = checkpoint.Manifest.read(folder)
    print(f"checkpoint {folder}")
    print(manifest.to_json())
    data = _data_counters(folder)
    if data:
        print("data damage (all ranks): " + ", ".join(f"{k} {v}" for k, v in data.items()))
    position = _reader_position(folder)
    if position:
        print(position)
    adapters = folder / checkpoint.ADAPTERS_DIR
    for name in ("etm", "sdd"):
        config_path = adapters / name / "adapter_config.json"
        if config_path.is_file():
            peft_cfg = json.loads(config_path.read_text())
            print(f"adapter {name}: rank {peft_cfg.get('r')}, alpha {peft_cfg.get('lora_alpha')}, "
                  f"targets {sorted(peft_cfg.get('target_modules') or [])}")
    training = folder / checkpoint.TRAINING_FILE
    if manifest.format == checkpoint.FORMAT_V1:
        print(f"trainable state: only in DeepSpeed's pickled files ({checkpoint.FORMAT_V1}): not resumable; its "
              f"adapters can start a new run (train.init_from)")
    elif training.is_file():
        meta = json.loads(training.read_text())
        trained = [p for p in meta["params"].values() if p["step"] is not None]
        steps = "/".join(str(s) for s in sorted({p["step"] for p in trained})) or "-"
        print(f"trainable state: {len(meta['params'])} weights, {len(trained)} with AdamW moments (step {steps}), "
              f"written by {meta['world_size']} rank(s) under ZeRO-{meta['zero_stage']}; resumes on any world size "
              f"and ZeRO stage")
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        print(f"  {path.relative_to(folder)}  {path.stat().st_size} bytes")
    return 0


def _reader_position(folder: Path) -> str:
    """The reader's position as rank 0 saved it (global: the same on every rank, any world size continues it)."""
    from gd_train import checkpoint

    path = folder / checkpoint.TRAINER_DIR / "rank-00000.json"
    state = json.loads(path.read_text()).get("reader", {}) if path.is_file() else {}
    if "steps_consumed" not in state:
        return ""
    upcoming = state.get("next_latent_frames")
    buckets = ", ".join(f"F={f}: {n}" for f, n in sorted(state.get("bucket_steps", {}).items(), key=lambda kv: int(kv[0])))
    return (f"data position: epoch {state['epoch']}, {state['steps_consumed']} of {state['steps_in_epoch']} steps "
            f"consumed (saved by {state.get('world_size', '?')} rank(s))"
            + (f", next step: {upcoming} latent frames" if upcoming is not None else ", epoch complete")
            + f"; steps per epoch by length (latent frames): {buckets}")


def _data_counters(folder: Path) -> dict[str, int]:
    """The readers' damage counters in a checkpoint's per-rank trainer states, summed over ranks (shards
    left out at start are the same on every rank: counted once)."""
    from gd_train import checkpoint

    states = [json.loads(p.read_text()).get("reader", {})
              for p in sorted((folder / checkpoint.TRAINER_DIR).glob("rank-*.json"))]
    if not states:
        return {}
    out = {"skipped_shards": max(len(s.get("skipped_shards", [])) for s in states),
           "broken_shards": len({p for s in states for p in s.get("corrupt_shards", [])}
                                - {p for s in states for p in s.get("skipped_shards", [])})}
    for key in ("corrupt_samples", "repeated_samples"):
        out[key] = sum(int(s.get("counters", {}).get(key, 0)) for s in states)
    return out


def ckpt_export(args: argparse.Namespace) -> int:
    from gd_train import checkpoint

    folder = _checkpoint_folder(args.run_dir, args.checkpoint)
    out = Path(args.out) if args.out else Path(args.run_dir) / "export" / folder.name
    checkpoint.export(folder, out)
    print(f"exported {folder.name} to {out}: etm/ and sdd/ (PEFT: adapter_model.safetensors + adapter_config.json), "
          f"cf_proj.safetensors")
    print(f"  plain peft:  PeftModel.from_pretrained(WanTransformer3DModel(...), '{out}/sdd', adapter_name='sdd')")
    print(f"  gd-generate: gd-generate --adapters {out} ...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
