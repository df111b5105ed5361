"""CPU ranks give freed large blocks back to the OS (gd_train/train/host_memory.py): the glibc setting
that removed ZeRO-3's excess resident memory over ZeRO-2 (BENCHMARKS.md, "ZeRO-2 vs ZeRO-3")."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from gd_train.config import ConfigError, load_config
from gd_train.train.host_memory import fix_mmap_threshold
from gd_train.train.plan import validate_train_config
from train_utils import REPO_ROOT

# The pattern of ZeRO-3's gathers: a block is freed (glibc's adaptive threshold rises past the buffers'
# size), then ten 20 MiB buffers are filled while one more stays alive above them, then the ten are freed.
PATTERN = """
import os, sys, psutil, torch
from gd_train.train.host_memory import fix_mmap_threshold
threshold = None if sys.argv[1] == "none" else int(sys.argv[1])
applied = fix_mmap_threshold(threshold, torch.device("cpu"))
rss = lambda: psutil.Process().memory_info().rss
n = 5 * 2**20  # 20 MiB of float32
first = torch.ones(n + 2**20); del first
buffers = [torch.ones(n) for _ in range(10)]
keep = torch.ones(n)
peak = rss()
del buffers
print(int(applied), peak - rss())
"""


def _given_back_mib(threshold: str) -> tuple[bool, float]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    out = subprocess.run([sys.executable, "-c", PATTERN, threshold], env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    return out[0] == "1", int(out[1]) / 2**20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc thresholds")
def test_freed_gather_sized_buffers_leave_the_resident_set_only_with_a_fixed_threshold():
    applied, given_back = _given_back_mib(str(2**20))
    assert applied and given_back > 180, given_back  # the ten 20 MiB buffers went back
    applied, given_back = _given_back_mib("none")
    assert not applied and given_back < 40, given_back  # glibc's adaptive threshold: they stay resident


def test_left_alone_on_gpu_ranks_without_a_threshold_or_when_the_environment_sets_one(monkeypatch):
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    assert not fix_mmap_threshold(2**20, torch.device("cuda", 0))
    assert not fix_mmap_threshold(None, torch.device("cpu"))
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert not fix_mmap_threshold(2**20, torch.device("cpu"))


@pytest.mark.parametrize("value", ["0", "-1", str(64 * 2**20)])
def test_a_threshold_glibc_would_refuse_is_refused_naming_the_key(value):
    cfg = load_config(REPO_ROOT / "configs/tiny/stage1.yaml", [f"train.cpu_mmap_threshold={value}"])
    with pytest.raises(ConfigError, match=r"key 'train.cpu_mmap_threshold': expected bytes in \(0, 33554432\]"):
        validate_train_config(cfg, "stage1")
