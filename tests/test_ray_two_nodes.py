"""A two-node Ray cluster on this machine, no SLURM: a head (`LocalRayHead`) and a second node joined with
`ray start --address` (`launch.ray_node.LocalRayNode`: its own session, resources and ports, every one it
listens on from its block). The teacher-data job (`ray job submit` of data_pipeline/gen_teacher.py) writes
shards on both nodes; the second node, killed as a whole (every process of it, SIGKILL) inside a shard, is
reported DEAD by the head, its shard is retried on the head, and the job completes with every valid prompt
exactly once — three rounds, a fresh node each."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
import webdataset as wds

from datagen_utils import write_prompts_csv
from gd_train.data.shards import decode_sample
from launch.ray_head import REPO_ROOT, LocalRayHead, ray_env
from launch.ray_node import LocalRayNode, alive_nodes
from ray_utils import Paused, attempts_seen, running
from test_ports import listening_ports

pytestmark = pytest.mark.slow

# Ray's defaults take ~16 s to call a silent node dead (5 missed health checks, 3 s apart).
FAST_NODE_DEATH = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3",
                   "RAY_health_check_timeout_ms": "1000"}


@pytest.fixture(scope="module")
def head():
    saved = {k: os.environ.get(k) for k in FAST_NODE_DEATH}
    os.environ.update(FAST_NODE_DEATH)  # the head's GCS reads them at start (ray_env copies os.environ)
    try:
        head = LocalRayHead(num_cpus=1).start()
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    yield head
    head.stop()


# --------------------------------------------------------------------------------------------------
# The data job on two nodes, and the worker node lost mid-shard (issue 13)
# --------------------------------------------------------------------------------------------------
ROUNDS = 3
# 9 prompts, 3 shards of 3 (~0.5-1 s each here): the node writes one and is killed inside the next; the
# head writes the rest. One clip length (the tiny default mixes three): a one-sample shard of the
# shortest would be over before the kill lands.
PROMPTS = 9
DATA_JOB = ["datagen.samples_per_shard=3", "datagen.num_inference_steps=8", "datagen.num_workers=2",
            "datagen.lengths.mode=fixed", "datagen.progress_every_s=1"]


def _data_job_losing_the_node(head: LocalRayHead, csv: Path, out: Path, log: Path) -> dict:
    """One round: a fresh second node, the job submitted; the node killed as a whole once its actor has
    written a shard and is inside its next one. Until then an attempt of the head's actor has its process
    paused (tests/ray_utils.py: else the first actor up may write every shard). Returns what was seen."""
    t = {"start": time.monotonic()}
    entry = ["python", "data_pipeline/gen_teacher.py", "--config", "configs/datagen.yaml", f"prompts_csv={csv}",
             f"output_dir={out}", *DATA_JOB]
    node = LocalRayNode(head, num_cpus=1, resources={"gd_second_node": 1})
    with open(log, "w") as fh:  # the driver starts while the node does; one actor waits for the node
        job = subprocess.Popen(head.submit_command(entry), env=ray_env(), stdout=fh, stderr=subprocess.STDOUT,
                               cwd=REPO_ROOT)
    seen: dict[tuple[str, int], int] = {}
    try:
        with Paused() as paused:
            node.start()
            t["node_up"] = time.monotonic()
            joined = next(n for n in alive_nodes(head) if n["node_id"] == node.node_id)
            assert joined["resources_total"].get("gd_second_node") == 1  # its own resources
            deadline = time.monotonic() + 240
            while True:
                assert job.poll() is None and time.monotonic() < deadline, \
                    f"the node's actor never started a second shard:\n{log.read_text()[-4000:]}"
                attempts_seen(out, seen)
                node_pids = set(node.pids())
                on_node = [k for k, pid in seen.items() if pid in node_pids]  # in the order they started
                if len(on_node) >= 2:
                    break
                for pid in set(seen.values()) - node_pids:
                    paused.pause(pid)
                time.sleep(0.05)
            t["paused_head_actor"] = bool(paused.pids)
            # Every port the node listens on (raylet, agents, metrics, its workers) is from its block.
            assert listening_ports(node_pids) <= set(node.block.ports), (listening_ports(node_pids), node.block)
            killed_at = t["killed"] = time.monotonic()
            node.kill()
        dead_at = None
        retry = (on_node[-1][0], on_node[-1][1] + 1)
        while job.poll() is None:
            attempts_seen(out, seen)
            if retry in seen and "retry_started" not in t:
                t["retry_started"] = time.monotonic()
            if dead_at is None and not any(n["node_id"] == node.node_id for n in alive_nodes(head)):
                dead_at = time.monotonic()
            assert time.monotonic() < deadline + 180, f"the job did not end:\n{log.read_text()[-4000:]}"
            time.sleep(0.05)
        done_at = time.monotonic()
    finally:
        node.stop()
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, log.read_text()[-4000:]
    assert not [pid for pid in node_pids if running(pid)], "a process of the killed node survived"
    while dead_at is None and any(n["node_id"] == node.node_id for n in alive_nodes(head)):
        assert time.monotonic() - killed_at < 60, "the head still counts the killed node alive after 60 s"
        time.sleep(0.1)
    dead_at = dead_at or time.monotonic()
    return {"seen": seen, "node_pids": node_pids, "lost": on_node[-1], "written_on_node": on_node[:-1],
            "node_id": node.node_id, "dead_s": dead_at - killed_at, "done_s": done_at - killed_at,
            "t": {k: (round(v - t["start"], 1) if isinstance(v, float) else v) for k, v in t.items()}}


def test_data_job_lands_on_both_nodes_and_a_node_lost_mid_shard_is_retried_on_the_survivor(head, tmp_path):
    csv = tmp_path / "prompts.csv"
    expected, _ = write_prompts_csv(csv, valid=PROMPTS)
    head_node = next(n["node_id"] for n in alive_nodes(head) if "node:__internal_head__" in n["resources_total"])
    rounds = [_data_job_losing_the_node(head, csv, tmp_path / f"round{i}", tmp_path / f"job{i}.log")
              for i in range(ROUNDS)]
    for round_, r in enumerate(rounds):
        out, log = tmp_path / f"round{round_}", tmp_path / f"job{round_}.log"
        text, (lost_shard, lost_attempt) = log.read_text(), r["lost"]
        assert re.search(rf"{re.escape(lost_shard)} attempt {lost_attempt}/3 failed \(worker \d died: ", text), text
        report = json.loads((out / "gen_teacher_report.json").read_text())
        assert report["status"] == "complete" and report["shards"]["failed"] == [], report
        assert [(a["shard"], a["attempt"], a["node"]) for a in report["failed_attempts"]] == \
            [(lost_shard, lost_attempt, r["node_id"])], report
        # Written on both nodes (the report's Ray node id per shard): the node's earlier shards by it, the
        # lost one retried on the survivor, the head.
        writers = {w["shard"]: (w["attempt"], w["node"]) for w in report["written_shards"]}
        assert sorted(writers) == sorted(json.loads((out / "manifest.json").read_text())["shards"])
        assert r["written_on_node"] and all(writers[s] == (a, r["node_id"]) for s, a in r["written_on_node"])
        assert writers[lost_shard] == (lost_attempt + 1, head_node)
        assert r["seen"][(lost_shard, lost_attempt + 1)] not in r["node_pids"]
        # Every valid prompt exactly once, read back from the tars; no partial file left; every tar is a
        # finished shard of the manifest.
        tars = wds.tarfile_samples([{"url": str(p)} for p in sorted(out.glob("shard-*.tar"))])
        counts = Counter(decode_sample(raw).key for raw in tars)
        assert set(counts) == set(expected) and set(counts.values()) == {1}
        assert not list(out.glob("*.partial"))
        manifest = json.loads((out / "manifest.json").read_text())
        assert sorted(p.name for p in out.glob("shard-*.tar")) == sorted(manifest["shards"])
        t = r["t"]
        print(f"\nround {round_}: node killed in {lost_shard} at {t['killed']:.1f} s (node up {t['node_up']:.1f} s, "
              f"head's actor paused: {t['paused_head_actor']}); after the kill: reported dead {r['dead_s']:.1f} s, retry "
              f"started {t.get('retry_started', float('nan')) - t['killed']:.1f} s, job complete {r['done_s']:.1f} s")
