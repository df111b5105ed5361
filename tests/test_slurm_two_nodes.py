"""`sbatch --nodes=2 slurm/stage1.sh` for real, on a two-node SLURM cluster on this machine (two `slurmd -N`,
tests/slurm/local_cluster.sh with SLURM_LOCAL_NODES=2): one launcher per node through srun, the
rendezvous derived from the allocation (first node, port from the job id), one CPU rank per node.

One run goes through both things a multi-node job meets:
1. SLURM's pre-emption warning (USR1 to the job's steps): both nodes checkpoint at the same step, the
   script requeues the job, the requeued job resumes on both nodes;
2. a node lost mid-step (node 2's launcher killed with its whole process group): node 1's ranks exit
   within a bounded time (a peer's closed sockets fail the gloo collective), the job ends FAILED; the
   same job script resubmitted resumes from the last complete checkpoint, and the steps that were run
   before the loss are run again with bit-identical losses; every sample of every epoch is trained on
   exactly once.
Skipped, with the reason, only where the cluster cannot be installed or started."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurm_utils import FINISHED, cluster_for_module, job, job_processes, kill_process_group, launcher_pid, sbatch, wait_until
from train_utils import REPO_ROOT, TINY_STAGE1, latest, metrics, trace, write_tiny_shards

STEPS = 8  # 16 samples, 4 per step (1 x 2 accumulation x 2 ranks), 2 epochs
NODE_EXIT_BOUND_S = 60  # node 1's ranks must be gone this soon after node 2 died


@pytest.fixture(scope="module")
def cluster():
    yield from cluster_for_module(nodes=2)


def _steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    return [r["step"] for r in metrics(run_dir)] if path.is_file() else []


def _submit(env, tmp_path: Path, shards: Path) -> str:
    return sbatch(["--nodes=2", "--gpus-per-node=0", f"--output={tmp_path}/job-%j.log", "slurm/stage1.sh",
                   f"data.shards={shards}", "train.epochs=2", "train.checkpoint_every=2", "train.trace=true"], env)


def test_two_nodes_preempted_requeued_then_a_node_lost_and_resumed(cluster, tmp_path):
    env = dict(cluster)
    keys = write_tiny_shards(tmp_path / "shards", 16, samples_per_shard=4)
    run_dir = tmp_path / "run"
    env.update({"RUN_DIR": str(run_dir), "CONFIG": TINY_STAGE1, "NPROC_PER_NODE": "1", "PYTHON": sys.executable})
    job_id = _submit(env, tmp_path, tmp_path / "shards")
    log = tmp_path / f"job-{job_id}.log"
    tail = lambda: log.read_text()[-4000:] if log.is_file() else "(no log yet)"  # noqa: E731
    jobs = [job_id]
    timeline: dict[str, float] = {}
    try:
        # --- 1. pre-emption warning -> checkpoint -> requeue -> resume on both nodes
        wait_until(lambda: len(_steps(run_dir)) >= 1, 400, lambda: f"training did not start:\n{tail()}", poll_s=0.2)
        on_node = {n: job_processes(job_id, n, "gd_train.train.trainer") for n in (0, 1)}
        assert on_node[0] and on_node[1], f"a rank on each node, got {on_node}"
        timeline["signal"] = time.time()
        subprocess_run(["scancel", "--signal=USR1", job_id], env)
        marker = run_dir / "preempted.json"
        stopped_at = wait_until(lambda: marker.is_file() and json.loads(marker.read_text() or "{}").get("step"),
                                120, lambda: f"no pre-emption checkpoint:\n{tail()}", poll_s=0.02)
        timeline["checkpointed"] = marker.stat().st_mtime
        wait_until(lambda: job(job_id, env).get("Restarts") == "1", 120, lambda: f"not requeued:\n{tail()}", poll_s=0.05)
        timeline["requeued"] = time.time()
        wait_until(lambda: job(job_id, env).get("JobState") == "RUNNING", 120, lambda: f"not restarted:\n{tail()}")
        timeline["running_again"] = time.time()
        wait_until(lambda: any(s > stopped_at for s in _steps(run_dir)), 300,
                   lambda: f"no step after the resume:\n{tail()}", poll_s=0.05)
        timeline["first_new_step"] = (run_dir / "metrics.jsonl").stat().st_mtime
        on_node = {n: job_processes(job_id, n, "gd_train.train.trainer") for n in (0, 1)}
        assert on_node[0] and on_node[1], f"the requeued job runs a rank on each node again, got {on_node}"

        # --- 2. a node lost mid-step: after a periodic checkpoint of the resumed run and a step past it
        def past_a_checkpoint():
            tag = latest(run_dir)
            step = int(tag.split("-")[1]) if tag else 0
            return step > stopped_at and max(_steps(run_dir), default=0) > step and step
        checkpoint_step = wait_until(past_a_checkpoint, 300, lambda: f"no checkpoint after the resume:\n{tail()}",
                                     poll_s=0.05)
        before_loss = {r["step"]: r["loss"] for r in metrics(run_dir)}
        assert max(before_loss) < STEPS, "the run finished before a node could be lost; give it more steps"
        node1, node2 = launcher_pid(job_id, 0), launcher_pid(job_id, 1)
        assert node1 and node2, "a launcher task on each node"
        node1_ranks = job_processes(job_id, 0, "gd_train.train.trainer")
        timeline["node2_killed"] = time.time()
        kill_process_group(node2)
        wait_until(lambda: not any(Path(f"/proc/{p}").exists() for p in [node1, *node1_ranks]), NODE_EXIT_BOUND_S,
                   lambda: f"node 1's ranks still running {NODE_EXIT_BOUND_S} s after node 2 died:\n{tail()}",
                   poll_s=0.05)
        timeline["node1_exited"] = time.time()
        state = wait_until(lambda: (s := job(job_id, env)).get("JobState") in FINISHED and s, 120,
                           lambda: f"job {job_id} did not end:\n{tail()}")
        timeline["job_ended"] = time.time()
        assert state["JobState"] == "FAILED" and state["ExitCode"] != "0:0", state
        text = log.read_text()
        assert "pre-empted after a complete checkpoint" in text
        assert f"without a pre-emption checkpoint; last complete checkpoint: step-{checkpoint_step:08d}" in text

        # --- 3. the same script resubmitted continues from the last complete checkpoint
        second = _submit(env, tmp_path, tmp_path / "shards")
        jobs.append(second)
        log2 = tmp_path / f"job-{second}.log"
        final = wait_until(lambda: (s := job(second, env)).get("JobState") in FINISHED and s, 400,
                           lambda: f"resubmitted job did not finish:\n{log2.read_text()[-4000:] if log2.is_file() else ''}")
    finally:
        for j in jobs:
            subprocess_run(["scancel", j], env, check=False)
    text2 = log2.read_text()
    assert (final["JobState"], final["ExitCode"]) == ("COMPLETED", "0:0"), text2[-4000:]
    assert f"gd-train resume {run_dir}" in text2 and f"resuming after step {checkpoint_step}" in text2

    after = {r["step"]: r["loss"] for r in metrics(run_dir)}
    assert sorted(after) == list(range(1, STEPS + 1))
    rerun = [s for s in before_loss if s > checkpoint_step]
    assert rerun, "no step ran between the checkpoint and the loss"
    assert [after[s] for s in rerun] == [before_loss[s] for s in rerun]  # bit-identical, not approximately
    assert all(after[s] == before_loss[s] for s in before_loss if s <= checkpoint_step)
    # Across the three segments, every sample of every epoch was trained on exactly once.
    records = [r for rank in trace(run_dir).values() for r in rank]
    for epoch in range(2):
        seen = sorted(k for r in records if r["epoch"] == epoch for k in r["keys"])
        assert seen == sorted(keys), f"epoch {epoch}"
    assert json.loads((run_dir / "checkpoints" / f"step-{STEPS:08d}" / "checkpoint.json").read_text())["world_size"] == 2

    t = timeline
    print(f"\ntwo-node requeue cycle: signal -> checkpoint {t['checkpointed'] - t['signal']:.1f} s, -> requeued "
          f"{t['requeued'] - t['signal']:.1f} s, -> running again {t['running_again'] - t['signal']:.1f} s, -> first new "
          f"step {t['first_new_step'] - t['signal']:.1f} s; node 2 killed -> node 1 exited "
          f"{t['node1_exited'] - t['node2_killed']:.1f} s, -> job FAILED {t['job_ended'] - t['node2_killed']:.1f} s")


def subprocess_run(cmd: list[str], env: dict[str, str], check: bool = True) -> None:
    subprocess.run(cmd, check=check, env=env, timeout=30, capture_output=not check, cwd=REPO_ROOT)
