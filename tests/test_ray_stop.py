"""`ray job stop` on the teacher-data job (issue 10, item 6), on a real local Ray head: Ray's job
supervisor sends the driver SIGTERM (then SIGKILL after RAY_JOB_STOP_WAIT_TIME_S); the driver stops
handing out shards, abandons the ones in flight, and leaves a tidy folder — a closing line, the
report with status "stopped", the manifest listing exactly the shard files present, no partial files.
The same command again then writes the rest, each prompt exactly once."""

from __future__ import annotations

import json
import subprocess
import time
from collections import Counter

import pytest

from datagen_utils import REPO_ROOT, write_prompts_csv
from launch.ray_head import LocalRayHead, ray_env, session_members
from gd_train.data.shards import Manifest, file_sha256

pytestmark = pytest.mark.slow

import sys  # noqa: E402

sys.path.insert(0, str(REPO_ROOT))
from data_pipeline import gen_teacher  # noqa: E402
from test_gen_teacher import all_samples, command, job_output  # noqa: E402

# The SIGKILL deadline, raised from Ray's 3 s so that a loaded test machine cannot turn a stop into a kill.
RUNTIME_ENV = json.dumps({"env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": "30"}})


def ray(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["ray", "job", *args], env=ray_env(), capture_output=True, text=True, timeout=timeout,
                          cwd=REPO_ROOT)


def test_ray_job_stop_leaves_a_tidy_folder_and_a_rerun_completes_exactly_once(tmp_path):
    csv = tmp_path / "prompts.csv"
    expected, _ = write_prompts_csv(csv)
    out = tmp_path / "shards"
    # 12 shards for 2 workers: a stop sent once the first is finished finds others in flight and queued.
    # 40 sampling steps (the tiny default has 4): at 4 the whole job took ~3 s of sampling, and on a
    # loaded machine (the suite on 2 xdist workers) it finished before `ray job stop` had started.
    job = command(csv, out, "datagen.samples_per_shard=3", "datagen.num_inference_steps=40")
    with LocalRayHead(num_cpus=2) as head:
        submit = subprocess.Popen(head.submit_command(job, options=["--submission-id", "stop-me", "--runtime-env-json",
                                                                    RUNTIME_ENV, "--no-wait"]),
                                  env=ray_env(), cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True)
        assert submit.wait(timeout=120) == 0, submit.stdout.read()
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:  # stop once a shard is finished and others are under way
            manifest = Manifest.load(out) if (out / "manifest.json").is_file() else None
            if manifest is not None and manifest.shards:
                break
            time.sleep(0.2)
        stopped = ray("stop", "--address", head.dashboard, "stop-me")
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        status = ray("status", "--address", head.dashboard, "stop-me").stdout
        logs = ray("logs", "--address", head.dashboard, "stop-me").stdout
        assert "was stopped" in status, status

        assert "SIGTERM: stopping: no new shards" in logs, logs[-4000:]
        closing = [line for line in logs.splitlines() if "stopped by SIGTERM" in line]
        assert closing and "rerun the same command to write the rest" in closing[0], logs[-4000:]
        report = json.loads((out / gen_teacher.REPORT_NAME).read_text())
        assert report["status"] == "stopped" and report["stop"]["signal"] == "SIGTERM"
        manifest = Manifest.load(out)
        on_disk = sorted(p.name for p in out.glob("shard-*.tar"))
        assert on_disk == sorted(manifest.shards) and report["shards"]["finished"] == len(on_disk) < 12
        stop = report["stop"]
        # The ones in flight are cut off (none when the stop lands between two shards: the job is fast
        # on an idle machine); no abandoned shard is visible as a file.
        assert not set(stop["abandoned"]) & set(on_disk)
        assert len(on_disk) + len(stop["abandoned"]) + stop["not_started"] == 12
        for name, record in manifest.shards.items():  # every listed shard complete and as recorded
            assert record.sha256 == file_sha256(out / name)
        assert not list(out.glob("*.partial"))

        rerun = head.submit(job)
        assert rerun.returncode == 0, job_output(rerun)
        assert f"{len(on_disk)} already finished, {12 - len(on_disk)} to write" in rerun.stdout
    report = json.loads((out / gen_teacher.REPORT_NAME).read_text())
    assert report["status"] == "complete" and report["stop"] is None
    counts = Counter(s.key for s in all_samples(out))
    assert set(counts) == set(expected) and set(counts.values()) == {1}
    assert len(Manifest.load(out).shards) == 12


def test_sigint_on_a_direct_run_exits_with_the_stopped_status(tmp_path):
    """Ctrl-C on a run without a cluster: the same tidy stop, exit status 3 (documented in docs/data.md)."""
    csv = tmp_path / "prompts.csv"
    write_prompts_csv(csv)
    out = tmp_path / "shards"
    proc = subprocess.Popen(["python", "data_pipeline/gen_teacher.py", "--config", "configs/datagen.yaml",
                             f"prompts_csv={csv}", f"output_dir={out}", "datagen.num_workers=1",
                             "datagen.samples_per_shard=2", "datagen.filters.max_prompts=6",
                             "datagen.stop_wait_s=60", "datagen.lengths.mode=fixed"],  # 3 shards of 2
                            cwd=REPO_ROOT, env=ray_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not list(out.glob("*.partial")):  # a shard under way
            time.sleep(0.1)
        proc.send_signal(2)
        output, _ = proc.communicate(timeout=120)
    finally:
        for pid in session_members(proc.pid):  # the private Ray instance ends with the driver; make sure
            subprocess.run(["kill", "-9", str(pid)], check=False)
    assert proc.returncode == gen_teacher.EXIT_STOPPED == 3, output[-4000:]
    # datagen.stop_wait_s: the shard in flight was finished, not abandoned.
    report = json.loads((out / gen_teacher.REPORT_NAME).read_text())
    assert report["status"] == "stopped" and report["stop"]["signal"] == "SIGINT", output[-3000:]
    assert report["stop"]["abandoned"] == [] and report["stop"]["not_started"] == 3 - report["shards"]["finished"]
    assert sorted(p.name for p in out.glob("shard-*.tar")) == sorted(Manifest.load(out).shards)
    assert report["shards"]["finished"] >= 1 and not list(out.glob("*.partial"))
