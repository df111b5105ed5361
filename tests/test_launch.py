"""Launch planning under a (fake) 8-node SLURM allocation: every node derives the same rendezvous —
MASTER_ADDR = the allocation's first host, a port from the job id — and its own node rank."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from launch.rendezvous import RendezvousError, expand_hostlist, port_for_job
from train_utils import REPO_ROOT, cli_env

FAKE_ALLOCATION = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu-a[07-09,11],gpu-b[001-004]",
                   "SLURM_JOB_NUM_NODES": "8", "SLURM_NNODES": "8", "SLURM_GPUS_ON_NODE": "8"}
HOSTS = ["gpu-a07", "gpu-a08", "gpu-a09", "gpu-a11", "gpu-b001", "gpu-b002", "gpu-b003", "gpu-b004"]
LINE = re.compile(r"^node (\d+)/8 \(slurm, master ([\w-]+):(\d+)\): .*torchrun (.*)$")


def _dry_run(*args: str, extra_env: dict[str, str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in cli_env().items() if not k.startswith("SLURM_")}
    env.update(extra_env)
    return subprocess.run([sys.executable, "-m", "gd_train.cli", *args, "--dry-run"], capture_output=True, text=True,
                          cwd=REPO_ROOT, env=env, timeout=120)


def test_dry_run_prints_every_nodes_command_with_one_rendezvous(tmp_path):
    proc = _dry_run("stage1", "--config", "configs/stage1.yaml", "pretrained_path=null", f"output_dir={tmp_path / 'run'}",
                    extra_env=FAKE_ALLOCATION)
    assert proc.returncode == 0, proc.stderr
    lines = [m for m in map(LINE.match, proc.stdout.splitlines()) if m]
    assert len(lines) == 8, proc.stdout
    assert sorted(int(m.group(1)) for m in lines) == list(range(8))
    assert {(m.group(2), int(m.group(3))) for m in lines} == {("gpu-a07", port_for_job(4242))}
    for m in lines:
        command = m.group(4)
        assert f"--node-rank={m.group(1)}" in command and "--nnodes=8" in command and "--nproc-per-node=8" in command
        assert f"--master-addr=gpu-a07 --master-port={port_for_job(4242)}" in command
        assert "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" in command
        assert command.endswith(f"-m gd_train.train.trainer --run-dir {tmp_path / 'run'} --stage stage1 "
                                f"--config configs/stage1.yaml pretrained_path=null output_dir={tmp_path / 'run'}")
    assert not (tmp_path / "run").exists()  # a dry run writes nothing


def test_inside_a_task_the_node_rank_comes_from_slurm_nodeid(tmp_path):
    for node in (0, 5):
        proc = _dry_run("stage1", "--config", "configs/stage1.yaml", "pretrained_path=null", f"output_dir={tmp_path / 'run'}",
                        extra_env={**FAKE_ALLOCATION, "SLURM_NODEID": str(node)})
        lines = [m for m in map(LINE.match, proc.stdout.splitlines()) if m]
        assert [int(m.group(1)) for m in lines] == [node], proc.stdout + proc.stderr


def test_paper_batch_is_refused_on_a_world_it_does_not_divide(tmp_path):
    proc = _dry_run("stage1", "--config", "configs/stage1.yaml", "pretrained_path=null", f"output_dir={tmp_path / 'run'}",
                    extra_env={**FAKE_ALLOCATION, "SLURM_GPUS_ON_NODE": "6"})
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("gd-train: error: key 'train.global_batch_size': 1024 is not divisible by "
                                   "train.micro_batch_size 1 x world size 48 = 48 (global = micro x accumulation x "
                                   "world; e.g. train.global_batch_size=1008)")


def test_a_real_launch_outside_the_tasks_is_refused(tmp_path):
    env = {k: v for k, v in cli_env().items() if not k.startswith("SLURM_")}
    env.update(FAKE_ALLOCATION)
    proc = subprocess.run([sys.executable, "-m", "gd_train.cli", "stage1", "--config", "configs/tiny/stage1.yaml",
                           f"output_dir={tmp_path / 'run'}"], capture_output=True, text=True, cwd=REPO_ROOT, env=env,
                          timeout=120)
    assert proc.returncode == 2 and "SLURM_NODEID is not set" in proc.stderr


def test_hostlist_expansion():
    assert expand_hostlist(FAKE_ALLOCATION["SLURM_JOB_NODELIST"]) == HOSTS
    assert expand_hostlist("vm") == ["vm"]
    assert expand_hostlist("n[1-2]-ib[0-1]") == ["n1-ib0", "n1-ib1", "n2-ib0", "n2-ib1"]
    with pytest.raises(RendezvousError, match="cannot read range 'x'"):
        expand_hostlist("n[x]")
    assert port_for_job("4242") == port_for_job(4242) and 15000 <= port_for_job(987654321) < 30000


@pytest.mark.skipif(shutil.which("scontrol") is None, reason="SLURM clients (scontrol) are not installed")
def test_hostlist_expansion_matches_scontrol(tmp_path):
    conf = tmp_path / "slurm.conf"  # `show hostnames` only parses; any valid config will do
    conf.write_text("ClusterName=x\nSlurmctldHost=localhost\nNodeName=localhost\nPartitionName=p Nodes=localhost\n")
    for nodelist in (FAKE_ALLOCATION["SLURM_JOB_NODELIST"], "n[1-2]-ib[0-1]", "a1,b[3-5],c"):
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30,
                             env={**os.environ, "SLURM_CONF": str(conf)})
        if out.returncode != 0:
            pytest.skip(f"scontrol show hostnames failed here: {out.stderr.strip()}")
        assert expand_hostlist(nodelist) == out.stdout.split()
